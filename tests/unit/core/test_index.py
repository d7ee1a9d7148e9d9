"""k-means, assignment, hierarchical k-means, balanced sampling, the kNN index and reading EMBED
shards, on small planted data."""

import faiss
import numpy as np
import pyarrow as pa
import pytest

from curate.core.index import (
    EmbeddingTable,
    Hierarchy,
    KnnIndex,
    allocate_budget,
    assign,
    balanced_sample,
    clusters_for,
    even_split,
    hierarchical_kmeans,
    ivf_params,
    read_embeddings,
    train_kmeans,
    unit_rows,
)
from curate.core.shards import write_shard
from schemas.shards import EMBED


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin while waiting: on a shared 2-core machine two of them turn
    PQ training from 3 s into 20 s. The results do not depend on the thread count."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def planted(
    k: int, per: int, d: int, noise: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, true labels, unit centers): `per` noisy copies of each of k random directions."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((k, d)))
    labels = np.repeat(np.arange(k), per)
    noise_rows = rng.standard_normal((k * per, d)).astype(np.float32) * noise / np.sqrt(d)
    return centers[labels] + noise_rows, labels, centers


def embed_table(ids: list[str], vectors: np.ndarray, part: int = 0) -> pa.Table:
    return pa.table(
        {
            "image_id": ids,
            "part": pa.array([part] * len(ids), pa.int32()),
            "item": pa.array(np.arange(len(ids)), pa.int32()),
            "embedding": pa.array(list(vectors.astype(np.float16)), pa.list_(pa.float16())),
        },
        schema=EMBED,
    )


# -- k-means -----------------------------------------------------------------------------------


def test_clusters_for_scales_with_n_and_reaches_the_lvd_size():
    assert clusters_for(1) == 1
    assert clusters_for(10_000) == 100
    assert clusters_for(1_200_000_000) == 100_000
    sizes = [clusters_for(n) for n in (10, 1_000, 10**6, 10**8, 10**9, 10**10)]
    assert sizes == sorted(sizes)
    assert all(clusters_for(n) <= n for n in (1, 2, 3, 50))
    with pytest.raises(ValueError, match="at least one image"):
        clusters_for(0)


def test_train_kmeans_recovers_planted_clusters():
    x, labels, centers = planted(8, 200, 32)
    centroids = train_kmeans(x, 8, seed=0, init="kmeans++", nredo=5)
    assert centroids.shape == (8, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    match = centroids @ centers.T
    # each planted center has its own centroid, nearly on it
    assert sorted(match.argmax(axis=1)) == list(range(8))
    assert match.max(axis=0).min() > 0.99
    found, _ = assign(x, centroids)
    for label in range(8):
        assert len(set(found[labels == label])) == 1


def test_train_kmeans_normalises_its_input_and_rejects_bad_rows():
    x, _, _ = planted(4, 100, 16, seed=1)
    scaled = x * np.linspace(0.1, 50, len(x), dtype=np.float32)[:, None]
    np.testing.assert_allclose(
        train_kmeans(x, 4, seed=3), train_kmeans(scaled, 4, seed=3), atol=1e-4
    )
    with pytest.raises(ValueError, match="k = 401 clusters needs at least 401 vectors, got 400"):
        train_kmeans(x, 401)
    broken = x.copy()
    broken[7] = 0
    with pytest.raises(ValueError, match="1 of 400 rows have no direction.*row 7"):
        train_kmeans(broken, 4)
    broken[7] = np.nan
    with pytest.raises(ValueError, match="no direction"):
        train_kmeans(broken, 4)
    with pytest.raises(ValueError, match="2-D"):
        train_kmeans(x[0], 1)
    with pytest.raises(ValueError, match="init must be one of"):
        train_kmeans(x, 4, init="farthest")


def test_assign_agrees_with_brute_force_across_batches():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((503, 24)).astype(np.float16)  # float16 like the embed shards
    centroids = unit_rows(rng.standard_normal((37, 24)))
    ids, distances = assign(x, centroids, batch=64)
    sims = unit_rows(x) @ centroids.T
    np.testing.assert_array_equal(ids, sims.argmax(axis=1))
    np.testing.assert_allclose(distances, 1 - sims.max(axis=1), atol=1e-5)
    assert ids.dtype == np.int32 and distances.dtype == np.float32
    with pytest.raises(ValueError, match=r"dimension \(24,\) but the index/centroids have 16"):
        assign(x, centroids[:, :16])


# -- hierarchical k-means and balanced sampling ------------------------------------------------


def test_hierarchical_kmeans_levels_and_parents_are_consistent(tmp_path):
    x, _, _ = planted(12, 60, 16, seed=4)
    hierarchy = hierarchical_kmeans(x, [24, 6, 2], resampling_steps=2, niter=10, seed=0)
    assert hierarchy.sizes == [24, 6, 2]
    for level, parent in enumerate(hierarchy.parents):
        # the parent of a centroid is the nearest centroid one level up
        upper = hierarchy.centroids[level + 1]
        np.testing.assert_array_equal(parent, (hierarchy.centroids[level] @ upper.T).argmax(1))
    paths = hierarchy.assign(x)
    assert paths.shape == (len(x), 3)
    np.testing.assert_array_equal(paths[:, 0], assign(x, hierarchy.centroids[0])[0])
    for level, parent in enumerate(hierarchy.parents):
        np.testing.assert_array_equal(paths[:, level + 1], parent[paths[:, level]])

    hierarchy.save(tmp_path / "h.tmp")  # any name: nothing is appended
    loaded = Hierarchy.load(tmp_path / "h.tmp")
    np.testing.assert_array_equal(loaded.assign(x), paths)

    with pytest.raises(ValueError, match="non-increasing"):
        hierarchical_kmeans(x, [6, 24])
    with pytest.raises(ValueError, match="level 1 has 1000 clusters but the sample only 720"):
        hierarchical_kmeans(x, [1000])
    with pytest.raises(ValueError, match="parents do not index"):
        Hierarchy([hierarchy.centroids[0], hierarchy.centroids[1]], [np.full(24, 6, np.int32)])


def test_resampling_moves_centroids_out_of_dense_regions():
    # One dense cluster of 2,000 points and 7 sparse ones of 40: plain k-means spends most
    # centroids on the dense one; Vo et al.'s resampling spreads them over the modes.
    dense, _, _ = planted(1, 2000, 16, noise=0.6, seed=5)
    sparse, _, centers = planted(7, 40, 16, noise=0.3, seed=6)
    x = np.concatenate([dense, sparse])
    covered = []
    for steps in (0, 10):
        level = hierarchical_kmeans(x, [16], resampling_steps=steps, resample_per_cluster=10)
        covered.append(int(((level.centroids[0] @ centers.T).max(axis=0) > 0.9).sum()))
    assert covered == [1, 7]


def test_even_split_and_allocate_budget():
    rng = np.random.default_rng(0)
    alloc = even_split(np.array([1000, 5, 300, 40]), 200, rng)
    assert alloc.sum() == 200 and alloc[1] == 5 and alloc[3] == 40
    assert abs(int(alloc[0]) - int(alloc[2])) <= 1
    np.testing.assert_array_equal(even_split(np.array([3, 4]), 100, rng), [3, 4])
    # two top clusters; the first holds leaves of 900 and 100 rows, the second 30 and 20
    paths = np.array([[0, 0], [1, 0], [2, 1], [3, 1]])
    alloc = allocate_budget(paths, np.array([900, 100, 30, 20]), 100, seed=1)
    np.testing.assert_array_equal(alloc, [25, 25, 30, 20])


def test_balanced_sample_is_far_more_even_than_uniform_and_deterministic():
    # top-level clusters of 20,000 / 2,000 / 200 / 120 rows, each split into two leaves 9:1
    sizes = [20_000, 2_000, 200, 120]
    top = np.repeat(np.arange(4), sizes)
    rng = np.random.default_rng(7)
    leaf = top * 2 + (rng.random(len(top)) < 0.1)
    paths = np.stack([leaf, top], axis=1)
    picked = balanced_sample(paths, 400, seed=3)
    assert len(picked) == 400 and len(np.unique(picked)) == 400
    counts = np.bincount(top[picked], minlength=4)
    np.testing.assert_array_equal(counts, [100, 100, 100, 100])
    uniform = np.bincount(top[rng.choice(len(top), 400, replace=False)], minlength=4)
    assert counts.max() / counts.min() == 1 and uniform.max() / max(uniform.min(), 1) > 50
    # within a top cluster, its two leaves share its 100 evenly
    assert np.bincount(leaf[picked][top[picked] == 0]).tolist() == [50, 50]
    np.testing.assert_array_equal(picked, balanced_sample(paths, 400, seed=3))
    assert not np.array_equal(picked, balanced_sample(paths, 400, seed=4))
    # small clusters give their unused room to the others
    counts = np.bincount(top[balanced_sample(paths, 1000, seed=0)], minlength=4)
    np.testing.assert_array_equal(counts, [340, 340, 200, 120])
    np.testing.assert_array_equal(balanced_sample(paths[:50], 80), np.arange(50))


# -- the kNN index -----------------------------------------------------------------------------


def neighbour_groups(groups: int, members: int, d: int, seed: int = 0):
    """Base vectors in groups of `members` around random directions, member j at cosine
    ~1 / sqrt(1 + (0.05 + 0.07 j)^2) (0.999, 0.993, 0.982, ...) from its direction, and one query
    on each direction: a query's exact top-`members` is its own group, in member order, with
    gaps far above float16 rounding."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((groups, d)))
    offsets = unit_rows(rng.standard_normal((groups * members, d)))
    scale = np.tile(0.05 + 0.07 * np.arange(members, dtype=np.float32), groups)
    base = np.repeat(centers, members, axis=0) + offsets * scale[:, None]
    queries = centers + rng.standard_normal(centers.shape).astype(np.float32) * 0.01 / np.sqrt(d)
    return unit_rows(base), unit_rows(queries)


def test_flat_index_is_exact_pads_missing_hits_and_round_trips(tmp_path):
    rng = np.random.default_rng(8)
    base = unit_rows(rng.standard_normal((300, 16)))
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    index = KnnIndex.create(16, 300)
    assert not index.needs_training and index.describe()["kind"] == "flat"
    index.add(base, batch=128)
    sims, ids = index.search(queries, 5)
    exact = unit_rows(queries) @ base.T
    np.testing.assert_array_equal(ids, np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_allclose(sims, -np.sort(-exact, axis=1)[:, :5], atol=1e-5)
    sims, ids = index.search(queries[:2], 302)
    assert (ids[:, 300:] == -1).all() and np.isneginf(sims[:, 300:]).all()
    index.save(tmp_path / "crawl.index")
    loaded = KnnIndex.load(tmp_path / "crawl.index")
    assert loaded.describe() == index.describe()
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])
    with pytest.raises(ValueError, match="queries have dimension"):
        index.search(queries[:, :8], 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(queries, 0)


def test_ivf_pq_returns_the_exact_neighbours_on_easy_data(tmp_path):
    base, queries = neighbour_groups(2560, 4, 64)
    index = KnnIndex.create(64, len(base), flat_max=1000, nlist=64, pq_m=16, nprobe=16)
    assert index.needs_training
    with pytest.raises(RuntimeError, match="must be trained"):
        index.add(base)
    with pytest.raises(ValueError, match="needs >= 64 training vectors"):
        index.train(base[:10])
    index.train(base)
    index.add(base)
    assert index.describe() == {
        "kind": "ivf-pq",
        "d": 64,
        "nlist": 64,
        "pq_m": 16,
        "nprobe": 16,
        "rerank": 16,
        "ntotal": len(base),
        "gpu": False,
    }
    exact = KnnIndex.create(64, len(base))
    exact.add(base)
    exact_sims, exact_ids = exact.search(queries, 4)
    sims, ids = index.search(queries, 4)
    # re-ranked: the same neighbours in the same order, with exact cosines
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(sims, exact_sims, atol=2e-3)
    np.testing.assert_array_equal(ids, np.arange(len(base)).reshape(-1, 4))
    # PQ scores alone still find the same sets on data this easy
    index.rerank = 0
    _, pq_ids = index.search(queries, 4)
    assert (np.sort(pq_ids, axis=1) == np.sort(exact_ids, axis=1)).all(axis=1).mean() > 0.98
    index.rerank = 16

    index.save(tmp_path / "ivf.index")
    loaded = KnnIndex.load(tmp_path / "ivf.index")
    assert loaded.describe() == index.describe()
    loaded.nprobe = 2
    assert loaded.describe()["nprobe"] == 2
    loaded.nprobe = 16
    np.testing.assert_array_equal(loaded.search(queries, 4)[1], ids)


def test_index_defaults_and_gpu_request_without_a_gpu():
    assert ivf_params(1_000_000, 768) == (4096, 96, 64)
    assert ivf_params(10_000_000, 1280) == (16384, 64, 64)  # ViT-H: 20 dims a sub-quantizer
    assert ivf_params(100, 12)[1] == 1 and ivf_params(100, 12)[0] == 2
    with pytest.raises(ValueError, match="pq_m = 7 must divide the dimension 64"):
        KnnIndex.create(64, 10, flat_max=0, pq_m=7)
    # gpu=True on a machine whose FAISS sees no GPU runs the same calls on the CPU
    if faiss.get_num_gpus() == 0:
        assert KnnIndex.create(8, 10, gpu=True).describe()["gpu"] is False


# -- reading EMBED shards ----------------------------------------------------------------------


def test_read_embeddings_streams_and_samples_deterministically(tmp_path):
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((3700, 12)).astype(np.float32)
    ids = [f"img{i:05d}" for i in range(len(vectors))]
    paths = [tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"]
    write_shard(embed_table(ids[:2500], vectors[:2500], part=0), paths[0])  # 3 row groups
    write_shard(embed_table(ids[2500:], vectors[2500:], part=1), paths[1])

    table = read_embeddings(paths)
    assert isinstance(table, EmbeddingTable) and len(table) == 3700
    assert table.image_ids.to_pylist() == ids
    assert table.parts.tolist() == [0] * 2500 + [1] * 1200 and table.items[2500] == 0
    expected = unit_rows(vectors.astype(np.float16))
    np.testing.assert_allclose(table.vectors, expected, atol=1e-6)

    sample = read_embeddings(paths, sample=500, seed=1)
    picked = [int(i[3:]) for i in sample.image_ids.to_pylist()]
    assert len(set(picked)) == 500 and picked == sorted(picked)
    np.testing.assert_allclose(sample.vectors, expected[picked], atol=1e-6)
    assert sample.image_ids.equals(read_embeddings(paths, sample=500, seed=1).image_ids)
    assert not sample.image_ids.equals(read_embeddings(paths, sample=500, seed=2).image_ids)
    # a uniform sample: both files contribute in proportion
    assert 250 < sum(p < 2500 for p in picked) < 420
    assert len(read_embeddings(paths, sample=10_000)) == 3700


def test_read_embeddings_names_what_is_wrong(tmp_path):
    rng = np.random.default_rng(10)
    good = tmp_path / "good.parquet"
    write_shard(embed_table(["a", "b"], rng.standard_normal((2, 8))), good)
    wider = tmp_path / "wider.parquet"
    write_shard(embed_table(["c"], rng.standard_normal((1, 16))), wider)
    with pytest.raises(ValueError, match=r"wider.parquet: embeddings of dimension 16, earlier .*8"):
        read_embeddings([good, wider])
    other = tmp_path / "other.parquet"
    write_shard(pa.table({"image_id": ["a"]}), other)
    with pytest.raises(ValueError, match="other.parquet is not an embed shard: no column part"):
        read_embeddings([other])
    zero = tmp_path / "zero.parquet"
    write_shard(embed_table(["z"], np.zeros((1, 8))), zero)
    with pytest.raises(ValueError, match="zero.parquet: 1 of 1 rows have no direction"):
        read_embeddings([zero])
    with pytest.raises(ValueError, match="no embed shards"):
        read_embeddings([])
