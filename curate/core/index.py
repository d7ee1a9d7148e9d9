"""FAISS over the crawl's embeddings: spherical k-means, hierarchical k-means with balanced
sampling (Vo et al. 2024), and the kNN index that seed images search.

Every vector here is a direction: cosine similarity on L2-normalised embeddings, as in DINOv2.
Inputs are normalised on the way in (a copy; the caller's array is left alone), so float16
embeddings read back from shards, whose norms drift by ~1e-3, need no care from the caller. A row
that cannot be normalised (all zeros, NaN, inf) is a ValueError naming how many rows and which
input: it can only come from a broken embedder, and a silent zero vector would match nothing.

FAISS runs on a GPU when `faiss.get_num_gpus() > 0` and on the CPU otherwise, through the same
calls (`gpu=None` everywhere means "a GPU when FAISS sees one").

Path to cluster scale (1.2B images, LVD-142M), not built here because it cannot be tested on
one CPU machine:
- k-means trains on a sample bounded by k x max_points_per_centroid (100k x 256 = 25.6M
  vectors, 100 GB float32 at 1024-d: one 8-GPU node, or float16 and fewer points per centroid);
  assignment is one streaming pass of matrix products per embed part (`assign`), which already
  parallelises over parts.
- The kNN index becomes sharded IVF-PQ: one coarse quantizer trained once on a sample
  (`KnnIndex.train`), the crawl split into shards by part, each shard's codes added on its own
  GPU (`index_cpu_to_all_gpus(..., shard=True)` within a node, one index file per node across
  nodes), queries broadcast and the per-shard top-k merged. At 96 bytes a code 1.2B images are
  ~115 GB of codes + 10 GB of ids: 2 nodes of 8 x 80 GB.
- Exact re-ranking then reads the shortlist's vectors from the embed shards (by part and item)
  or an on-disk float16 memmap instead of the in-memory copy kept here.
- Hierarchical k-means' first level at 100k+ clusters is the distributed k-means of Vo et al.;
  higher levels cluster centroids only and fit in one GPU.
"""

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# LVD-142M: 1.2B crawl images in 100,000 clusters, 12,000 images a cluster.
LVD_IMAGES_PER_CLUSTER = 12_000
BLOCK = 65_536  # vectors searched or normalised at once: 256 MiB of float32 at 1024-d
EMBED_COLUMNS = ["image_id", "part", "item", "embedding"]
_FAISS_MIN_POINTS = 39  # below this many points per centroid FAISS k-means is unreliable
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

# IVF-PQ defaults, from the recall curve in bench/results/index.md (1M x 768 clustered synthetic
# embeddings, 2,000 held-out queries, recall@4 against exact search, nlist 4096):
# - nlist = 4 sqrt(N) rounded to a power of two (4096 at 1M);
# - PQ scores alone never pass recall@4 0.49 there, so a shortlist of 16 k candidates is
#   re-scored with exact cosine (a shortlist of 4 k: 0.84);
# - pq_m = d/8 (96 at 768-d): with rerank 16, pq_m 64 plateaus at 0.92 whatever nprobe;
# - nprobe = 64: recall@4 0.974 at 966 queries/s on 2 cores (nprobe 32: 0.958, 1,542 q/s;
#   128: 0.980, 545 q/s; exact brute force 21 q/s): the cheapest setting clear of the 0.95
#   target with margin for real lists, which are less even than the benchmark's.
DEFAULT_NPROBE = 64
DEFAULT_RERANK = 16  # shortlist = rerank x k candidates re-scored with exact cosine
PQ_BITS = 8
# What FAISS's GPU IVF-PQ accepts: sub-quantizer counts, and dimensions per sub-quantizer.
_GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
_GPU_PQ_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
# Coarse k-means training points per inverted list: FAISS wants >= 39 and subsamples above 256.
TRAIN_PER_LIST = 64
_RERANK_ELEMENTS = 1 << 24  # query block x shortlist x d gathered at once: 64 MiB float32


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


def use_gpu(gpu: bool | None) -> bool:
    """Whether to run FAISS on GPUs: the request, limited to what FAISS sees."""
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    return available if gpu is None else bool(gpu) and available


def unit_rows(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Rows of `x` as contiguous float32, each scaled to unit L2 norm (a copy).

    Raises ValueError when `x` is not 2-D or a row has no direction (zero, NaN or inf).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, d], got shape {x.shape}")
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise ValueError(
            f"{what}: {int(bad.sum())} of {len(out)} rows have no direction (all zeros, NaN or "
            f"inf), first at row {int(np.flatnonzero(bad)[0])}; embeddings must be finite and "
            "non-zero"
        )
    out /= norms[:, None]
    return out


def _check_dim(x: np.ndarray, d: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what} have dimension {x.shape[1:]} but the index/centroids have {d}")


# -- reading EMBED shards --------------------------------------------------------------------------


@dataclass
class EmbeddingTable:
    """Embeddings with their keys: row i of `vectors` is image `image_ids[i]` at (part, item)."""

    image_ids: pa.Array  # string
    parts: np.ndarray  # int32
    items: np.ndarray  # int32
    vectors: np.ndarray  # float32 [n, d], unit rows

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def slice(self, start: int, stop: int) -> "EmbeddingTable":
        """Rows start..stop (views, no copy)."""
        return EmbeddingTable(
            self.image_ids[start:stop],
            self.parts[start:stop],
            self.items[start:stop],
            self.vectors[start:stop],
        )

    @classmethod
    def concat(cls, tables: Sequence["EmbeddingTable"], dim: int) -> "EmbeddingTable":
        """One table of all rows of `tables` (which all have dimension `dim`)."""
        if not tables:
            return cls(
                pa.array([], pa.string()),
                np.empty(0, np.int32),
                np.empty(0, np.int32),
                np.empty((0, dim), np.float32),
            )
        return cls(
            pa.concat_arrays([t.image_ids for t in tables]),
            np.concatenate([t.parts for t in tables]),
            np.concatenate([t.items for t in tables]),
            np.concatenate([t.vectors for t in tables]),
        )


def _embedding_matrix(column: pa.ChunkedArray | pa.Array, source: str) -> np.ndarray:
    """A list<float16> column as float32 [n, d]; every row must have the same length d."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    blocks = []
    dim = None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"{source}: {chunk.null_count} rows have a null embedding")
        lengths = pc.list_value_length(chunk)
        lo, hi = pc.min_max(lengths).values()
        if lo.as_py() != hi.as_py() or (dim is not None and lo.as_py() != dim):
            raise ValueError(
                f"{source}: embeddings of different dimensions ({lo.as_py()} to {hi.as_py()}"
                f"{'' if dim is None else f', earlier {dim}'}); one embed model per job"
            )
        dim = lo.as_py()
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        blocks.append(values.reshape(len(chunk), dim))
    if not blocks:
        return np.empty((0, 0), np.float32)
    return unit_rows(np.concatenate(blocks) if len(blocks) > 1 else blocks[0], source)


def _embed_file(path: Path) -> pq.ParquetFile:
    handle = pq.ParquetFile(path)
    missing = [c for c in EMBED_COLUMNS if c not in handle.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} is not an embed shard: no column {', '.join(missing)}")
    return handle


def _to_table(batch: pa.RecordBatch | pa.Table, source: str, dim: int | None) -> EmbeddingTable:
    vectors = _embedding_matrix(batch.column("embedding"), source)
    if dim is not None and len(vectors) and vectors.shape[1] != dim:
        raise ValueError(
            f"{source}: embeddings of dimension {vectors.shape[1]}, earlier shards {dim}; "
            "one embed model per job"
        )
    if not len(vectors):
        vectors = np.empty((0, dim or 0), np.float32)
    image_ids = batch.column("image_id")
    if isinstance(image_ids, pa.ChunkedArray):
        image_ids = image_ids.combine_chunks()
    return EmbeddingTable(
        image_ids.cast(pa.string()),
        batch.column("part").to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        batch.column("item").to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        vectors,
    )


def iter_embeddings(paths: Sequence[Path], *, batch_rows: int = BLOCK) -> Iterator[EmbeddingTable]:
    """EMBED shards as tables of at most `batch_rows` rows, in order: memory is one batch."""
    dim = None
    for path in paths:
        handle = _embed_file(Path(path))
        for batch in handle.iter_batches(batch_size=batch_rows, columns=EMBED_COLUMNS):
            table = _to_table(batch, str(path), dim)
            if len(table):
                dim = table.dim
                yield table


def read_embeddings(
    paths: Sequence[Path], *, sample: int | None = None, seed: int = 0
) -> EmbeddingTable:
    """The rows of EMBED shards, vectors as unit float32.

    sample=n: a uniform sample of min(n, N) rows without replacement, the same for the same
    (paths, n, seed); only the row groups holding sampled rows are read, so memory is the
    sample plus one row group whatever N is.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no embed shards to read")
    if sample is None:
        tables = list(iter_embeddings(paths))
        return EmbeddingTable.concat(tables, tables[0].dim if tables else 0)
    if sample < 0:
        raise ValueError(f"sample must be >= 0, got {sample}")
    handles = [_embed_file(p) for p in paths]
    counts = [[h.metadata.row_group(i).num_rows for i in range(h.num_row_groups)] for h in handles]
    total = sum(sum(c) for c in counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(sample, total), replace=False))
    tables, dim, start = [], None, 0
    for path, handle, groups in zip(paths, handles, counts, strict=True):
        for group, rows in enumerate(groups):
            lo, hi = np.searchsorted(chosen, [start, start + rows])
            if hi > lo:
                data = handle.read_row_group(group, columns=EMBED_COLUMNS)
                picked = data.take(pa.array(chosen[lo:hi] - start))
                table = _to_table(picked, str(path), dim)
                dim = table.dim
                tables.append(table)
            start += rows
    return EmbeddingTable.concat(tables, dim or 0)


# -- k-means ---------------------------------------------------------------------------------------


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
    if n < _FAISS_MIN_POINTS * k:
        log.warning("k-means: %d vectors for %d clusters (< %d a cluster)", n, k, _FAISS_MIN_POINTS)
    return _spherical_kmeans(
        x,
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        gpu=gpu,
        init=init,
        nredo=nredo,
    )


def _spherical_kmeans(
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


def _flat_ip(vectors: np.ndarray, gpu: bool) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


def assign(
    x: np.ndarray, centroids: np.ndarray, *, batch: int = BLOCK, gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (cluster_id int32 [n], distance float32 [n] = 1 - cosine).

    Rows are normalised a batch at a time, so `x` may be a float16 memmap.
    """
    c = unit_rows(centroids, "centroids")
    x = np.asarray(x)
    _check_dim(x, c.shape[1], "vectors to assign")
    index = _flat_ip(c, use_gpu(gpu))
    ids = np.empty(len(x), np.int32)
    distances = np.empty(len(x), np.float32)
    for start in range(0, len(x), batch):
        sims, nearest = index.search(unit_rows(x[start : start + batch], "vectors to assign"), 1)
        ids[start : start + batch] = nearest[:, 0]
        distances[start : start + batch] = 1.0 - sims[:, 0]
    return ids, distances


# -- hierarchical k-means and balanced sampling (Vo et al. 2024) -----------------------------------


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
        """Write as .npz (to `path` exactly: no suffix is added)."""
        arrays = {f"centroids_{i}": c for i, c in enumerate(self.centroids)}
        arrays.update({f"parents_{i}": p for i, p in enumerate(self.parents)})
        with open(path, "wb") as handle:
            np.savez(handle, levels=np.int64(self.levels), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Hierarchy":
        """Read what `save` wrote."""
        with np.load(path, allow_pickle=False) as data:
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
    centroids = _spherical_kmeans(x, k, niter=niter, seed=seed, gpu=gpu)
    if per_cluster <= 1:
        return centroids
    for step in range(resampling_steps):
        cluster_ids, distances = assign(x, centroids, gpu=gpu)
        resampled = x[_closest_per_cluster(cluster_ids, distances, per_cluster)]
        if len(resampled) < k:
            break  # fewer points than clusters: nothing left to refine
        centroids = _spherical_kmeans(resampled, k, niter=niter, seed=seed + 1 + step, gpu=gpu)
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


# -- the kNN index ---------------------------------------------------------------------------------


def ivf_params(n: int, d: int) -> tuple[int, int, int]:
    """(nlist, pq_m, nprobe) defaults for N vectors of dimension d; see DEFAULT_NPROBE's note
    for the measured curve they come from."""
    if n < 1 or d < 1:
        raise ValueError(f"ivf_params needs n, d >= 1, got n = {n}, d = {d}")
    nlist = 1 << max(0, int(round(math.log2(4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // _FAISS_MIN_POINTS or 1))
    return nlist, default_pq_m(d), min(DEFAULT_NPROBE, nlist)


def default_pq_m(d: int) -> int:
    """Sub-quantizers of >= 8 dimensions each, the most FAISS GPU IVF-PQ supports for d (so
    one index file loads on either device): 96 at 768-d, 64 at 1024-d and 1280-d (ViT-H).

    Only 768-d is measured (bench/index.py); at 1280-d, 20 dimensions a sub-quantizer may need
    a longer re-ranking shortlist: `bench/index.py --recall-d 1280 --pq-m 64` measures it."""
    gpu_ok = [m for m in _GPU_PQ_M if m <= max(1, d // 8) and d % m == 0 and d // m in _GPU_PQ_DIMS]
    if gpu_ok:
        return max(gpu_ok)
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


class KnnIndex:
    """Inner-product (cosine) index over L2-normalised vectors: exact (IndexFlatIP) up to
    flat_max vectors, IVF-PQ above it with exact re-ranking of the shortlist optional."""

    def __init__(
        self,
        index: faiss.Index,
        *,
        kind: str,
        nlist: int | None,
        pq_m: int | None,
        nprobe: int | None,
        rerank: int,
        gpu: bool,
    ) -> None:
        self._index = index  # on the host until trained, then on GPUs when `gpu`
        self.kind = kind
        self.d = int(index.d)
        self.nlist, self.pq_m = nlist, pq_m
        self.rerank = rerank
        self.gpu = gpu
        self._chunks: list[np.ndarray] = []  # float16 copies of added vectors, for re-ranking
        self._stored: np.ndarray | None = None
        self.nprobe = nprobe

    @classmethod
    def create(
        cls,
        d: int,
        n_expected: int,
        *,
        flat_max: int = 1_000_000,
        nlist: int | None = None,
        pq_m: int | None = None,
        nprobe: int | None = None,
        gpu: bool | None = None,
        rerank: int = DEFAULT_RERANK,
    ) -> "KnnIndex":
        """An empty index for about n_expected vectors of dimension d.

        rerank: IVF-PQ only; search takes rerank x k PQ candidates and re-scores them with
        exact cosine on a float16 copy of the vectors (2d bytes a vector); 0 or 1 = PQ scores.
        """
        if d < 1:
            raise ValueError(f"dimension must be >= 1, got {d}")
        on_gpu = use_gpu(gpu)
        if n_expected <= flat_max:
            index = faiss.IndexFlatIP(d)
            if on_gpu:
                index = faiss.index_cpu_to_all_gpus(index)
            return cls(index, kind="flat", nlist=None, pq_m=None, nprobe=None, rerank=0, gpu=on_gpu)
        default_nlist, default_m, default_nprobe = ivf_params(n_expected, d)
        nlist, pq_m = nlist or default_nlist, pq_m or default_m
        if d % pq_m:
            raise ValueError(f"pq_m = {pq_m} must divide the dimension {d}")
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(d), d, nlist, pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT
        )
        return cls(
            index,
            kind="ivf-pq",
            nlist=nlist,
            pq_m=pq_m,
            nprobe=min(nprobe or default_nprobe, nlist),
            rerank=max(0, int(rerank)),
            gpu=on_gpu,
        )

    @property
    def needs_training(self) -> bool:
        return not self._index.is_trained

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def train_size(self) -> int:
        """How many vectors `train` should get: TRAIN_PER_LIST per inverted list (0 when flat);
        it grows with nlist, so a fixed sample size would starve large indexes."""
        return 0 if self.kind == "flat" else TRAIN_PER_LIST * int(self.nlist or 0)

    @property
    def nprobe(self) -> int | None:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        """Inverted lists visited per query (IVF only): recall against speed."""
        self._nprobe = None if self.kind == "flat" else int(value or DEFAULT_NPROBE)
        if self._nprobe is not None:
            space = faiss.GpuParameterSpace() if self._on_device() else faiss.ParameterSpace()
            space.set_index_parameter(self._index, "nprobe", self._nprobe)

    def _on_device(self) -> bool:
        return self.gpu and not isinstance(self._index, faiss.IndexIVFPQ | faiss.IndexFlatIP)

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse quantizer and PQ codebooks (IVF-PQ) on a sample of >= nlist vectors."""
        if not self.needs_training:
            return
        x = unit_rows(sample, "index training sample")
        _check_dim(x, self.d, "training vectors")
        if len(x) < self.nlist:
            raise ValueError(
                f"IVF-PQ with nlist = {self.nlist} needs >= {self.nlist} training vectors "
                f"(>= {_FAISS_MIN_POINTS * self.nlist} advised), got {len(x)}"
            )
        if self.gpu:
            # Coarse k-means is the expensive part of training: its assignments run on the GPUs.
            self._index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.d))
        self._index.train(x)
        if self.gpu:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16 = True  # PQ lookup tables of 96 sub-quantizers fit shared memory
            options.shard = True  # split the codes over GPUs rather than copy them to each
            self._index = faiss.index_cpu_to_all_gpus(self._index, co=options)
        self.nprobe = self._nprobe

    def add(self, x: np.ndarray, *, batch: int = BLOCK) -> None:
        """Append rows (normalised); their ids are their insertion order."""
        if self.needs_training:
            raise RuntimeError("this IVF-PQ index must be trained before vectors are added")
        x = np.asarray(x)
        _check_dim(x, self.d, "vectors to add")
        for start in range(0, len(x), batch):
            rows = unit_rows(x[start : start + batch], "vectors to add")
            self._index.add(rows)
            if self.kind != "flat" and self.rerank > 1:
                self._chunks.append(rows.astype(np.float16))
                self._stored = None

    def _vectors(self) -> np.ndarray:
        if self._stored is None:
            self._stored = (
                np.concatenate(self._chunks) if self._chunks else np.empty((0, self.d), np.float16)
            )
            self._chunks = [self._stored]
        return self._stored

    def search(self, q: np.ndarray, k: int, *, batch: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar indexed vectors of each query: (cosine float32 [nq, k], ids int64
        [nq, k]), best first; ids -1 and similarity -inf past the last hit."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(q)
        _check_dim(q, self.d, "queries")
        if self.needs_training:
            raise RuntimeError("this IVF-PQ index is not trained and holds nothing to search")
        rerank = self.kind != "flat" and self.rerank > 1
        if rerank and len(self._vectors()) != self.ntotal:
            raise RuntimeError(
                "re-ranking needs a copy of the indexed vectors: create the index with rerank > 1 "
                "before adding them (or set rerank = 0 for PQ scores)"
            )
        shortlist = k * self.rerank if rerank else k
        if rerank:
            batch = max(1, min(batch, _RERANK_ELEMENTS // (shortlist * self.d)))
        sims = np.empty((len(q), k), np.float32)
        ids = np.empty((len(q), k), np.int64)
        for start in range(0, len(q), batch):
            rows = unit_rows(q[start : start + batch], "queries")
            block_sims, block_ids = self._index.search(rows, shortlist)
            if rerank:
                block_sims, block_ids = self._rescore(rows, block_ids, k)
            block_sims[block_ids < 0] = -np.inf
            sims[start : start + len(rows)] = block_sims
            ids[start : start + len(rows)] = block_ids
        return sims, ids

    def _rescore(
        self, rows: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine of each query to its PQ shortlist; the k best, best first."""
        vectors = self._vectors()
        gathered = vectors[np.maximum(candidates, 0)].astype(np.float32)
        exact = np.einsum("qd,qcd->qc", rows, gathered)
        exact[candidates < 0] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return (
            np.take_along_axis(exact, best, axis=1),
            np.take_along_axis(candidates, best, axis=1),
        )

    def describe(self) -> dict:
        """kind, d, nlist, pq_m, nprobe, rerank, ntotal, gpu: for logs and the catalog."""
        return {
            "kind": self.kind,
            "d": self.d,
            "nlist": self.nlist,
            "pq_m": self.pq_m,
            "nprobe": self.nprobe,
            "rerank": self.rerank if self.kind != "flat" else None,
            "ntotal": self.ntotal,
            "gpu": self.gpu,
        }

    def save(self, path: Path) -> None:
        """One .npz file at `path` exactly: the FAISS index, the re-ranking copy, the settings."""
        index = faiss.index_gpu_to_cpu(self._index) if self._on_device() else self._index
        meta = {k: v for k, v in self.describe().items() if k not in ("ntotal", "gpu")}
        with open(path, "wb") as handle:
            np.savez(
                handle,
                meta=np.array(json.dumps(meta)),
                index=faiss.serialize_index(index),
                vectors=self._vectors() if self.kind != "flat" else np.empty((0, self.d)),
            )

    @classmethod
    def load(cls, path: Path, *, gpu: bool | None = None) -> "KnnIndex":
        """Read what `save` wrote, onto GPUs when FAISS sees them (gpu=None)."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            cpu_index = faiss.deserialize_index(data["index"])
            vectors = data["vectors"]
        on_gpu = use_gpu(gpu)
        index = cpu_index
        if on_gpu:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16 = meta["kind"] != "flat"
            options.shard = True
            index = faiss.index_cpu_to_all_gpus(cpu_index, co=options)
        loaded = cls(
            index,
            kind=meta["kind"],
            nlist=meta["nlist"],
            pq_m=meta["pq_m"],
            nprobe=meta["nprobe"],
            rerank=meta["rerank"] or 0,
            gpu=on_gpu,
        )
        if meta["kind"] != "flat" and len(vectors):
            loaded._chunks = [vectors.astype(np.float16, copy=False)]
        return loaded
