"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024): the clusters
behind `balanced:N` retrieval, and how a budget is spread over them.

Path to cluster scale (1.2B images, LVD-142M): the first level at 100k+ clusters is the
distributed k-means of Vo et al.; higher levels cluster centroids only and fit in one GPU.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.core.atomic import atomic_path
from curate.core.storage import fetch
from curate.core.vectors import BLOCK, unit_rows
from curate.stages.cluster.kmeans import assign, spherical_kmeans


@dataclass
class Hierarchy:
    """Centroids of each level, finest first, and every centroid's cluster one level up."""

    centroids: list[np.ndarray]  # level l: float32 [k_l, d]
    parents: list[np.ndarray] = field(default_factory=list)  # level l: int32 [k_l] into l + 1

    def __post_init__(self) -> None:
        if not self.centroids:
            raise ValueError("a hierarchy needs at least one level")
        if len(self.parents) != len(self.centroids) - 1:
            raise ValueError(
                f"{len(self.centroids)} levels need {len(self.centroids) - 1} parent arrays, "
                f"got {len(self.parents)}"
            )
        dims = {c.shape[1] for c in self.centroids}
        if len(dims) != 1:
            raise ValueError(f"hierarchy levels have different dimensions: {sorted(dims)}")
        for level, parent in enumerate(self.parents):
            upper = len(self.centroids[level + 1])
            if len(parent) != len(self.centroids[level]) or (
                len(parent) and (parent.min() < 0 or parent.max() >= upper)
            ):
                raise ValueError(f"level {level}'s parents do not index level {level + 1}")

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.centroids]

    def leaf_paths(self) -> np.ndarray:
        """int32 [k_0, levels]: each finest cluster's id at every level."""
        paths = np.empty((len(self.centroids[0]), self.levels), np.int32)
        paths[:, 0] = np.arange(len(self.centroids[0]))
        for level, parent in enumerate(self.parents):
            paths[:, level + 1] = parent[paths[:, level]]
        return paths

    def assign(self, x: np.ndarray, *, batch: int = BLOCK, gpu: bool | None = None) -> np.ndarray:
        """int32 [n, levels]: each row's cluster at every level (nearest finest centroid, then
        its ancestors)."""
        leaves, _ = assign(x, self.centroids[0], batch=batch, gpu=gpu)
        return self.leaf_paths()[leaves]

    def save(self, path: Path) -> None:
        """Write as .npz (to `path` exactly: no suffix is added), whole or not at all."""
        arrays = {f"centroids_{i}": c for i, c in enumerate(self.centroids)}
        arrays.update({f"parents_{i}": p for i, p in enumerate(self.parents)})
        # Through a file handle: np.savez given a name would append .npz to the temporary one.
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, levels=np.int64(self.levels), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Hierarchy":
        """Read what `save` wrote."""
        with np.load(fetch(path), allow_pickle=False) as data:
            levels = int(data["levels"])
            return cls(
                [data[f"centroids_{i}"] for i in range(levels)],
                [data[f"parents_{i}"] for i in range(levels - 1)],
            )


def _closest_per_cluster(
    cluster_ids: np.ndarray, distances: np.ndarray, per_cluster: int
) -> np.ndarray:
    """Row indices of the `per_cluster` rows nearest their centroid in every cluster."""
    order = np.lexsort((distances, cluster_ids))
    sorted_ids = cluster_ids[order]
    first = np.searchsorted(sorted_ids, sorted_ids, side="left")
    return order[np.arange(len(order)) - first < per_cluster]


def _kmeans_level(
    x: np.ndarray,
    k: int,
    *,
    resampling_steps: int,
    per_cluster: int,
    niter: int,
    seed: int,
    gpu: bool | None,
) -> np.ndarray:
    """One level of Vo et al.'s algorithm: k-means, then `resampling_steps` times k-means again
    on the `per_cluster` points nearest each centroid.

    Resampling gives every cluster the same weight in the next fit, so centroids drift out of
    dense regions towards an even cover of the data's modes. Skipped when per_cluster <= 1.
    """
    centroids = spherical_kmeans(x, k, niter=niter, seed=seed, gpu=gpu)
    if per_cluster <= 1:
        return centroids
    for step in range(resampling_steps):
        cluster_ids, distances = assign(x, centroids, gpu=gpu)
        resampled = x[_closest_per_cluster(cluster_ids, distances, per_cluster)]
        if len(resampled) < k:
            break  # fewer points than clusters: nothing left to refine
        centroids = spherical_kmeans(resampled, k, niter=niter, seed=seed + 1 + step, gpu=gpu)
    return centroids


def hierarchical_kmeans(
    sample: np.ndarray,
    level_sizes: Sequence[int],
    *,
    resampling_steps: int = 10,
    resample_per_cluster: Sequence[int] | int | None = None,
    niter: int = 20,
    seed: int = 0,
    gpu: bool | None = None,
) -> Hierarchy:
    """Hierarchical k-means with resampling (Vo et al. 2024, algorithm 1).

    Level 1 clusters `sample` into level_sizes[0]; level l + 1 clusters level l's centroids into
    level_sizes[l]. resample_per_cluster: points kept per cluster in each resampling step, per
    level or one for all; default half the level's mean cluster size, as in the paper's configs.
    """
    x = unit_rows(sample, "hierarchical k-means sample")
    sizes = [int(k) for k in level_sizes]
    if not sizes:
        raise ValueError("hierarchical k-means needs at least one level size")
    if any(k < 1 for k in sizes) or any(b > a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(f"level sizes must be >= 1 and non-increasing, got {sizes}")
    if sizes[0] > len(x):
        raise ValueError(f"level 1 has {sizes[0]} clusters but the sample only {len(x)} vectors")
    if resample_per_cluster is None or isinstance(resample_per_cluster, int):
        per_level = [resample_per_cluster] * len(sizes)
    else:
        per_level = list(resample_per_cluster)
        if len(per_level) != len(sizes):
            raise ValueError(f"{len(per_level)} resample sizes for {len(sizes)} levels")
    centroids: list[np.ndarray] = []
    parents: list[np.ndarray] = []
    points = x
    for level, (k, per_cluster) in enumerate(zip(sizes, per_level, strict=True)):
        if per_cluster is None:
            per_cluster = len(points) // (2 * k)
        level_centroids = _kmeans_level(
            points,
            k,
            resampling_steps=resampling_steps,
            per_cluster=per_cluster,
            niter=niter,
            seed=seed + 1000 * level,
            gpu=gpu,
        )
        if centroids:
            parents.append(assign(centroids[-1], level_centroids, gpu=gpu)[0])
        centroids.append(level_centroids)
        points = level_centroids
    return Hierarchy(centroids, parents)


def water_level(sizes: np.ndarray, total: int) -> int:
    """The largest t with sum(min(sizes, t)) <= total (sizes >= 0)."""
    lo, hi = 0, int(sizes.max()) if len(sizes) else 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= total:
            lo = mid
        else:
            hi = mid - 1
    return lo


def even_split(sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split `total` over groups of `sizes` as evenly as they allow: each gets min(size, t) or
    t + 1, with the room small groups leave given to the others; random ties from `rng`."""
    sizes = np.asarray(sizes, np.int64)
    if total >= sizes.sum():
        return sizes.copy()
    level = water_level(sizes, total)
    alloc = np.minimum(sizes, level)
    rest = int(total - alloc.sum())
    if rest:
        alloc[rng.choice(np.flatnonzero(sizes > level), rest, replace=False)] += 1
    return alloc


def allocate_budget(
    unit_paths: np.ndarray, unit_sizes: np.ndarray, budget: int, *, seed: int = 0
) -> np.ndarray:
    """How many rows to take from each unit (a leaf cluster, identified by its path [u, levels],
    top level last): the budget spread evenly over the top-level clusters, each cluster's share
    spread evenly over its children, down to the units."""
    paths = np.asarray(unit_paths)
    if paths.ndim == 1:
        paths = paths[:, None]
    sizes = np.asarray(unit_sizes, np.int64)
    rng = np.random.default_rng(seed)
    order = np.lexsort(paths.T)  # the last column (top level) is the primary key
    paths, sorted_sizes = paths[order], sizes[order]
    nodes = [(0, len(paths), int(min(budget, sizes.sum())))]  # (first unit, end, target)
    for level in range(paths.shape[1] - 1, -1, -1):
        change = np.any(paths[1:, level:] != paths[:-1, level:], axis=1)
        starts = np.concatenate([[0], np.flatnonzero(change) + 1, [len(paths)]])
        group_sizes = np.add.reduceat(sorted_sizes, starts[:-1]) if len(paths) else sorted_sizes
        children = []
        for first, end, target in nodes:
            lo, hi = np.searchsorted(starts, [first, end])
            shares = even_split(group_sizes[lo:hi], target, rng)
            children.extend(
                (int(a), int(b), int(t))
                for a, b, t in zip(starts[lo:hi], starts[lo + 1 : hi + 1], shares, strict=True)
                if t > 0
            )
        nodes = children
    alloc_sorted = np.zeros(len(paths), np.int64)
    for first, end, target in nodes:
        # level 0 groups by every column: a node is a run of identical paths; split it too.
        alloc_sorted[first:end] = even_split(sorted_sizes[first:end], target, rng)
    alloc = np.empty_like(alloc_sorted)
    alloc[order] = alloc_sorted
    return alloc


def balanced_sample(paths: np.ndarray, budget: int, *, seed: int = 0) -> np.ndarray:
    """Row indices (sorted) of a hierarchically balanced sample of min(budget, n) rows.

    paths: int [n, levels] cluster path of every row (finest level first, as Hierarchy.assign
    gives). The budget is spread evenly over top-level clusters, unused room of small clusters
    going to the others, recursively down to the leaves; rows are random within a leaf.
    """
    paths = np.asarray(paths)
    if paths.ndim == 1:
        paths = paths[:, None]
    if paths.ndim != 2:
        raise ValueError(f"paths must be [n, levels], got shape {paths.shape}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = len(paths)
    if budget >= n:
        return np.arange(n, dtype=np.int64)
    units, unit_of_row, unit_sizes = np.unique(
        paths, axis=0, return_inverse=True, return_counts=True
    )
    alloc = allocate_budget(units, unit_sizes, budget, seed=seed)
    rng = np.random.default_rng([seed, 1])
    order = np.argsort(unit_of_row.ravel(), kind="stable")
    starts = np.concatenate([[0], np.cumsum(unit_sizes)])
    picked = [
        rng.choice(order[starts[u] : starts[u + 1]], alloc[u], replace=False)
        for u in np.flatnonzero(alloc)
    ]
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
