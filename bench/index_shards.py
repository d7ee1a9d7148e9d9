"""The crawl's kNN index cut into shards by id range against one index, side by side.

One IVF-PQ index is trained once (KnnIndex's defaults for N x d) on N x d clustered synthetic
embeddings (bench/index.py's `clustered_embeddings`); the crawl is then indexed as S shards of
consecutive rows, each a copy of the trained index (what curate/stages/retrieve/crawl_index.py
does with runs of embed shards), for every S asked. Held-out queries go to every shard and the
per-shard top 4 are merged (knn_search.merge_hits), as retrieval does:

  - in this process, the shards searched one after the other (`LocalPool`);
  - on a local Ray, one actor per shard (pipelines/shard_pool.py, what the retrieve stage
    starts), each loading its shard from disk, the shards searched at once.

Reported per S: recall@4 against exact search, queries/s (all queries in blocks of 4,096, as
`retrieve_knn` sends them; best of two), and, against S = 1, the queries whose merged top 4 is
better at some rank or worse at some rank (by the design never worse: crawl_index.py).
Writes bench/results/index_shards.json and .md.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from index import clustered_embeddings, exact_top, machine, recall_at
from measuring import code_line, code_version, timed

from curate.core.knn_index import KnnIndex
from curate.core.shards import write_shard
from curate.core.stage import LocalPool
from curate.stages.retrieve.crawl_index import IndexShardSpec, open_index_shard
from curate.stages.retrieve.knn_search import merge_hits

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MEASURED = (
    "curate/stages/retrieve/crawl_index.py",
    "curate/stages/retrieve/knn_search.py",
    "curate/core/knn_index.py",
    "pipelines/shard_pool.py",
    "pipelines/placement.py",
)
K = 4
QUERY_BLOCK = 4096  # retrieve_knn's batch


def _log(message: str) -> None:
    print(f"[index_shards] {message}", flush=True)


def keys_of(start: int, stop: int) -> pa.Table:
    rows = np.arange(start, stop)
    return pa.table(
        {
            "image_id": pa.array([f"{r:09d}" for r in rows], pa.string()),
            "part": pa.array(np.zeros(len(rows)), pa.int32()),
            "item": pa.array(rows, pa.int32()),
        }
    )


def build(base: np.ndarray, trained: Path, folder: Path, shards: int) -> tuple[list, float]:
    """The S shards' files (as crawl_index.py writes them) and the seconds adding took."""
    specs, seconds = [], 0.0
    bounds = np.linspace(0, len(base), shards + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        spec = IndexShardSpec(number, (), int(stop - start), folder)
        index = KnnIndex.load(trained)
        _, add_s = timed(index.add, base[start:stop])
        seconds += add_s
        write_shard(keys_of(start, stop), spec.keys_path)
        index.save(spec.index_path)
        specs.append(spec)
    return specs, seconds


def search(pool, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Merged top-K ids (global rows) and similarities of every query, and the best of two
    wall times."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        ids = np.full((len(queries), K), -1, np.int64)
        sims = np.full((len(queries), K), -np.inf, np.float32)
        for start in range(0, len(queries), QUERY_BLOCK):
            hits, rank = merge_hits(pool.map("search", queries[start : start + QUERY_BLOCK], K), K)
            rows = hits.column("query").to_numpy() + start
            ids[rows, rank] = hits.column("item").to_numpy()
            sims[rows, rank] = hits.column("similarity").to_numpy()
        best = min(best, time.perf_counter() - started)
    return ids, sims, best


def compare(sims: np.ndarray, single: np.ndarray) -> dict:
    return {
        "queries_better": int(np.any(sims > single + 1e-6, axis=1).sum()),
        "queries_worse": int(np.any(sims < single - 1e-6, axis=1).sum()),
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    n, d = args.n, args.d
    _log(f"generating {n:,} x {d} clustered embeddings + {args.queries:,} held-out queries ...")
    base = clustered_embeddings(n, d, args.seed)
    queries = clustered_embeddings(args.queries, d, args.seed + 1, dtype=np.float32)
    exact, exact_s = exact_top(base, queries, K)
    template = KnnIndex.create(d, n, flat_max=args.flat_max)
    size = min(n, template.train_size)
    sample = base[np.sort(np.random.default_rng(args.seed).choice(n, size, replace=False))]
    _log(f"training {template.describe()} on {len(sample):,} ...")
    _, train_s = timed(template.train, sample)
    trained = work / "trained.index"
    template.save(trained)
    del template
    rows, single = [], None
    built = {}
    for shards in args.shards:
        specs, add_s = build(base, trained, work / f"s{shards}", shards)
        built[shards] = specs
        pool = LocalPool([open_index_shard(s) for s in specs])  # loaded as a searcher does
        ids, sims, search_s = search(pool, queries)
        del pool
        if single is None:
            single = sims
        rows.append(
            {
                "shards": shards,
                "where": "in process",
                "add_s": add_s,
                "recall_at_4": recall_at(ids, exact),
                "queries_per_s": len(queries) / search_s,
                **compare(sims, single),
            }
        )
        _log(str(rows[-1]))
    if args.ray:
        rows += ray_rows(args, built, queries, exact, single)
    return {
        "n": n,
        "d": d,
        "queries": len(queries),
        "index": KnnIndex.load(trained).describe() | {"ntotal": n},
        "train_s": train_s,
        "exact_queries_per_s": len(queries) / exact_s,
        "rows": rows,
    }


def ray_rows(args, built: dict, queries, exact, single) -> list[dict]:
    import ray

    from pipelines.shard_pool import start_shard_pool

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for shards, specs in built.items():
            started = time.perf_counter()
            pool = start_shard_pool("bench", open_index_shard, specs, gpu=True)
            open_s = time.perf_counter() - started
            try:
                ids, sims, search_s = search(pool, queries)
            finally:
                pool.close()
            rows.append(
                {
                    "shards": shards,
                    "where": "Ray actors",
                    "open_s": open_s,
                    "recall_at_4": recall_at(ids, exact),
                    "queries_per_s": len(queries) / search_s,
                    **compare(sims, single),
                }
            )
            _log(str(rows[-1]))
    finally:
        ray.shutdown()
    return rows


def markdown(result: dict) -> str:
    m, r = result["machine"], result["shards"]
    index = r["index"]
    lines = [
        f"# Index shards: the crawl index cut by id range vs one index, {m['cpus']} CPUs",
        "",
        f"{m['platform']}; numpy {m['numpy']}, faiss {m['faiss']} ({m['faiss_threads']} "
        f"threads), {m['gpus']} GPUs. Load average {m['load_before']:.1f} before, "
        f"{m['load_after']:.1f} after (shared machine); whole run {result['wall_s'] / 60:.1f} "
        "min.",
        "",
        code_line(result["code"]),
        "",
        f"Command: `{result['command']}`",
        "",
        f"{r['n']:,} x {r['d']} clustered synthetic embeddings, {r['queries']:,} held-out "
        f"queries, k = {K}. One {index['kind']} index trained once in {r['train_s']:.0f} s "
        f"(nlist {index['nlist']}, pq_m {index['pq_m']}, nprobe {index['nprobe']}, rerank "
        f"{index['rerank']}), copied into S shards of consecutive rows. Exact brute force: "
        f"{r['exact_queries_per_s']:.0f} queries/s. Better/worse: queries whose merged top 4 "
        "has a higher/lower similarity than S = 1's at some rank.",
        "",
        "| S | searched | recall@4 | queries/s | better | worse | build s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        build = row.get("add_s", row.get("open_s"))
        lines.append(
            f"| {row['shards']} | {row['where']} | {row['recall_at_4']:.4f} | "
            f"{row['queries_per_s']:.0f} | {row['queries_better']} | {row['queries_worse']} | "
            f"{build:.1f} |"
        )
    lines += [
        "",
        "build s: in process, the seconds adding the vectors to the shards; on Ray, the seconds "
        "until every actor had loaded its shard from disk.",
        "",
        "What sharding costs and buys on one machine: every shard runs the coarse quantizer "
        "(nlist x d per query) and re-ranks a shortlist of its own, so S shards do about S "
        "times that fixed work per query, and on these cores queries/s falls with S; the same "
        "work spread over S nodes or GPUs runs at once. What it buys is capacity (no process "
        "holds more than one shard's codes, vectors and keys) and, from the union of the "
        "shards' shortlists, results equal to one index's or better (never worse above).",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--n", type=int, default=300_000)
    add("--d", type=int, default=768)
    add("--queries", type=int, default=2_000)
    add("--shards", type=int, nargs="+", default=[1, 2, 4], help="the first is the reference")
    add("--flat-max", type=int, default=0, help="0: IVF-PQ; above N: exact")
    add("--no-ray", dest="ray", action="store_false", help="in this process only")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=RESULTS / "index_shards", help="writes OUT.json and OUT.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = {"benchmark": "index_shards", "machine": machine()}
    result["code"] = code_version(MEASURED)
    result["command"] = " ".join(["python", "bench/index_shards.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(dir=BENCH / "work") as work:
        result["shards"] = run(args, Path(work))
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
