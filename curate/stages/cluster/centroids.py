"""The cluster stage's work: centroids fitted once on a bounded sample, then every embed part
assigned to its nearest centroid in its own task.

Training memory is bounded by k × points_per_centroid vectors whatever the crawl size (faiss
subsamples to the same bound); assignment streams part by part, so 1.2B images cost one pass of
matrix products against the centroids, spread over the cluster's workers.
"""

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.core import storage
from curate.core.atomic import atomic_path
from curate.core.shards import PartResult, ShardRef, shard_name, write_shard
from curate.core.storage import fetch, parquet_file
from curate.core.vectors import read_embeddings
from curate.stages.cluster.hierarchy import Hierarchy, hierarchical_kmeans
from curate.stages.cluster.kmeans import assign, clusters_for, train_kmeans
from schemas.shards import CLUSTER

CENTROIDS = "centroids.npy"
HIERARCHY = "hierarchy.npz"


def embedded_rows(paths: list[Path]) -> int:
    """Rows of the EMBED shards, from their footers."""
    return sum(parquet_file(path).metadata.num_rows for path in paths)


def fit_centroids(
    embed_paths: list[Path],
    out_dir: Path,
    *,
    n_clusters: int | None,
    niter: int,
    points_per_centroid: int,
    seed: int,
) -> dict:
    """Fit the spherical k-means centroids and save them in `out_dir` (kept if already there:
    a resumed stage assigns against the very centroids its committed parts used)."""
    path = out_dir / CENTROIDS
    rows = embedded_rows(embed_paths)
    if rows == 0:
        raise ValueError("nothing to cluster: the embed stage produced no embeddings")
    k = min(n_clusters or clusters_for(rows), rows)
    if not storage.exists(path):
        started = time.perf_counter()
        sample = read_embeddings(embed_paths, sample=k * points_per_centroid, seed=seed)
        centroids = train_kmeans(
            sample.vectors, k, niter=niter, seed=seed, max_points_per_centroid=points_per_centroid
        )
        # Through a file handle: np.save given a name would append .npy to the temporary one.
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, centroids.astype(np.float32))
        seconds = time.perf_counter() - started
    else:
        seconds = 0.0
    return {"n_clusters": k, "images": rows, "train_seconds": round(seconds, 3)}


def default_levels(rows: int, n_clusters: int | None) -> list[int]:
    """Cluster counts of a hierarchy for balanced sampling: the job's k-means size at the
    finest level, then ~10× coarser at each level up."""
    levels = [max(1, min(rows, n_clusters or clusters_for(rows)))]
    while levels[-1] > 10:
        levels.append(max(1, levels[-1] // 10))
    return levels


def fit_hierarchy(
    embed_paths: list[Path],
    out_dir: Path,
    *,
    levels: list[int] | None,
    n_clusters: int | None,
    niter: int,
    points_per_centroid: int,
    seed: int,
) -> dict:
    """Fit the hierarchical k-means behind `balanced:N` policies (kept if already there)."""
    path = out_dir / HIERARCHY
    rows = embedded_rows(embed_paths)
    levels = [min(k, rows) for k in (levels or default_levels(rows, n_clusters))]
    if not storage.exists(path):
        sample = read_embeddings(embed_paths, sample=levels[0] * points_per_centroid, seed=seed)
        hierarchy = hierarchical_kmeans(sample.vectors, levels, niter=niter, seed=seed)
        # Whole or not at all (Hierarchy.save is atomic): an existing file is reused as is by a
        # resumed stage.
        hierarchy.save(path)
    return {"balanced_levels": levels}


def load_hierarchy(out_dir: Path) -> Hierarchy:
    return Hierarchy.load(out_dir / HIERARCHY)


def cluster_part(part: ShardRef, centroids_path: Path, out_dir: Path) -> PartResult:
    """Assign one embed part's images to their nearest centroids."""
    started = time.perf_counter()
    embedded = read_embeddings([part.path])
    centroids = np.load(fetch(centroids_path))
    cluster_ids, distances = assign(embedded.vectors, centroids)
    table = pa.table(
        {
            "image_id": pa.array(embedded.image_ids, pa.string()),
            "part": pa.array(embedded.parts, pa.int32()),
            "item": pa.array(embedded.items, pa.int32()),
            "cluster_id": pa.array(cluster_ids, pa.int32()),
            "distance": pa.array(distances, pa.float32()),
        },
        schema=CLUSTER,
    )
    info = write_shard(table, out_dir / shard_name(part.index))
    return PartResult(
        part=part.index,
        rows_in=table.num_rows,
        rows_out=table.num_rows,
        shards={"data": info},
        seconds=time.perf_counter() - started,
    )
