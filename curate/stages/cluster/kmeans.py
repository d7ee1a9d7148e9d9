"""The cluster stage's k-means: spherical k-means of unit embeddings, its default size, and the
assignment of every row to its nearest centroid.

Every vector is a direction (cosine on L2-normalised embeddings, as in DINOv2): inputs are
normalised on the way in, see `curate.core.vectors`. FAISS runs on GPUs when it sees them
(`gpu=None`), see `curate.core.faiss`.

Path to cluster scale (1.2B images, LVD-142M): k-means trains on a sample bounded by
k x max_points_per_centroid (100k x 256 = 25.6M vectors, 100 GB float32 at 1024-d: one 8-GPU
node, or float16 and fewer points per centroid); assignment is one streaming pass of matrix
products per embed part (`assign`), which already parallelises over parts.
"""

import logging
import math

import faiss
import numpy as np

from curate.core.faiss import MIN_POINTS_PER_CENTROID, flat_ip, use_gpu
from curate.core.vectors import BLOCK, check_dim, unit_rows

log = logging.getLogger(__name__)

# LVD-142M: 1.2B crawl images in 100,000 clusters, 12,000 images a cluster.
LVD_IMAGES_PER_CLUSTER = 12_000
# Random starts leave k-means in local minima that merge well-separated clusters (19 of 20 runs
# on 8 planted clusters); k-means++ starts avoid most of them but FAISS's seeding costs about
# n x k x d serially (21 s for 200k x 2,000 x 256 on 2 cores, three iterations' worth), so it
# is the default only where k, and with it the subsample of <= 256 k points, is small.
KMEANS_PLUS_PLUS_MAX = 1024
_INIT_METHODS = {
    "auto": None,
    "random": faiss.ClusteringInitMethod_RANDOM,
    "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
}


def clusters_for(n: int) -> int:
    """Default k-means size for N images: sqrt(N), or N / 12,000 (LVD's 1.2B / 100k) above
    144M images where that is larger; never more than N.

    sqrt(N) balances cluster count against cluster size for small crawls (a 10k-image demo gets
    100 clusters of ~100); the LVD ratio takes over where sqrt would make clusters of more than
    12,000 images, and gives exactly the paper's 100,000 clusters at 1.2B.
    """
    if n < 1:
        raise ValueError(f"clusters_for needs at least one image, got n = {n}")
    k = max(math.sqrt(n), n / LVD_IMAGES_PER_CLUSTER)
    return max(1, min(n, int(round(k))))


def train_kmeans(
    sample: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    gpu: bool | None = None,
    init: str = "auto",
    nredo: int = 1,
) -> np.ndarray:
    """Spherical k-means centroids (float32 [k, d], unit rows) of `sample` (normalised first).

    FAISS subsamples to k x max_points_per_centroid points itself; raises ValueError when
    k > len(sample). init: "random" (FAISS's default), "kmeans++", or "auto" = k-means++ up to
    KMEANS_PLUS_PLUS_MAX clusters. nredo: runs from different starts, the best kept.
    """
    if init not in _INIT_METHODS:
        raise ValueError(f"init must be one of {', '.join(_INIT_METHODS)}, got {init!r}")
    x = unit_rows(sample, "k-means sample")
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got k = {k}")
    if k > n:
        raise ValueError(f"k-means with k = {k} clusters needs at least {k} vectors, got {n}")
    if n < MIN_POINTS_PER_CENTROID * k:
        log.warning(
            "k-means: %d vectors for %d clusters (< %d a cluster)", n, k, MIN_POINTS_PER_CENTROID
        )
    return spherical_kmeans(
        x,
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        gpu=gpu,
        init=init,
        nredo=nredo,
    )


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    max_points_per_centroid: int = 256,
    gpu: bool | None,
    init: str = "auto",
    nredo: int = 1,
) -> np.ndarray:
    """train_kmeans on unit rows, unchecked: resampling steps and upper levels of a hierarchy
    have few points per cluster by design."""
    n, d = x.shape
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # train_kmeans's warning replaces FAISS's stderr print
        gpu=use_gpu(gpu),
        verbose=False,
        nredo=nredo,
        init_method=_INIT_METHODS[
            ("kmeans++" if k <= KMEANS_PLUS_PLUS_MAX else "random") if init == "auto" else init
        ],
    )
    kmeans.train(x)
    # FAISS re-normalises after each update, but a cluster split after going empty is not.
    return unit_rows(kmeans.centroids, "k-means centroids")


def assign(
    x: np.ndarray, centroids: np.ndarray, *, batch: int = BLOCK, gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (cluster_id int32 [n], distance float32 [n] = 1 - cosine).

    Rows are normalised a batch at a time, so `x` may be a float16 memmap.
    """
    c = unit_rows(centroids, "centroids")
    x = np.asarray(x)
    check_dim(x, c.shape[1], "vectors to assign")
    index = flat_ip(c.shape[1], use_gpu(gpu))
    index.add(c)
    ids = np.empty(len(x), np.int32)
    distances = np.empty(len(x), np.float32)
    for start in range(0, len(x), batch):
        sims, nearest = index.search(unit_rows(x[start : start + batch], "vectors to assign"), 1)
        ids[start : start + batch] = nearest[:, 0]
        distances[start : start + batch] = 1.0 - sims[:, 0]
    return ids, distances
