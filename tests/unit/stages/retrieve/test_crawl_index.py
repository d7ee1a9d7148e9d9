"""The crawl index sharded by id range (crawl_index.py, knn_search.py): runs of embed shards,
the merge of per-shard top-k, results that do not depend on the shard count, and a resumed
build that keeps the shards already stored."""

import numpy as np
import pyarrow as pa
import pytest

from curate.core.knn_index import KnnIndex
from curate.core.stage import LocalPool
from curate.core.vectors import EmbeddingTable, read_embeddings, unit_rows
from curate.stages.retrieve.crawl_index import (
    MANIFEST,
    TRAINED,
    IndexOptions,
    build_crawl_index,
    local_shards,
    split_by_rows,
    stored_shards,
)
from curate.stages.retrieve.knn_search import HITS, merge_hits
from curate.stages.retrieve.policies import retrieve_knn
from tests.unit.stages.retrieve.test_retrieve_parts import write_embed

DIM = 32


def options(shards: int | None, flat_max: int = 10**6) -> IndexOptions:
    return IndexOptions(flat_max, nlist=16, pq_m=8, nprobe=4, seed=0, min_seeds=3, shards=shards)


def crawl(tmp_path, sizes=(500, 300, 0, 700, 400, 600, 500)):
    """EMBED shards of the given sizes (one empty, as a part whose images all failed), and 60
    seeds near crawl images of several shards."""
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((n, DIM)).astype(np.float32) for n in sizes]
    embed = tuple(
        write_embed(tmp_path / f"embed/{p}.parquet", v, "c", p) for p, v in enumerate(vectors)
    )
    near = np.concatenate([v[:10] for v in vectors if len(v)])
    seeds = near + 0.3 * rng.standard_normal(near.shape).astype(np.float32)
    seed_table = EmbeddingTable(
        pa.array([f"s{i}" for i in range(len(seeds))]),
        np.zeros(len(seeds), np.int32),
        np.arange(len(seeds), dtype=np.int32),
        unit_rows(seeds),
    )
    return embed, seed_table


def knn(index_dir, seeds: EmbeddingTable, k: int) -> pa.Table:
    return retrieve_knn("s", seeds, local_shards(index_dir), k, batch=17)


def test_runs_of_files_are_consecutive_and_even():
    assert split_by_rows([5, 5, 5, 5], 2) == [range(0, 2), range(2, 4)]
    assert split_by_rows([10, 0, 0, 1, 1, 10], 3) == [range(0, 1), range(1, 5), range(5, 6)]
    # Never more runs than files, and every file in exactly one run.
    assert split_by_rows([3, 4], 5) == [range(0, 1), range(1, 2)]
    assert split_by_rows([0, 0, 9], 2) == [range(0, 2), range(2, 3)]
    assert split_by_rows([7], 1) == [range(0, 1)]


def hits(query, similarity, shard, row) -> pa.Table:
    n = len(query)
    return pa.table(
        {
            "query": pa.array(query, pa.int32()),
            "similarity": pa.array(similarity, pa.float32()),
            "shard": pa.array([shard] * n, pa.int32()),
            "row": pa.array(row, pa.int64()),
            "image_id": [f"{shard}-{r}" for r in row],
            "part": pa.array([shard] * n, pa.int32()),
            "item": pa.array(row, pa.int32()),
        },
        schema=HITS,
    )


def test_merge_keeps_the_k_best_per_query_ties_in_index_order():
    a = hits([0, 0, 1], [0.9, 0.5, 0.7], shard=0, row=[4, 1, 2])
    b = hits([0, 0, 2], [0.5, 0.8, 0.1], shard=1, row=[0, 3, 5])
    merged, rank = merge_hits([b, a], 3)
    assert merged.column("image_id").to_pylist() == ["0-4", "1-3", "0-1", "0-2", "1-5"]
    assert rank.tolist() == [0, 1, 2, 0, 0]
    # The tie at 0.5 goes to the lower (shard, row): shard 0 row 1 before shard 1 row 0.
    merged, rank = merge_hits([a, b], 2)
    assert merged.column("image_id").to_pylist() == ["0-4", "1-3", "0-2", "1-5"]
    empty, rank = merge_hits([HITS.empty_table()], 4)
    assert empty.num_rows == 0 and len(rank) == 0
    with pytest.raises(ValueError, match="k must be"):
        merge_hits([a], 0)


def test_exact_index_gives_identical_results_however_it_is_cut(tmp_path):
    embed, seeds = crawl(tmp_path)
    single = build_crawl_index(embed, tmp_path / "one", options(1))
    sharded = build_crawl_index(embed, tmp_path / "three", options(3))
    assert single["kind"] == sharded["kind"] == "flat"
    assert single["ntotal"] == sharded["ntotal"] == 3000
    assert (single["shards"], sharded["shards"]) == (1, 3)
    # Each shard holds its own run's keys only; together, every crawl image once.
    shards = local_shards(tmp_path / "three").states
    sizes = [len(s.keys) for s in shards]
    assert sizes == [s.rows for s in stored_shards(tmp_path / "three")] and sum(sizes) == 3000
    assert max(sizes) < 3000
    expected = knn(tmp_path / "one", seeds, 5)
    assert expected.num_rows == len(seeds) * 5
    assert knn(tmp_path / "three", seeds, 5).equals(expected)


def test_ivf_pq_shards_find_the_single_index_hits_or_better(tmp_path):
    """Shards made from the same trained index probe the same lists with the same codes; each
    re-ranks a shortlist of its own rows and their union holds the single index's shortlist.
    So, for every query: rank by rank the sharded similarity is at least the single index's,
    and every single-index hit more similar than the sharded k-th hit is among the sharded
    hits. That is what is asserted (similarities are exact cosines in both)."""
    embed, seeds = crawl(tmp_path)
    k = 4
    # One trained index for both builds (a build keeps the trained index it finds), with a
    # shortlist of 2 k so short that the single index misses neighbours the shards find.
    trained = KnnIndex.create(DIM, 3000, flat_max=500, nlist=16, pq_m=8, nprobe=4, rerank=2)
    trained.train(read_embeddings(list(embed)).vectors)
    for name in ("one", "four"):
        trained.save(tmp_path / name / TRAINED)
    built = build_crawl_index(embed, tmp_path / "one", options(1, flat_max=500))
    assert built["kind"] == "ivf-pq" and built["rerank"] == 2
    assert build_crawl_index(embed, tmp_path / "four", options(4, flat_max=500))["shards"] == 4

    single, sharded = knn(tmp_path / "one", seeds, k), knn(tmp_path / "four", seeds, k)
    by_seed = {}
    for name, table in (("single", single), ("sharded", sharded)):
        for row in table.to_pylist():
            by_seed.setdefault(row["seed_id"], {}).setdefault(name, []).append(row)
    assert len(by_seed) == len(seeds)
    better = 0
    for seed_id, found in by_seed.items():
        one, many = found["single"], found["sharded"]
        assert [r["rank"] for r in many] == list(range(k)), seed_id
        for o, m in zip(one, many, strict=True):
            assert m["similarity"] >= o["similarity"] - 1e-6, seed_id
            better += m["similarity"] > o["similarity"] + 1e-6
        kth = many[-1]["similarity"]
        must = {r["image_id"] for r in one if r["similarity"] > kth}
        assert must <= {r["image_id"] for r in many}, seed_id
    # Not vacuous: with this short shortlist the shards do find closer images.
    assert better > 0


def test_a_resumed_build_keeps_the_shards_already_stored(tmp_path):
    embed, seeds = crawl(tmp_path)
    index_dir = tmp_path / "index"
    first = build_crawl_index(embed, index_dir, options(3, flat_max=500))
    before = knn(index_dir, seeds, 3)
    specs = stored_shards(index_dir)

    def identity(path):
        # Every write is a new file renamed into place: a file rewritten has another inode.
        stat = path.stat()
        return stat.st_ino, stat.st_mtime_ns

    kept = [index_dir / TRAINED] + [
        p for s in (specs[0], specs[2]) for p in (s.index_path, s.keys_path)
    ]
    before_kept = [identity(p) for p in kept]
    keys_before = identity(specs[1].keys_path)
    # A crash while shard 1 was being built: its keys are there, its index file (written last)
    # and the manifest (written once every shard is) are not.
    specs[1].index_path.unlink()
    (index_dir / MANIFEST).unlink()

    assert build_crawl_index(embed, index_dir, options(3, flat_max=500)) == first
    assert [identity(p) for p in kept] == before_kept  # neither retrained nor rebuilt
    assert identity(specs[1].keys_path) != keys_before and specs[1].index_path.exists()
    assert knn(index_dir, seeds, 3).equals(before)


def test_local_pool_calls_every_state_in_order():
    class State:
        def __init__(self, n: int) -> None:
            self.n = n

        def times(self, x: int) -> int:
            return self.n * x

    assert LocalPool([State(1), State(2), State(3)]).map("times", 5) == [5, 10, 15]
