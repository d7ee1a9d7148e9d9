"""k-means and assignment, on small planted data."""

import numpy as np
import pytest

from curate.core.vectors import unit_rows
from curate.stages.cluster.kmeans import assign, clusters_for, train_kmeans
from tests.unit.stages.cluster.conftest import planted


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
