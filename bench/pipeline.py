"""The whole demo pipeline (`make curate`'s job) at two corpus sizes, in one run.

Each size gets a fresh data root and runs `curate run --recipe demo` as a user would (a new
process: imports, local Ray start and stop included), with the demo seed set registered as the
Makefile does. Reported: wall time, the catalog's seconds and images/s per stage, and the growth
of the total when the corpus doubles (target: 2× the corpus → ≤ 2.2× the time).

Writes bench/results/pipeline.json and bench/results/pipeline.md.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work" / "pipeline"
RESULTS = BENCH / "results"
POLICY = "as-is+knn:4+cluster:25+balanced:200"  # the Makefile's DEMO_POLICY
TARGET_GROWTH = 2.2


def curate(*args: str, data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CURATE_DATA_ROOT": str(data_root), "CURATE_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )


def run_demo(count: int) -> dict:
    corpus = WORK / f"corpus-{count}"
    if not (corpus / "manifest.json").exists():
        curate("demo", str(corpus), "--count", str(count), data_root=WORK / "scratch")
    data_root = WORK / f"data-{count}"
    shutil.rmtree(data_root, ignore_errors=True)
    curate(
        "seeds", "add", "demo", str(corpus / "seeds/demo"), "--policy", POLICY, data_root=data_root
    )
    started = time.perf_counter()
    curate(
        "run",
        "--recipe",
        "demo",
        "--source",
        str(corpus / "crawl"),
        "--seeds",
        "demo",
        "--job",
        "bench",
        data_root=data_root,
    )
    wall = time.perf_counter() - started
    report = json.loads(curate("jobs", "show", "bench", "--json", data_root=data_root).stdout)
    stages = {
        s["stage"]: {
            "seconds": s["seconds"],
            "rows_in": s["rows_in"],
            "rows_out": s["rows_out"],
            "images_per_s": s["rows_in"] / s["seconds"] if s["seconds"] else None,
        }
        for s in report["stages"]
    }
    return {"files": count, "wall_s": wall, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="the smaller corpus's files")
    args = parser.parse_args()
    runs = [run_demo(args.count), run_demo(2 * args.count)]
    small, large = runs
    stage_seconds = [sum(s["seconds"] for s in run["stages"].values()) for run in runs]
    growth = {
        "wall": large["wall_s"] / small["wall_s"],
        "stages": stage_seconds[1] / stage_seconds[0],
    }
    result = {
        "benchmark": "pipeline",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": runs,
        "growth_2x": growth,
        "target_growth_2x": TARGET_GROWTH,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2))
    names = list(large["stages"])
    lines = [
        f"# Whole demo pipeline (`curate run --recipe demo`), {os.cpu_count()} CPUs",
        "",
        "| stage | " + " | ".join(f"{r['files']} files: s | rows in/s" for r in runs) + " |",
        "|---|" + "---:|---:|" * len(runs),
    ]
    for name in names:
        cells = []
        for run in runs:
            stage = run["stages"].get(name)
            rate = stage and stage["images_per_s"]
            cells += [f"{stage['seconds']:.1f}" if stage else "", f"{rate:.0f}" if rate else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    wall_cells = [cell for run in runs for cell in (f"{run['wall_s']:.1f}", "")]
    lines.append("| whole `curate run` process | " + " | ".join(wall_cells) + " |")
    lines += [
        "",
        f"2× the corpus: wall × {growth['wall']:.2f}, stage seconds × {growth['stages']:.2f} "
        f"(target ≤ {TARGET_GROWTH}).",
        "",
        "Stage seconds are the catalog's; wall time is the whole `curate run` process (imports, "
        "Ray start and stop, the seed set's first ingest and embedding).",
    ]
    (RESULTS / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
