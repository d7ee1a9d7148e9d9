"""The copy graph: k nearest neighbours of every descriptor, kept where cosine > a threshold.

Exact search (IndexFlatIP) below `exact_below` images, IVF-PQ above it, both through
`curate.core.knn_index.KnnIndex` (the index retrieval searches too) with dedup's own nlist, pq_m
and nprobe; FAISS GPU when one is present, the same calls otherwise. Queries are searched block
by block so memory is bounded by the index plus one block, and IVF-PQ candidates are re-scored
with exact cosine on the stored float16 descriptors, so every threshold applies to true cosine,
never to a PQ estimate.

Descriptors are unit-norm rows (float16 or float32), so inner product = cosine.

Scale. The query side shards today: `copy_edges(map_slices=...)` cuts the queries into slices
searched anywhere (`SliceSearch` pickles with its index, so Ray tasks share one copy of it in
the object store; the dedup stage fans slices out as Ray tasks past 100,000 images), each
slice's edges depend on its rows alone, and the union is deduplicated once. The index side is
one IVF-PQ index: 64-byte codes, ~80 GB for 1.2B images, beyond one worker. The next step is
database shards: one coarse quantizer and PQ trained once on a sample, the rows added to S shard
indexes (faiss IndexShards, or one per worker), each query searching every shard for its k and
keeping the best k overall, which is the same top-k as one index (the re-scoring on exact cosine
already makes scores comparable across shards).
"""

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.core.faiss import MIN_POINTS_PER_CENTROID
from curate.core.knn_index import KnnIndex, sample_rows
from curate.core.vectors import BLOCK

Edges = tuple[np.ndarray, np.ndarray, np.ndarray]  # left int64, right int64, similarity float32

EXACT_BELOW = 200_000
DEFAULT_NPROBE = 32
# PQ inner products are off by a few hundredths on 512-d descriptors; candidates within this
# margin under the threshold are re-scored exactly, the rest are dropped unread.
RERANK_MARGIN = 0.1
_MIN_TRAIN = 50_000


def copy_nlist(n: int) -> int:
    """About 4 sqrt(N) inverted lists: the usual balance of quantizer cost and list length."""
    return max(1, int(round(4 * math.sqrt(n))))


def copy_pq_m(d: int) -> int:
    """64 sub-quantizers (8 dims each, 64 bytes a code, for 512-d); a divisor of d otherwise."""
    return max(m for m in range(1, min(64, d) + 1) if d % m == 0)


def build_index(
    descriptors: np.ndarray,
    *,
    exact_below: int = EXACT_BELOW,
    nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int | None = None,
    train_size: int | None = None,
    block: int = BLOCK,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> KnnIndex:
    """Index unit-norm descriptors [N, d] for inner-product search: flat below `exact_below`,
    IVF-PQ (nlist ~ 4 sqrt N, m = 64 x 8 bits, trained on max(39 nlist, 50k) rows) above.

    The descriptors are scored as given, not re-normalised, and the index re-scores against
    them in place (no copy: they may be a memmap). Its `search` gives exact cosines of the PQ
    top k (a shortlist of k: rerank 1). use_gpu: None = a GPU when FAISS sees one.
    """
    n, d = descriptors.shape
    nlist = nlist or copy_nlist(n)
    index = KnnIndex.create(
        d,
        n,
        flat_max=exact_below - 1,
        nlist=nlist,
        pq_m=pq_m or copy_pq_m(d),
        nprobe=nprobe or DEFAULT_NPROBE,
        gpu=use_gpu,
        rerank=1,
        normalize=False,
    )
    if index.needs_training:
        size = min(n, train_size or max(MIN_POINTS_PER_CENTROID * nlist, _MIN_TRAIN))
        index.train(sample_rows(descriptors, size, seed))
    index.add(descriptors, batch=block)
    return index


def _pair_scores(
    sims: np.ndarray, left: np.ndarray, right: np.ndarray, offsets: np.ndarray | None
) -> np.ndarray:
    if offsets is None:
        return sims
    # Normalised by whichever end sits in the denser background: a pair counts as a copy only
    # if it stands out for both images.
    return sims - np.maximum(offsets[left], offsets[right])


def _dedup_pairs(left: np.ndarray, right: np.ndarray, sims: np.ndarray, n_right: int) -> Edges:
    """One row per (left, right) pair, the highest similarity kept, sorted by (left, right)."""
    order = np.argsort(-sims, kind="stable")
    keys = left[order] * np.int64(max(n_right, 1)) + right[order]
    _, first = np.unique(keys, return_index=True)
    keep = order[first]
    return left[keep], right[keep], sims[keep]


def iter_knn_edges(
    index: KnnIndex,
    queries: np.ndarray,
    k: int = 64,
    threshold: float = 0.6,
    *,
    block: int = BLOCK,
    offset: int = 0,
    exclude_self: bool = True,
    symmetric: bool = True,
    score_offsets: np.ndarray | None = None,
    rerank_margin: float = RERANK_MARGIN,
) -> Iterator[Edges]:
    """Edges of one query block at a time (see `knn_edges`); pairs may repeat across blocks."""
    n_search = min(k + int(exclude_self), index.ntotal)
    if n_search == 0:
        return
    margin = 0.0 if index.exact else rerank_margin
    for start, rows32, sims, cols in index.search_blocks(queries, n_search, batch=block):
        local = np.repeat(np.arange(len(rows32), dtype=np.int64), n_search)
        left = local + (offset + start)
        right = cols.ravel().astype(np.int64)
        sims = sims.ravel()
        keep = right >= 0  # FAISS pads with -1 when a probe finds fewer than k
        if exclude_self or symmetric:  # a self-loop is never an edge
            keep &= right != left
        local, left, right, sims = local[keep], left[keep], right[keep], sims[keep]
        keep = _pair_scores(sims, left, right, score_offsets) > threshold - margin
        local, left, right, sims = local[keep], left[keep], right[keep], sims[keep]
        if not index.exact:
            sims = index.cosine(rows32, local, right)
        sims = _pair_scores(sims, left, right, score_offsets)
        keep = sims > threshold
        left, right, sims = left[keep], right[keep], sims[keep].astype(np.float32)
        if symmetric:
            left, right = np.minimum(left, right), np.maximum(left, right)
            left, right, sims = _dedup_pairs(left, right, sims, index.ntotal)
        yield left, right, sims


def knn_edges(
    index: KnnIndex,
    queries: np.ndarray,
    k: int = 64,
    threshold: float = 0.6,
    block: int = BLOCK,
    offset: int = 0,
    exclude_self: bool = True,
    *,
    score_offsets: np.ndarray | None = None,
    rerank_margin: float = RERANK_MARGIN,
) -> Edges:
    """Copy edges (left < right, unique) among the k nearest neighbours of each query.

    queries: rows offset.. of the indexed set (a worker's slice, or all of it); the self-match is
    dropped and each query still gets k neighbours. score_offsets: per indexed row, SSCD
    background levels (`background_offsets`); when given, the threshold applies to
    cosine - max(offset_left, offset_right) and that is the similarity returned.
    """
    blocks = list(
        iter_knn_edges(
            index,
            queries,
            k,
            threshold,
            block=block,
            offset=offset,
            exclude_self=exclude_self,
            symmetric=True,
            score_offsets=score_offsets,
            rerank_margin=rerank_margin,
        )
    )
    return _dedup_pairs(*_concat(blocks), index.ntotal)


def _concat(blocks: list[Edges]) -> Edges:
    if not blocks:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*blocks, strict=True))  # type: ignore[return-value]


def background_offsets(
    descriptors: np.ndarray,
    background: np.ndarray,
    beta: float = 1.0,
    ranks: tuple[int, int] = (0, 2),
    block: int = BLOCK,
    **index_opts,
) -> np.ndarray:
    """SSCD's per-image background level, beta * mean similarity to background ranks[0..1]."""
    # Imported here so the graph code does not pay torch's import for an optional feature.
    from curate.stages.dedup.copy_detection import normalize_scores

    background_index = build_index(background, block=block, **index_opts)
    # Exact similarities [N, ranks[1] + 1] to the nearest background images, high to low.
    nearest, _ = background_index.search(descriptors, ranks[1] + 1, batch=block)
    return -normalize_scores(np.zeros(len(descriptors), np.float32), nearest, beta, ranks)


# map_slices(search, slices) -> [search(start, stop) for start, stop in slices], in any order
# and anywhere: `search` pickles (the index with it), so Ray tasks can share one copy of it.
MapSlices = Callable[[Callable[[int, int], Edges], list[tuple[int, int]]], Iterable[Edges]]


@dataclass(frozen=True)
class SliceSearch:
    """The kNN search of one slice of the indexed rows against all of them: a unit of work
    that can run on any worker holding the index (see `MapSlices`)."""

    index: KnnIndex
    descriptors: np.ndarray  # the indexed rows, which are also the queries
    k: int
    threshold: float
    block: int
    score_offsets: np.ndarray | None
    rerank_margin: float

    def __call__(self, start: int, stop: int) -> Edges:
        return knn_edges(
            self.index,
            self.descriptors[start:stop],
            self.k,
            self.threshold,
            self.block,
            offset=start,
            score_offsets=self.score_offsets,
            rerank_margin=self.rerank_margin,
        )


def _in_process(search: Callable[[int, int], Edges], slices: list[tuple[int, int]]) -> list:
    return [search(start, stop) for start, stop in slices]


def copy_edges(
    descriptors: np.ndarray,
    k: int = 64,
    threshold: float = 0.6,
    *,
    block: int = BLOCK,
    background: np.ndarray | None = None,
    beta: float = 1.0,
    rerank_margin: float = RERANK_MARGIN,
    map_slices: MapSlices | None = None,
    slice_rows: int | None = None,
    **index_opts,
) -> Edges:
    """Copy edges of a descriptor set with itself: build_index + knn_edges.

    background: descriptors of unrelated images; when given, scores are SSCD-normalised
    against it (see `knn_edges`) and `threshold` must be chosen for normalised scores.
    map_slices, slice_rows: the queries are cut into slices of `slice_rows` rows (default: one
    slice) searched by `map_slices` (default: here, in order); every query's edges depend on
    that query alone, so the edges are the same however the slices are cut and run.
    """
    index = build_index(descriptors, block=block, **index_opts)
    offsets = None
    if background is not None:
        offsets = background_offsets(descriptors, background, beta, block=block, **index_opts)
    search = SliceSearch(index, descriptors, k, threshold, block, offsets, rerank_margin)
    n = len(descriptors)
    step = max(1, slice_rows or n)
    slices = [(start, min(start + step, n)) for start in range(0, n, step)]
    found = list((map_slices or _in_process)(search, slices))
    return _dedup_pairs(*_concat(found), index.ntotal)


def cross_edges(
    queries: np.ndarray,
    references: np.ndarray,
    k: int = 64,
    threshold: float = 0.45,
    *,
    block: int = BLOCK,
    rerank_margin: float = RERANK_MARGIN,
    **index_opts,
) -> Edges:
    """Edges (query row, reference row, cosine) to each query's k nearest references above
    `threshold`: crawl images against an evaluation set."""
    index = build_index(references, block=block, **index_opts)
    blocks = iter_knn_edges(
        index,
        queries,
        k,
        threshold,
        block=block,
        exclude_self=False,
        symmetric=False,
        rerank_margin=rerank_margin,
    )
    return _concat(list(blocks))


def _closest_eval_in_component(
    crawl_desc: np.ndarray,
    eval_desc: np.ndarray,
    crawl_rows: np.ndarray,
    crawl_labels: np.ndarray,
    eval_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """For crawl rows with no direct edge to an eval image: the most similar eval image among
    their component's members, by exact cosine."""
    names = np.empty(len(crawl_rows), np.int64)
    sims = np.empty(len(crawl_rows), np.float32)
    eval_order = np.argsort(eval_labels, kind="stable")
    sorted_labels = eval_labels[eval_order]
    crawl_order = np.argsort(crawl_labels, kind="stable")
    labels, starts = np.unique(crawl_labels[crawl_order], return_index=True)
    for label, members in zip(labels, np.split(crawl_order, starts[1:]), strict=True):
        lo, hi = np.searchsorted(sorted_labels, [label, label + 1])
        evals = eval_order[lo:hi]
        candidates = eval_desc[evals].astype(np.float32)
        for start in range(0, len(members), 4096):
            chunk = members[start : start + 4096]
            scores = crawl_desc[crawl_rows[chunk]].astype(np.float32) @ candidates.T
            best = scores.argmax(axis=1)
            names[chunk] = evals[best]
            sims[chunk] = scores[np.arange(len(chunk)), best]
    return names, sims


def contamination(
    crawl_desc: np.ndarray,
    eval_desc: np.ndarray,
    threshold: float = 0.45,
    k: int = 64,
    *,
    crawl_edges: Edges | None = None,
    block: int = BLOCK,
    **index_opts,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crawl images to drop as `eval_contamination`: (crawl row, eval row, cosine), by crawl row.

    A crawl image is contaminated when its component in the graph over crawl + eval images with
    edges at cosine > threshold holds an eval image. The eval image named is the one in its
    component most similar to it: its direct neighbour when it has one, else (linked only
    through other crawl images) the closest eval member of the component, whose cosine may then
    be below the threshold.

    crawl_edges: crawl-crawl edges already computed at a threshold <= this one (e.g. the copy
    pass run once at 0.45 and filtered at 0.6 for dedup); searched again when absent.
    """
    n_crawl, n_eval = len(crawl_desc), len(eval_desc)
    if n_crawl == 0 or n_eval == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    if crawl_edges is None:
        crawl_edges = copy_edges(crawl_desc, k, threshold, block=block, **index_opts)
    cl, cr, cs = crawl_edges
    cl, cr = cl[cs > threshold], cr[cs > threshold]
    # Eval-eval edges are left out: they only merge components that already hold an eval image.
    ql, qr, qs = cross_edges(crawl_desc, eval_desc, k, threshold, block=block, **index_opts)
    n = n_crawl + n_eval
    left = np.concatenate([cl, ql])
    right = np.concatenate([cr, qr + n_crawl])
    graph = coo_matrix((np.ones(len(left), np.int8), (left, right)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    crawl_labels, eval_labels = labels[:n_crawl], labels[n_crawl:]
    contaminated = np.flatnonzero(np.isin(crawl_labels, eval_labels))

    names = np.full(n_crawl, -1, np.int64)
    sims = np.full(n_crawl, -np.inf, np.float32)
    # Best direct edge per crawl image: with exact search it is the closest eval image overall.
    order = np.argsort(-qs, kind="stable")
    rows, first = np.unique(ql[order], return_index=True)
    names[rows], sims[rows] = qr[order][first], qs[order][first]
    indirect = contaminated[names[contaminated] < 0]
    if len(indirect):
        names[indirect], sims[indirect] = _closest_eval_in_component(
            crawl_desc, eval_desc, indirect, crawl_labels[indirect], eval_labels
        )
    return contaminated.astype(np.int64), names[contaminated], sims[contaminated]
