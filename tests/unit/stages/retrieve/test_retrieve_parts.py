"""The retrieve stage's parts over EMBED shards: the crawl index past flat_max is IVF-PQ and
still finds planted neighbours; caps keep the best images."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.shards import write_shard
from curate.stages.retrieve.crawl_index import IndexOptions, build_crawl_index
from curate.stages.retrieve.parts import CrawlInputs, RetrievePart, cap_images, retrieve_part
from curate.stages.retrieve.seed_sets import PolicyStep
from schemas.shards import EMBED, RETRIEVE

DIM = 32


def write_embed(path: Path, vectors: np.ndarray, prefix: str, part: int) -> Path:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pa.table(
        {
            "image_id": [f"{prefix}{part}-{i}" for i in range(len(unit))],
            "part": pa.array(np.full(len(unit), part), pa.int32()),
            "item": pa.array(np.arange(len(unit)), pa.int32()),
            "embedding": [row.astype(np.float16) for row in unit],
        },
        schema=EMBED,
    )
    write_shard(table, path)
    return path


def test_ivf_crawl_index_finds_planted_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    crawl = rng.standard_normal((3, 1000, DIM)).astype(np.float32)
    shards = tuple(write_embed(tmp_path / f"embed/{p}.parquet", crawl[p], "c", p) for p in range(3))
    # Seeds: slightly perturbed copies of 20 crawl images of part 1.
    picks = rng.choice(1000, 20, replace=False)
    seeds = crawl[1, picks] + 0.05 * rng.standard_normal((20, DIM)).astype(np.float32)
    seed_shard = write_embed(tmp_path / "seeds.parquet", seeds, "s", 0)
    inputs = CrawlInputs(shards, (), tmp_path / "cluster", tmp_path / "index")
    options = IndexOptions(flat_max=500, nlist=None, pq_m=None, nprobe=None, seed=0, min_seeds=3)

    described = build_crawl_index(inputs.embed, inputs.index_dir, options)
    assert described["kind"] != "flat" and described["ntotal"] == 3000
    # built once, then reused
    assert build_crawl_index(inputs.embed, inputs.index_dir, options) == described

    part = RetrievePart(0, "s", PolicyStep("knn", 3), None, (seed_shard,))
    result = retrieve_part(part, inputs, options, tmp_path / "retrieve")

    rows = pq.read_table(result.shards["data"].path).to_pylist()
    assert len(rows) == 20 * 3
    top = {r["seed_id"]: r["image_id"] for r in rows if r["rank"] == 0}
    expected = {f"s0-{i}": f"c1-{picks[i]}" for i in range(20)}
    assert sum(top[s] == expected[s] for s in expected) >= 19

    # With a cap the matches are ranked before writing: the 10 best images stay.
    capped = RetrievePart(1, "s", PolicyStep("knn", 3), 10, (seed_shard,))
    result = retrieve_part(capped, inputs, options, tmp_path / "retrieve")
    kept = pq.read_table(result.shards["data"].path).to_pylist()
    assert len({r["image_id"] for r in kept}) == 10
    best = sorted(rows, key=lambda r: -r["similarity"])[0]
    assert best["image_id"] in {r["image_id"] for r in kept}


def test_cap_keeps_the_most_similar_images():
    table = pa.table(
        {
            "seed_set": ["s"] * 4,
            "seed_id": ["a", "b", "a", "b"],
            "image_id": ["x", "x", "y", "z"],
            "part": pa.array([0] * 4, pa.int32()),
            "item": pa.array([0, 0, 1, 2], pa.int32()),
            "rank": pa.array([0, 0, 1, 1], pa.int32()),
            "similarity": pa.array([0.9, 0.5, 0.8, 0.7], pa.float32()),
            "method": ["knn"] * 4,
            "cluster_id": pa.nulls(4, pa.int32()),
        },
        schema=RETRIEVE,
    )
    capped = cap_images(table, 2)
    assert sorted(capped.column("image_id").to_pylist()) == ["x", "x", "y"]
    assert cap_images(table, None) is table
