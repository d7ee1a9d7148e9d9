"""The kNN index (flat and IVF-PQ with exact re-ranking), on small planted data."""

import faiss
import numpy as np
import pytest

from curate.core.knn_index import KnnIndex, ivf_params
from curate.core.vectors import unit_rows


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
