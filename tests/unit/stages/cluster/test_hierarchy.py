"""Hierarchical k-means and balanced sampling, on small planted data."""

import numpy as np
import pytest

from curate.stages.cluster.hierarchy import (
    Hierarchy,
    allocate_budget,
    balanced_sample,
    even_split,
    hierarchical_kmeans,
)
from curate.stages.cluster.kmeans import assign
from tests.unit.stages.cluster.conftest import planted


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
