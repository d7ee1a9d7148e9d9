"""Clustering and the kNN index, measured on the library functions directly (no pipeline).

  1. k-means: the cluster stage's train_kmeans against raw faiss.Kmeans (spherical, same seed,
     niter, max_points_per_centroid and input) on N x 256 float32 unit vectors, k = 10,000; one run
     each, raw first. Target: ours <= 1.1 x raw. The same computation must give the same
     centroids, which the run checks.
  2. recall: KnnIndex IVF-PQ (nlist from ivf_params) against exact search on N x 768 clustered
     synthetic embeddings, with held-out queries: recall@4 and queries/s over a pq_m x nprobe x
     rerank grid; the curve KnnIndex's defaults come from. Target: recall@4 >= 0.95 at the
     defaults.

On this 2-core machine a k-means iteration over 1M x 10,000 x 256 takes over a minute, so the
default runs 3 iterations (--niter); the report says exactly what ran.
Writes bench/results/index.json and bench/results/index.md.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from measuring import code_line, code_version, met, timed

from curate.core.knn_index import DEFAULT_RERANK, KnnIndex, ivf_params
from curate.core.vectors import unit_rows
from curate.stages.cluster.kmeans import train_kmeans

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TARGETS = {"kmeans time vs raw": 1.1, "recall@4": 0.95}
MEASURED = (
    "curate/core/knn_index.py",
    "curate/core/faiss.py",
    "curate/core/vectors.py",
    "curate/stages/cluster/kmeans.py",
)
BLOCK = 65_536


def _log(message: str) -> None:
    print(f"[index] {message}", flush=True)


def clustered_embeddings(
    n: int,
    d: int,
    seed: int,
    *,
    clusters: int = 2_000,
    latent: int = 64,
    spread: float = 0.6,
    noise: float = 0.3,
    dtype: type = np.float16,
    model_seed: int = 12345,
) -> np.ndarray:
    """Unit rows [n, d] shaped like image embeddings: a Zipf-weighted mixture of `clusters`
    Gaussians in a `latent`-dimensional subspace (the low intrinsic dimension of real features),
    plus isotropic noise in all d dimensions. Cosine of two images of one cluster ~0.7.

    model_seed fixes the clusters and the subspace; `seed` only the points drawn from them, so
    queries drawn with another seed come from the same distribution without being in the base.
    """
    model = np.random.default_rng(model_seed)
    basis, _ = np.linalg.qr(model.standard_normal((d, latent)))
    centers = model.standard_normal((clusters, latent)) / np.sqrt(latent)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype)
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        labels = rng.choice(clusters, size=size, p=weights)
        z = centers[labels] + rng.standard_normal((size, latent)) * spread / np.sqrt(latent)
        x = z @ basis.T + rng.standard_normal((size, d)) * noise / np.sqrt(d)
        out[start : start + size] = unit_rows(x)
    return out


# -- 1. k-means ------------------------------------------------------------------------------------


def kmeans_section(args: argparse.Namespace) -> dict:
    x = clustered_embeddings(args.kmeans_n, args.kmeans_d, args.seed, dtype=np.float32)
    options = {"niter": args.niter, "seed": args.seed, "max_points_per_centroid": 256}
    _log(f"raw faiss.Kmeans on {args.kmeans_n:,} x {args.kmeans_d}, k = {args.k:,} ...")
    raw = faiss.Kmeans(args.kmeans_d, args.k, spherical=True, **options)
    _, raw_s = timed(raw.train, x)
    _log(f"raw {raw_s:.1f} s; train_kmeans ...")
    # init="random" is what train_kmeans's "auto" picks above 1,024 clusters (k-means++ below),
    # and FAISS's default: the comparison is of the same algorithm.
    ours, ours_s = timed(train_kmeans, x, args.k, init="random", **options)
    _log(f"ours {ours_s:.1f} s")
    return {
        "n": args.kmeans_n,
        "d": args.kmeans_d,
        "k": args.k,
        "niter": args.niter,
        "points_per_centroid_used": args.kmeans_n / args.k,
        "raw_s": raw_s,
        "ours_s": ours_s,
        "ratio": ours_s / raw_s,
        "raw_objective": float(raw.obj[-1]),
        "max_centroid_difference": float(np.abs(ours - unit_rows(raw.centroids)).max()),
    }


# -- 2. recall@4 of IVF-PQ -------------------------------------------------------------------------


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k ids of each query by brute force over float32 blocks of `base`, and the
    seconds it took."""
    started = time.perf_counter()
    sims = np.full((len(queries), 0), -np.inf, np.float32)
    ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(base), BLOCK):
        block = base[start : start + BLOCK].astype(np.float32)
        d, i = faiss.knn(queries, block, k, metric=faiss.METRIC_INNER_PRODUCT)
        sims, ids = np.hstack([sims, d]), np.hstack([ids, i + start])
        best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims, ids = np.take_along_axis(sims, best, 1), np.take_along_axis(ids, best, 1)
    return ids, time.perf_counter() - started


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist(), strict=True)]
    return float(np.sum(hits) / exact.size)


def recall_section(args: argparse.Namespace) -> dict:
    n, d, k = args.recall_n, args.recall_d, 4
    _log(f"generating {n:,} x {d} clustered embeddings + {args.queries:,} held-out queries ...")
    base = clustered_embeddings(n, d, args.seed)
    queries = clustered_embeddings(args.queries, d, args.seed + 1, dtype=np.float32)
    exact, exact_s = exact_top(base, queries, k)
    _log(f"exact search {exact_s:.1f} s")
    nlist, default_m, default_nprobe = ivf_params(n, d)
    runs = []
    builds = []
    for pq_m in args.pq_m:
        index = KnnIndex.create(d, n, flat_max=0, pq_m=pq_m, rerank=max(args.rerank))
        sample = base[np.random.default_rng(args.seed).choice(n, index.train_size, replace=False)]
        _log(f"pq_m {pq_m}: training on {len(sample):,} ...")
        _, train_s = timed(index.train, sample)
        _log(f"pq_m {pq_m}: trained in {train_s:.0f} s; adding ...")
        _, add_s = timed(index.add, base)
        builds.append({"pq_m": pq_m, "train_s": train_s, "add_s": add_s, "nlist": index.nlist})
        _log(f"pq_m {pq_m}: added in {add_s:.0f} s")
        for nprobe in args.nprobe:
            for rerank in args.rerank:
                index.nprobe, index.rerank = nprobe, rerank
                # best of two: the machine is shared, and the first pass warms the lists
                (_, found), first_s = timed(index.search, queries, k)
                _, second_s = timed(index.search, queries, k)
                search_s = min(first_s, second_s)
                runs.append(
                    {
                        "pq_m": pq_m,
                        "nprobe": nprobe,
                        "rerank": rerank,
                        "recall_at_4": recall_at(found, exact),
                        "queries_per_s": len(queries) / search_s,
                        "default": (pq_m, nprobe, rerank)
                        == (default_m, default_nprobe, DEFAULT_RERANK),
                    }
                )
                _log(f"  {runs[-1]}")
        del index
    return {
        "n": n,
        "d": d,
        "queries": len(queries),
        "nlist": nlist,
        "defaults": {"pq_m": default_m, "nprobe": default_nprobe, "rerank": DEFAULT_RERANK},
        "exact_s": exact_s,
        "exact_queries_per_s": len(queries) / exact_s,
        "builds": builds,
        "runs": runs,
    }


# -- report ----------------------------------------------------------------------------------------


def kmeans_lines(r: dict) -> list[str]:
    target = TARGETS["kmeans time vs raw"]
    return [
        f"## 1. k-means: train_kmeans vs raw faiss.Kmeans, {r['n']:,} x {r['d']} float32, "
        f"k = {r['k']:,}, niter = {r['niter']}",
        "",
        "Spherical, random init, same seed, same unit-norm input, max_points_per_centroid 256 "
        f"(all {r['n']:,} points used, {r['points_per_centroid_used']:.0f} per centroid); one "
        "run each, raw first. train_kmeans adds input validation, normalisation and the "
        "result's normalisation around the same faiss.Kmeans call.",
        "",
        "| | wall s |",
        "|---|---:|",
        f"| raw faiss.Kmeans | {r['raw_s']:.1f} |",
        f"| train_kmeans | {r['ours_s']:.1f} |",
        "",
        f"Ratio {r['ratio']:.3f} (target ≤ {target}: {met(r['ratio'] <= target)}). Largest "
        f"centroid coordinate difference between the two: {r['max_centroid_difference']:.2e} "
        "(the same computation: FAISS's multithreaded sums are not bit-reproducible, so a few "
        "points on a cluster boundary can switch). Raw's final objective "
        f"{r['raw_objective']:.1f}.",
    ]


def recall_lines(r: dict) -> list[str]:
    target = TARGETS["recall@4"]
    defaults = r["defaults"]
    builds = "; ".join(
        f"pq_m {b['pq_m']}: trained in {b['train_s']:.0f} s, {r['n']:,} added in {b['add_s']:.0f} s"
        for b in r["builds"]
    )
    lines = [
        f"## 2. recall@4: KnnIndex IVF-PQ vs exact search, {r['n']:,} x {r['d']} embeddings",
        "",
        f"Clustered synthetic embeddings (Zipf-weighted mixture of 2,000 clusters in a 64-d "
        f"subspace plus isotropic noise; see `clustered_embeddings`), {r['queries']:,} held-out "
        f"queries from the same distribution. IVF{r['nlist']},PQ(pq_m x 8 bits), inner "
        f"product; rerank = shortlist of rerank x k PQ candidates re-scored with exact cosine "
        f"(0 = PQ scores); queries/s: all queries in one call, best of two. Exact brute force: "
        f"{r['exact_queries_per_s']:.0f} queries/s "
        f"(float16 blocks to float32, faiss.knn). {builds}.",
        "",
        "| pq_m | nprobe | rerank | recall@4 | queries/s | |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for run in r["runs"]:
        mark = "**default**" if run["default"] else ""
        lines.append(
            f"| {run['pq_m']} | {run['nprobe']} | {run['rerank']} | {run['recall_at_4']:.4f} | "
            f"{run['queries_per_s']:.0f} | {mark} |"
        )
    chosen = [run for run in r["runs"] if run["default"]]
    if chosen:
        recall = chosen[0]["recall_at_4"]
        lines += [
            "",
            f"Defaults (pq_m {defaults['pq_m']}, nprobe {defaults['nprobe']}, rerank "
            f"{defaults['rerank']}): recall@4 {recall:.4f} (target ≥ {target}: "
            f"{met(recall >= target)}).",
        ]
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Index: k-means and the kNN index, {m['cpus']} CPUs",
        "",
        f"{m['platform']}; numpy {m['numpy']}, faiss {m['faiss']} ({m['faiss_threads']} "
        f"threads). Load average {m['load_before']:.1f} before, {m['load_after']:.1f} after "
        f"(shared machine); whole run {result['wall_s'] / 60:.1f} min.",
        "",
        code_line(result["code"]),
        "",
        f"Command: `{result['command']}`",
    ]
    render = {"kmeans": kmeans_lines, "recall": recall_lines}
    for name, lines_of in render.items():
        if name in result:
            lines += ["", *lines_of(result[name])]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "gpus": faiss.get_num_gpus(),
        "load_before": os.getloadavg()[0],
    }


QUICK = {
    "kmeans_n": 100_000,
    "k": 1_000,
    "recall_n": 100_000,
    "queries": 500,
    "pq_m": [96],
    "nprobe": [16, 64],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help=f"smaller sizes, a couple of minutes: {QUICK}")
    add("--sections", nargs="+", default=["kmeans", "recall"])
    add("--kmeans-n", type=int, default=1_000_000)
    add("--kmeans-d", type=int, default=256)
    add("--k", type=int, default=10_000)
    add("--niter", type=int, default=3, help="k-means iterations, the same for both")
    add("--recall-n", type=int, default=1_000_000)
    add("--recall-d", type=int, default=768)
    add("--queries", type=int, default=2_000)
    add("--pq-m", type=int, nargs="+", default=[64, 96])
    add("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    add("--rerank", type=int, nargs="+", default=[0, 4, 16])
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=RESULTS / "index", help="writes OUT.json and OUT.md")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # flags given still win
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = {"benchmark": "index", "machine": machine(), "targets": TARGETS}
    result["code"] = code_version(MEASURED)
    result["command"] = " ".join(["python", "bench/index.py", *sys.argv[1:]])
    sections = {"kmeans": kmeans_section, "recall": recall_section}
    for name in args.sections:
        _log(f"{name} ...")
        result[name], seconds = timed(sections[name], args)
        _log(f"{name} done in {seconds:.0f} s")
    result["machine"]["load_after"] = os.getloadavg()[0]
    result["wall_s"] = time.perf_counter() - started
    result["args"] = vars(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
