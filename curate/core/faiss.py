"""FAISS plumbing shared by k-means, the cluster assignment and the kNN index: whether to run on
GPUs, moving an index onto them, and what FAISS itself accepts (points per centroid, GPU PQ
shapes).

FAISS runs on a GPU when `faiss.get_num_gpus() > 0` and on the CPU otherwise, through the same
calls (`gpu=None` everywhere means "a GPU when FAISS sees one").

This module is `curate.core.faiss`; inside it, as everywhere (absolute imports), `import faiss`
is the FAISS library.
"""

import faiss

# Below this many points per centroid FAISS k-means is unreliable (FAISS's own floor).
MIN_POINTS_PER_CENTROID = 39
# What FAISS's GPU IVF-PQ accepts: sub-quantizer counts, and dimensions per sub-quantizer.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)


def use_gpu(gpu: bool | None) -> bool:
    """Whether to run FAISS on GPUs: the request, limited to what FAISS sees."""
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    return available if gpu is None else bool(gpu) and available


def gpu_pq_ok(d: int, pq_m: int) -> bool:
    """Whether FAISS's GPU IVF-PQ takes `pq_m` sub-quantizers of a d-dimensional vector."""
    return pq_m in GPU_PQ_M and d % pq_m == 0 and d // pq_m in GPU_PQ_DIMS


def flat_ip(d: int, gpu: bool) -> faiss.Index:
    """An empty exact inner-product index of dimension d, copied to every GPU when `gpu`: for
    small sets searched often (centroids, the coarse quantizer's k-means assignments)."""
    index = faiss.IndexFlatIP(d)
    return faiss.index_cpu_to_all_gpus(index) if gpu else index


def to_gpus(index: faiss.Index, *, float16: bool) -> faiss.Index:
    """`index` (on the host, trained) split over all GPUs.

    float16: lookup tables in half precision, which IVF-PQ with 64 or 96 sub-quantizers needs to
    fit GPU shared memory; a flat index stays float32 so its similarities stay exact.
    """
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = float16
    options.shard = True  # split the database over GPUs rather than copy it to each
    return faiss.index_cpu_to_all_gpus(index, co=options)
