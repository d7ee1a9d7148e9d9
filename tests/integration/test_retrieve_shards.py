"""The retrieve stage's kNN path on a real local Ray with the crawl index in shards: the index is
trained in one task, each shard built and held by an actor of its own, and kNN parts (Ray tasks)
search those actors through the pool in their inputs. Two shards give exactly the rows of one
(the exact index), and of the same parts run in one process; the pool ends with the stage."""

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from curate.core.shards import PartResult
from curate.core.stage import PartWork
from curate.stages.retrieve.crawl_index import IndexOptions, open_crawl_index
from curate.stages.retrieve.parts import CrawlInputs, RetrievePart, retrieve_part
from curate.stages.retrieve.seed_sets import PolicyStep
from pipelines.executor import RayCompute
from tests.unit.stages.retrieve.test_retrieve_parts import write_embed


class KnnParts(PartWork):
    """The retrieve stage's part step alone (its stage object would import the embed model)."""

    def run_part(self, state: tuple, part: RetrievePart) -> PartResult:
        return retrieve_part(part, *state)


def corpus(root: Path) -> tuple[tuple[Path, ...], Path]:
    rng = np.random.default_rng(3)
    embed = tuple(
        write_embed(root / f"embed/{p}.parquet", rng.standard_normal((n, 16)), "c", p)
        for p, n in enumerate((70, 50, 90, 40))
    )
    seeds = write_embed(root / "seeds.parquet", rng.standard_normal((30, 16)), "s", 0)
    return embed, seeds


def run_knn(compute: RayCompute, root: Path, embed, seeds: Path, shards: int) -> list:
    """The kNN parts (uncapped: streamed; capped: ranked first) over an index of `shards`."""
    crawl = CrawlInputs(embed, (), root / "cluster", root / f"s{shards}" / "index")
    options = IndexOptions(10**6, None, None, None, 0, 3, shards=shards)
    pool, described = open_crawl_index(compute, "retrieve", embed, crawl.index_dir, options)
    assert described["kind"] == "flat" and described["ntotal"] == 250
    assert described["shards"] == shards and len(pool.actors) == shards
    out = root / f"s{shards}" / "retrieve"
    parts = [
        RetrievePart(0, "s", PolicyStep("knn", 5), None, (seeds,)),
        RetrievePart(1, "s", PolicyStep("knn", 3), 12, (seeds,)),
    ]
    results: list[PartResult] = []
    compute.map_parts(
        KnnParts(), (crawl, options, out, pool), parts, label="retrieve", commit=results.append
    )
    tables = {r.part: pq.read_table(r.shards["data"].path) for r in results}
    # The same parts in this process, loading every shard here (no pool): the same rows.
    for part in parts:
        local = retrieve_part(part, crawl, options, root / f"s{shards}" / "local")
        assert pq.read_table(local.shards["data"].path).equals(tables[part.index])
    return [tables[0], tables[1], pool]


def test_sharded_knn_on_ray_matches_one_shard(ray_local, tmp_path):
    embed, seeds = corpus(tmp_path)
    compute = RayCompute(progress=False)
    try:
        one_streamed, one_capped, one_pool = run_knn(compute, tmp_path, embed, seeds, 1)
        two_streamed, two_capped, two_pool = run_knn(compute, tmp_path, embed, seeds, 2)
        assert one_streamed.num_rows == 30 * 5
        assert len(set(one_capped.column("image_id").to_pylist())) == 12
        assert two_streamed.equals(one_streamed)
        assert two_capped.equals(one_capped)
        # A searcher that dies (as with its node) is started again and reloads its shard; the
        # calls sent meanwhile are answered by the new one.
        described = two_pool.map("describe")
        ray.kill(two_pool.actors[1], no_restart=False)
        assert two_pool.map("describe") == described
        actors = one_pool.actors + two_pool.actors
    finally:
        compute.close_pools()
    # The pools' actors are gone once closed (the executor closes them when the stage ends).
    # ray.kill is asynchronous: a call sent just after may still be answered, so each actor is
    # asked until it is found dead (a bounded wait for the kill to land, not a timing).
    for actor in actors:
        for _ in range(120):
            try:
                ray.get(actor.ready.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("a closed pool's searcher still answers")
