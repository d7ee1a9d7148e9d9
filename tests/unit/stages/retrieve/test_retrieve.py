"""The retrieval policies (as-is, knn, cluster, balanced) and collision counts, on small
generated embeddings."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import curate.stages.retrieve.policies as retrieve
from curate.core.knn_index import KnnIndex
from curate.core.shards import write_shard
from curate.core.stage import LocalPool
from curate.core.vectors import EmbeddingTable, unit_rows
from curate.stages.cluster.hierarchy import Hierarchy
from curate.stages.retrieve.knn_search import CrawlKeys, IndexShard
from curate.stages.retrieve.policies import (
    collisions,
    id_hash,
    retrieve_as_is,
    retrieve_balanced,
    retrieve_cluster,
    retrieve_knn,
)
from schemas.shards import CLUSTER, EMBED, RETRIEVE


def embeddings(ids: list[str], vectors: np.ndarray, part: int = 0) -> EmbeddingTable:
    return EmbeddingTable(
        pa.array(ids, pa.string()),
        np.full(len(ids), part, np.int32),
        np.arange(len(ids), dtype=np.int32),
        unit_rows(vectors),
    )


def test_id_hash_is_deterministic_seeded_and_slice_safe():
    ids = [f"{i:064x}" for i in range(10_000)] + ["", "x", "é"]
    hashes = id_hash(ids, seed=0)
    assert hashes.dtype == np.uint64 and len(np.unique(hashes)) == len(ids)
    np.testing.assert_array_equal(hashes, id_hash(pa.array(ids), seed=0))
    np.testing.assert_array_equal(hashes[5:], id_hash(pa.array(ids).slice(5), seed=0))
    assert (hashes != id_hash(ids, seed=1)).mean() > 0.99
    # a uniform choice: the smallest half of hashes is about half of any subset
    small = hashes < np.median(hashes)
    assert 0.45 < small[:5000].mean() < 0.55
    with pytest.raises(ValueError, match="null"):
        id_hash(pa.array(["a", None]))


def test_as_is_returns_every_seed_image_as_itself():
    seeds = embeddings(["s0", "s1", "s2"], np.eye(3, 8), part=4)
    table = retrieve_as_is("imagenet22k", seeds)
    assert table.schema == RETRIEVE
    assert table.column("image_id").to_pylist() == ["s0", "s1", "s2"]
    assert table.column("seed_id").to_pylist() == ["s0", "s1", "s2"]
    assert table.column("part").to_pylist() == [4, 4, 4]
    assert table.column("rank").to_pylist() == [0, 1, 2]
    assert set(table.column("method").to_pylist()) == {"as-is"}
    assert set(table.column("similarity").to_pylist()) == {1.0}
    assert table.column("cluster_id").null_count == 3


def planted_neighbours(n_seeds: int, k: int, background: int, d: int, seed: int = 0):
    """Seeds, and a crawl of random background images plus k images per seed planted at
    cosine 0.99, 0.98, ... (decreasing with the intended rank), shuffled."""
    rng = np.random.default_rng(seed)
    seeds = unit_rows(rng.standard_normal((n_seeds, d)))
    crawl = [unit_rows(rng.standard_normal((background, d)))]
    owner, rank = [np.full(background, -1)], [np.full(background, -1)]
    for r in range(k):
        target = 0.99 - 0.01 * r
        side = unit_rows(rng.standard_normal((n_seeds, d)))
        side = unit_rows(side - (side * seeds).sum(1, keepdims=True) * seeds)  # orthogonal
        crawl.append(target * seeds + np.sqrt(1 - target**2) * side)
        owner.append(np.arange(n_seeds))
        rank.append(np.full(n_seeds, r))
    order = rng.permutation(background + n_seeds * k)
    return (
        seeds,
        np.concatenate(crawl)[order],
        np.concatenate(owner)[order],
        np.concatenate(rank)[order],
    )


@pytest.mark.parametrize("kind", ["flat", "ivf-pq"])
def test_knn_picks_the_planted_neighbours_at_their_ranks(kind):
    seeds, crawl, owner, rank = planted_neighbours(100, 4, 9600, 32)
    flat_max = 0 if kind == "ivf-pq" else 10**6
    index = KnnIndex.create(32, len(crawl), flat_max=flat_max, nlist=32, nprobe=8)
    assert index.describe()["kind"] == kind
    index.train(crawl)
    index.add(crawl)
    ids = [f"c{i}" for i in range(len(crawl))]
    keys = CrawlKeys(ids, np.full(len(crawl), 2), np.arange(len(crawl)))
    seed_table = embeddings([f"s{i}" for i in range(100)], seeds)
    shards = LocalPool([IndexShard(index, keys)])
    table = retrieve_knn("imagenet1k", seed_table, shards, 4, batch=33)
    assert table.schema == RETRIEVE and table.num_rows == 400
    seed_rows = [int(s[1:]) for s in table.column("seed_id").to_pylist()]
    crawl_rows = [int(c[1:]) for c in table.column("image_id").to_pylist()]
    assert owner[crawl_rows].tolist() == seed_rows
    assert rank[crawl_rows].tolist() == table.column("rank").to_pylist()
    expected = 0.99 - 0.01 * np.asarray(table.column("rank").to_pylist())
    np.testing.assert_allclose(table.column("similarity").to_numpy(), expected, atol=2e-3)
    assert table.column("item").to_pylist() == crawl_rows
    assert set(table.column("method").to_pylist()) == {"knn"}
    assert set(table.column("part").to_pylist()) == {2}


def test_knn_with_fewer_crawl_images_than_k_and_bad_keys():
    rng = np.random.default_rng(1)
    index = KnnIndex.create(8, 3)
    index.add(rng.standard_normal((3, 8)))
    keys = CrawlKeys(["a", "b", "c"], [0, 0, 0], [0, 1, 2])
    seeds = embeddings(["s"], rng.standard_normal((1, 8)))
    table = retrieve_knn("gldv2", seeds, LocalPool([IndexShard(index, keys)]), 5)
    assert sorted(table.column("image_id").to_pylist()) == ["a", "b", "c"]
    assert table.column("rank").to_pylist() == [0, 1, 2]
    with pytest.raises(ValueError, match="2 crawl keys for an index of 3 vectors"):
        IndexShard(index, CrawlKeys(["a", "b"], [0, 0], [0, 1]))
    with pytest.raises(ValueError, match="crawl keys of different lengths"):
        CrawlKeys(["a"], [0, 0], [0])


def cluster_tables(sizes: dict[int, int], pieces: int, seed: int = 0) -> list[pa.Table]:
    """CLUSTER rows: sizes[c] images in cluster c, shuffled and cut into `pieces` tables."""
    rng = np.random.default_rng(seed)
    clusters = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    clusters = clusters[rng.permutation(len(clusters))]
    table = pa.table(
        {
            "image_id": [f"img{i:05d}" for i in range(len(clusters))],
            "part": pa.array(np.arange(len(clusters)) // 100, pa.int32()),
            "item": pa.array(np.arange(len(clusters)) % 100, pa.int32()),
            "cluster_id": pa.array(clusters, pa.int32()),
            "distance": pa.array(rng.random(len(clusters)) * 0.5, pa.float32()),
        },
        schema=CLUSTER,
    )
    cuts = np.linspace(0, table.num_rows, pieces + 1).astype(int)
    return [table.slice(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]


# seeds per cluster: cluster 0 holds 5, 1 holds 3 (not more than min_seeds = 3), 2 holds 4,
# 3 holds 10, 4 none
SEED_CLUSTERS = np.array([0] * 5 + [1] * 3 + [2] * 4 + [3] * 10)
CRAWL_SIZES = {0: 50, 1: 100, 2: 8, 3: 200, 4: 30}


def expected_picks(tables: list[pa.Table], cluster: int, count: int, seed: int) -> list[str]:
    """The `count` images of `cluster` with the smallest id_hash."""
    table = pa.concat_tables(tables)
    ids = np.array(table.column("image_id").to_pylist())
    ids = ids[table.column("cluster_id").to_numpy() == cluster]
    return ids[np.argsort(id_hash(list(ids), seed), kind="stable")][:count].tolist()


def test_cluster_takes_only_clusters_with_more_than_min_seeds_and_honours_per_cluster():
    tables = cluster_tables(CRAWL_SIZES, pieces=7)
    table = retrieve_cluster("flowers", SEED_CLUSTERS, tables, per_cluster=20, cap=None, seed=5)
    assert table.schema == RETRIEVE
    counts = dict(
        zip(*np.unique(table.column("cluster_id").to_numpy(), return_counts=True), strict=True)
    )
    assert counts == {0: 20, 2: 8, 3: 20}
    for cluster, count in counts.items():
        rows = table.filter(pc.equal(table.column("cluster_id"), cluster))
        assert rows.column("image_id").to_pylist() == expected_picks(tables, cluster, count, 5)
        assert rows.column("rank").to_pylist() == list(range(count))
    everything = pa.concat_tables(tables)
    distance = dict(
        zip(everything["image_id"].to_pylist(), everything["distance"].to_pylist(), strict=True)
    )
    for image_id, similarity in zip(
        table["image_id"].to_pylist(), table["similarity"].to_pylist(), strict=True
    ):
        assert similarity == pytest.approx(1 - distance[image_id], abs=1e-6)
    assert table.column("seed_id").null_count == table.num_rows
    assert set(table.column("method").to_pylist()) == {"cluster"}
    # min_seeds = 4 drops cluster 2 (exactly 4 seeds) too
    fewer = retrieve_cluster("flowers", SEED_CLUSTERS, tables, per_cluster=20, min_seeds=4)
    assert set(fewer.column("cluster_id").to_pylist()) == {0, 3}
    assert retrieve_cluster("flowers", SEED_CLUSTERS, tables, min_seeds=10).num_rows == 0


def test_cluster_cap_is_spread_evenly_and_streaming_keeps_the_same_picks(monkeypatch):
    tables = cluster_tables(CRAWL_SIZES, pieces=1)
    capped = retrieve_cluster("flowers", SEED_CLUSTERS, tables, per_cluster=20, cap=30, seed=5)
    counts = dict(
        zip(*np.unique(capped.column("cluster_id").to_numpy(), return_counts=True), strict=True)
    )
    # room 20 / 8 / 20, cap 30: cluster 2 gives its 8, the other two 11 each
    assert counts == {0: 11, 2: 8, 3: 11}
    for cluster, count in counts.items():
        rows = capped.filter(pc.equal(capped.column("cluster_id"), cluster))
        assert rows.column("image_id").to_pylist() == expected_picks(tables, cluster, count, 5)
    # pruning the kept set every few rows while 23 small tables stream in changes nothing
    monkeypatch.setattr(retrieve, "_MERGE_ROWS", 16)
    streamed = retrieve_cluster(
        "flowers",
        SEED_CLUSTERS,
        cluster_tables(CRAWL_SIZES, pieces=23),
        per_cluster=20,
        cap=30,
        seed=5,
    )
    assert streamed.equals(capped)
    batches = [t.to_batches()[0] for t in cluster_tables(CRAWL_SIZES, pieces=23)]
    assert retrieve_cluster(
        "flowers", SEED_CLUSTERS, batches, per_cluster=20, cap=30, seed=5
    ).equals(capped)


def test_balanced_honours_the_budget_and_spreads_it_over_the_hierarchy(tmp_path, monkeypatch):
    # four leaf directions under two top clusters; crawl sizes 2,000 / 300 | 60 / 40
    rng = np.random.default_rng(3)
    leaves = unit_rows(rng.standard_normal((4, 16)))
    hierarchy = Hierarchy(
        [leaves, unit_rows(leaves[[0, 2]] + leaves[[1, 3]])], [np.array([0, 0, 1, 1], np.int32)]
    )
    sizes = [2000, 300, 60, 40]
    owner = np.repeat(np.arange(4), sizes)
    vectors = leaves[owner] + rng.standard_normal((len(owner), 16)).astype(np.float32) * 0.02
    ids = [f"b{i:05d}" for i in range(len(owner))]
    crawl = embeddings(ids, vectors, part=1)
    table = retrieve_balanced("balanced", crawl, hierarchy, 200, seed=2)
    assert table.schema == RETRIEVE and table.num_rows == 200
    assert len(set(table.column("image_id").to_pylist())) == 200
    counts = np.bincount(table.column("cluster_id").to_numpy(), minlength=4)
    # 100 per top cluster; the first splits its 100 evenly, the second has exactly 100
    np.testing.assert_array_equal(counts, [50, 50, 60, 40])
    picked_owner = owner[[int(i[1:]) for i in table.column("image_id").to_pylist()]]
    np.testing.assert_array_equal(picked_owner, table.column("cluster_id").to_numpy())
    assert table.column("similarity").to_numpy().min() > 0.9
    assert set(table.column("method").to_pylist()) == {"balanced"}
    assert retrieve_balanced("balanced", crawl, hierarchy, 200, seed=2).equals(table)
    assert not retrieve_balanced("balanced", crawl, hierarchy, 200, seed=3).equals(table)
    assert retrieve_balanced("balanced", crawl, hierarchy, 10_000).num_rows == len(owner)

    # the same picks streamed from EMBED shards, pruning as it goes
    monkeypatch.setattr(retrieve, "_MERGE_ROWS", 64)
    paths = []
    for part, (a, b) in enumerate([(0, 1000), (1000, 2400)]):
        shard = pa.table(
            {
                "image_id": ids[a:b],
                "part": pa.array([1] * (b - a), pa.int32()),
                "item": pa.array(np.arange(a, b), pa.int32()),
                "embedding": pa.array(
                    list(vectors[a:b].astype(np.float16)), pa.list_(pa.float16())
                ),
            },
            schema=EMBED,
        )
        paths.append(write_shard(shard, tmp_path / f"part-{part}.parquet").path)
    streamed = retrieve_balanced("balanced", paths, hierarchy, 200, seed=2)
    assert streamed.column("image_id").equals(table.column("image_id"))


def test_collisions_count_images_picked_more_than_once():
    def rows(seed_set: str, image_ids: list[str]) -> pa.Table:
        n = len(image_ids)
        return retrieve._table(
            seed_set,
            "knn",
            image_ids=pa.array(image_ids),
            parts=np.zeros(n),
            items=np.zeros(n),
            ranks=np.zeros(n),
            similarity=np.ones(n),
        )

    tables = [rows("in22k", ["a", "b", "a", "c"]), rows("in1k", ["c", "d"]), rows("gl", [])]
    assert collisions(tables) == {
        "rows": 6,
        "images": 4,
        "collided_images": 2,  # a twice in one set, c in two sets
        "extra_rows": 2,
        "cross_set_images": 1,
    }
    assert collisions([])["rows"] == 0
