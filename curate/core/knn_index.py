"""The kNN index over unit vectors: exact (IndexFlatIP) up to a size, IVF-PQ above it with the
PQ shortlist re-scored by exact cosine.

One implementation serves retrieval's crawl index (`create` with its defaults: nprobe 64,
shortlist 16 x k) and dedup's copy graph (`curate.stages.dedup.knn_graph`, with its own nlist,
pq_m and nprobe, rows scored as given): training on a sample, adding in blocks, moving to GPUs,
searching, exact re-ranking, save and load.

Path to cluster scale (1.2B images, LVD-142M):
- Built: retrieval's crawl index is sharded by id range (`curate/stages/retrieve/crawl_index.py`):
  this class trains one empty index on a sample (`train`), each shard is a copy of it holding a
  run of the crawl's embed shards, built and searched by an actor of its own (a GPU share when
  the cluster has GPUs), and every query's per-shard k best are merged, so neither the codes
  nor the keys are ever in one process. At 96 bytes a code 1.2B images are ~115 GB of codes
  + 10 GB of ids, spread over 120 shards of 10M by default.
- Not built: exact re-ranking reads the in-memory float16 copy kept here (2d bytes a vector:
  2.5 KiB at 1280-d, ~25 GB a 10M shard), which dominates a shard's memory; it should read the
  shortlist's vectors from the embed shards (by part and item) or an on-disk float16 memmap.
  Dedup's copy graph (`curate.stages.dedup.knn_graph`) still builds one index in one task.
"""

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from curate.core.atomic import atomic_path
from curate.core.faiss import (
    GPU_PQ_M,
    MIN_POINTS_PER_CENTROID,
    flat_ip,
    gpu_pq_ok,
    to_gpus,
    use_gpu,
)
from curate.core.storage import fetch
from curate.core.vectors import BLOCK, check_dim, unit_rows

log = logging.getLogger(__name__)

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
# Coarse k-means training points per inverted list: FAISS wants >= 39 and subsamples above 256.
TRAIN_PER_LIST = 64
_RERANK_ELEMENTS = 1 << 24  # query block x shortlist x d re-scored per search block
_RESCORE_CHUNK = 1 << 15  # pairs re-scored at once: 2 x 32k x 512 float32 = 128 MiB

_NO_COPY = (
    "re-ranking needs a copy of the indexed vectors: create the index with rerank >= 1 before "
    "adding them (or set rerank = 0 for PQ scores)"
)
Block = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # start, query rows, scores, ids


def ivf_params(n: int, d: int) -> tuple[int, int, int]:
    """(nlist, pq_m, nprobe) defaults for N vectors of dimension d; see DEFAULT_NPROBE's note
    for the measured curve they come from."""
    if n < 1 or d < 1:
        raise ValueError(f"ivf_params needs n, d >= 1, got n = {n}, d = {d}")
    nlist = 1 << max(0, int(round(math.log2(4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // MIN_POINTS_PER_CENTROID or 1))
    return nlist, default_pq_m(d), min(DEFAULT_NPROBE, nlist)


def default_pq_m(d: int) -> int:
    """Sub-quantizers of >= 8 dimensions each, the most FAISS GPU IVF-PQ supports for d (so
    one index file loads on either device): 96 at 768-d, 64 at 1024-d and 1280-d (ViT-H).

    Only 768-d is measured (bench/index.py); at 1280-d, 20 dimensions a sub-quantizer may need
    a longer re-ranking shortlist: `bench/index.py --recall-d 1280 --pq-m 64` measures it."""
    gpu_ok = [m for m in GPU_PQ_M if m <= max(1, d // 8) and gpu_pq_ok(d, m)]
    if gpu_ok:
        return max(gpu_ok)
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def sample_rows(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A uniform sample of `size` rows of `x` without replacement (all of it when size >= len),
    as float32, for training: sorted rows read a memmap in order."""
    if size >= len(x):
        return np.ascontiguousarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return np.ascontiguousarray(x[rows], dtype=np.float32)


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
        on_gpu: bool,
        normalize: bool = True,
    ) -> None:
        self._index = index  # on the host until trained, then on GPUs when `on_gpu`
        self.kind = kind
        self.d = int(index.d)
        self.nlist, self.pq_m = nlist, pq_m
        self.rerank = rerank
        self.on_gpu = on_gpu
        self.normalize = normalize
        # The added vectors, for re-ranking: float16 copies of the unit rows when normalising,
        # else the caller's arrays themselves (a memmap stays on disk).
        self._chunks: list[np.ndarray] = []
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
        normalize: bool = True,
    ) -> "KnnIndex":
        """An empty index for about n_expected vectors of dimension d.

        rerank: IVF-PQ only; search takes rerank x k PQ candidates and re-scores them with
        exact cosine on the stored vectors (a float16 copy: 2d bytes a vector); 0 = PQ scores.
        normalize: rows are scaled to unit norm on the way in (a copy). False: rows are unit
        already and are indexed, scored and kept for re-ranking exactly as given (float32 for
        FAISS), so thresholds apply to the cosine of the caller's own vectors.
        """
        if d < 1:
            raise ValueError(f"dimension must be >= 1, got {d}")
        on_gpu = use_gpu(gpu)
        if n_expected <= flat_max:
            index = faiss.IndexFlatIP(d)
            return cls(
                to_gpus(index, float16=False) if on_gpu else index,
                kind="flat",
                nlist=None,
                pq_m=None,
                nprobe=None,
                rerank=0,
                on_gpu=on_gpu,
                normalize=normalize,
            )
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
            on_gpu=on_gpu,
            normalize=normalize,
        )

    @property
    def needs_training(self) -> bool:
        return not self._index.is_trained

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def exact(self) -> bool:
        """Flat search: FAISS's similarities are already exact, nothing needs re-scoring."""
        return self.kind == "flat"

    @property
    def train_size(self) -> int:
        """How many vectors `train` should get: TRAIN_PER_LIST per inverted list (0 when flat);
        it grows with nlist, so a fixed sample size would starve large indexes."""
        return 0 if self.exact else TRAIN_PER_LIST * int(self.nlist or 0)

    @property
    def nprobe(self) -> int | None:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        """Inverted lists visited per query (IVF only): recall against speed."""
        self._nprobe = None if self.exact else int(value or DEFAULT_NPROBE)
        if self._nprobe is not None:
            space = faiss.GpuParameterSpace() if self._on_device() else faiss.ParameterSpace()
            space.set_index_parameter(self._index, "nprobe", self._nprobe)

    def _on_device(self) -> bool:
        return self.on_gpu and not isinstance(self._index, faiss.IndexIVFPQ | faiss.IndexFlatIP)

    def _rows(self, x: np.ndarray, what: str) -> np.ndarray:
        """Rows as FAISS takes them: unit float32 (a copy), or float32 as given."""
        return unit_rows(x, what) if self.normalize else np.ascontiguousarray(x, np.float32)

    def _keeps_vectors(self) -> bool:
        return not self.exact and self.rerank >= 1

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse quantizer and PQ codebooks (IVF-PQ) on a sample of >= nlist vectors."""
        if not self.needs_training:
            return
        x = self._rows(sample, "index training sample")
        check_dim(x, self.d, "training vectors")
        if len(x) < self.nlist:
            raise ValueError(
                f"IVF-PQ with nlist = {self.nlist} needs >= {self.nlist} training vectors "
                f"(>= {MIN_POINTS_PER_CENTROID * self.nlist} advised), got {len(x)}"
            )
        log.info("training IVF%d,PQ%d on %d vectors", self.nlist, self.pq_m, len(x))
        if self.on_gpu:
            # Coarse k-means is the expensive part of training: its assignments run on the GPUs.
            # The index itself is trained once on the host and only then sharded over the
            # GPUs, so all shards share one quantizer.
            self._index.clustering_index = flat_ip(self.d, gpu=True)
        self._index.train(x)
        if self.on_gpu:
            self._index = to_gpus(self._index, float16=True)
        self.nprobe = self._nprobe

    def add(self, x: np.ndarray, *, batch: int = BLOCK) -> None:
        """Append rows (normalised unless `normalize` is off); their ids are their insertion
        order. Memory is one batch beyond the index (and the float16 copy for re-ranking)."""
        if self.needs_training:
            raise RuntimeError("this IVF-PQ index must be trained before vectors are added")
        x = np.asarray(x)
        check_dim(x, self.d, "vectors to add")
        for start in range(0, len(x), batch):
            rows = self._rows(x[start : start + batch], "vectors to add")
            self._index.add(rows)
            if self._keeps_vectors() and self.normalize:
                self._chunks.append(rows.astype(np.float16))
        if self._keeps_vectors() and not self.normalize and len(x):
            self._chunks.append(x)
        self._stored = None

    def _vectors(self) -> np.ndarray:
        """The added vectors as one array (no copy when they were added at once)."""
        if self._stored is None:
            if len(self._chunks) == 1:
                self._stored = self._chunks[0]
            elif self._chunks:
                self._stored = np.concatenate(self._chunks)
            else:
                self._stored = np.empty((0, self.d), np.float16)
            self._chunks = [self._stored] if self._chunks else []
        return self._stored

    @property
    def vectors(self) -> np.ndarray:
        """The indexed vectors that re-ranking scores against (IVF-PQ with rerank >= 1)."""
        vectors = self._vectors()
        if len(vectors) != self.ntotal:
            raise RuntimeError(_NO_COPY)
        return vectors

    def search_blocks(self, q: np.ndarray, n: int, *, batch: int = BLOCK) -> Iterator[Block]:
        """FAISS's n best candidates of each block of queries, not re-scored: (start, the
        block's rows as searched, scores float32 [b, n], ids int64 [b, n]); scores are PQ
        estimates for IVF-PQ, exact cosines for flat; ids -1 past the last hit."""
        q = np.asarray(q)
        check_dim(q, self.d, "queries")
        if self.needs_training:
            raise RuntimeError("this IVF-PQ index is not trained and holds nothing to search")
        return self._search_blocks(q, n, batch)

    def _search_blocks(self, q: np.ndarray, n: int, batch: int) -> Iterator[Block]:
        for start in range(0, len(q), batch):
            rows = self._rows(q[start : start + batch], "queries")
            sims, ids = self._index.search(rows, n)
            yield start, rows, sims, ids

    def cosine(self, rows: np.ndarray, local: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact cosine of the pairs (rows[local], indexed vector ids), a bounded chunk at a
        time: float32 [len(ids)]. rows: queries as `search_blocks` gave them."""
        vectors = self.vectors
        out = np.empty(len(ids), dtype=np.float32)
        for start in range(0, len(ids), _RESCORE_CHUNK):
            stop = start + _RESCORE_CHUNK
            q = rows[local[start:stop]].astype(np.float32)
            r = vectors[ids[start:stop]].astype(np.float32)
            out[start:stop] = np.einsum("ij,ij->i", q, r)
        return out

    def search(self, q: np.ndarray, k: int, *, batch: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar indexed vectors of each query: (cosine float32 [nq, k], ids int64
        [nq, k]), best first; ids -1 and similarity -inf past the last hit."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rerank = not self.exact and self.rerank >= 1
        shortlist = k * self.rerank if rerank else k
        if rerank:
            batch = max(1, min(batch, _RERANK_ELEMENTS // (shortlist * self.d)))
        blocks = self.search_blocks(q, shortlist, batch=batch)  # checks the queries first
        if rerank and len(self._vectors()) != self.ntotal:
            raise RuntimeError(_NO_COPY)
        sims = np.empty((len(q), k), np.float32)
        ids = np.empty((len(q), k), np.int64)
        for start, rows, block_sims, block_ids in blocks:
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
        n_rows, n_candidates = candidates.shape
        local = np.repeat(np.arange(n_rows), n_candidates)
        exact = self.cosine(rows, local, np.maximum(candidates, 0).ravel())
        exact = exact.reshape(n_rows, n_candidates)
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
            "rerank": None if self.exact else self.rerank,
            "ntotal": self.ntotal,
            "gpu": self.on_gpu,
        }

    def save(self, path: Path) -> None:
        """One .npz file at `path` exactly, whole or not at all: the FAISS index, the
        re-ranking copy, the settings."""
        index = faiss.index_gpu_to_cpu(self._index) if self._on_device() else self._index
        meta = {k: v for k, v in self.describe().items() if k not in ("ntotal", "gpu")}
        meta["normalize"] = self.normalize
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                meta=np.array(json.dumps(meta)),
                index=faiss.serialize_index(index),
                vectors=np.empty((0, self.d)) if self.exact else self._vectors(),
            )

    @classmethod
    def load(cls, path: Path, *, gpu: bool | None = None) -> "KnnIndex":
        """Read what `save` wrote, onto GPUs when FAISS sees them (gpu=None)."""
        with np.load(fetch(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            cpu_index = faiss.deserialize_index(data["index"])
            vectors = data["vectors"]
        on_gpu = use_gpu(gpu)
        loaded = cls(
            to_gpus(cpu_index, float16=meta["kind"] != "flat") if on_gpu else cpu_index,
            kind=meta["kind"],
            nlist=meta["nlist"],
            pq_m=meta["pq_m"],
            nprobe=meta["nprobe"],
            rerank=meta["rerank"] or 0,
            on_gpu=on_gpu,
            normalize=meta.get("normalize", True),
        )
        if not loaded.exact and len(vectors):
            loaded._chunks = [vectors]
        return loaded
