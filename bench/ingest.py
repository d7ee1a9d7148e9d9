"""Ingest throughput, side by side in one run on the same JPEGs:

  (a) our folder ingest, (b) our crawler ingest from a local HTTP server, (c) img2dataset on the
  same URL list (its own virtualenv, parquet output, no resize), (d) a bare read + decode loop
  over the files on every core: the limit of this machine for validating these images; and the
  fixed cost of our driver, piece by piece (bench/startup.py).

Two rates for each crawler:

  wall          images / the whole command's wall time: start-up and shut-down included
  steady state  images / s once every worker has finished its first part (shard): the images of
                the parts completed after the first `slots` completions, over the time from the
                `slots`-th completion to the last, where `slots` is the parts the tool runs at
                once (one per CPU for both). Start-up (imports, Ray or the process pool, the
                first parts' ramp) and shut-down fall outside it. Completion times come from the
                tools' own records: our catalog's `parts.committed_at`, img2dataset's
                `*_stats.json` `end_time`.

The two crawlers run back to back, `--repeats` pairs of runs, which one goes first taking turns
(other work on a shared machine then weighs on both runs of a pair alike); each crawler's row is
its run of median wall time, and the ratios between them are the medians of the pairs' ratios.
Each run records the load average as it began: a loaded machine shows there.

Writes bench/results/ingest.json and bench/results/ingest.md.
"""

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from startup import startup

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"
I2D_VENV = WORK / "venv-img2dataset"


def make_corpus(folder: Path, count: int) -> list[Path]:
    """`count` distinct photo-like JPEGs of 320 to 800 px, made once and reused."""
    marker = folder / f".complete-{count}"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        for i in range(count):
            rng = np.random.default_rng(i)
            w, h = int(rng.integers(320, 801)), int(rng.integers(320, 801))
            coarse = rng.integers(0, 256, size=(h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
            grain = rng.normal(0, 6, size=(h, w, 3))
            pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
            path = folder / f"{i // 1000:03d}" / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
        marker.touch()
    return sorted(folder.rglob("*.jpg"))


def _decode_one(path: Path) -> int:
    with Image.open(path) as img:
        img.load()
    return 1


def bare_decode(files: list[Path]) -> dict:
    processes = os.cpu_count() or 1
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        done = sum(pool.imap_unordered(_decode_one, files, chunksize=32))
    seconds = time.perf_counter() - started
    return {"images": done, "wall_s": seconds, "note": f"read + full PIL decode, {processes} procs"}


def steady_rate(completions: list[tuple[float, int]], slots: int) -> float | None:
    """Images/s once every worker has finished its first part (see the module's docstring):
    `completions` holds (time, images) per part. None with too few parts to tell."""
    done = sorted(completions)
    if len(done) <= slots:
        return None
    span = done[-1][0] - done[slots - 1][0]
    return sum(images for _, images in done[slots:]) / span if span > 0 else None


def _curate(env: dict, *args: str) -> str:
    command = [sys.executable, "-m", "services.cli.main", *args]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def ours(source: str, data_root: Path, job: str) -> dict:
    """`curate run` as a user runs it; wall time includes start-up, Ray's included."""
    shutil.rmtree(data_root, ignore_errors=True)
    env = {
        **os.environ,
        "CURATE_DATA_ROOT": str(data_root),
        "CURATE_PROGRESS": "0",
        "CURATE_ALLOW_PRIVATE_NETWORKS": "1",
    }
    env.pop("CURATE_RAY_ADDRESS", None)  # a local Ray of its own, started by the run
    started = time.perf_counter()
    command = ["run", "--source", source, "--job", job, "--until", "ingest"]
    subprocess.run(
        [sys.executable, "-m", "services.cli.main", *command],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    (stage,) = json.loads(_curate(env, "jobs", "show", job, "--json"))["stages"]
    parts = json.loads(
        _curate(
            env,
            "sql",
            "--json",
            "SELECT epoch_us(committed_at) / 1e6 AS at, rows_out FROM catalog.parts "
            f"WHERE job_id = '{job}' AND stage = 'ingest'",
        )
    )
    completions = [(row["at"], row["rows_out"]) for row in parts]
    return {
        "images": stage["rows_out"],
        "wall_s": wall,
        "stage_s": stage["seconds"],
        "errors": stage["errors"],
        "images_per_s": stage["rows_out"] / wall,
        "steady_images_per_s": steady_rate(completions, os.cpu_count() or 1),
    }


def img2dataset(url_list: Path, out: Path) -> dict:
    if not (I2D_VENV / "bin" / "img2dataset").exists():
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run(
            [str(I2D_VENV / "bin" / "pip"), "install", "--quiet", "img2dataset"], check=True
        )
    shutil.rmtree(out, ignore_errors=True)
    processes = os.cpu_count() or 1
    started = time.perf_counter()
    subprocess.run(
        [
            str(I2D_VENV / "bin" / "img2dataset"),
            "--url_list",
            str(url_list),
            "--input_format",
            "txt",
            "--output_format",
            "parquet",
            "--resize_mode",
            "no",
            "--output_folder",
            str(out),
            "--processes_count",
            str(processes),
            "--thread_count",
            "64",
            "--number_sample_per_shard",
            "1000",
            "--timeout",
            "20",
            "--retries",
            "0",
            "--enable_wandb",
            "False",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    images = sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
        for p in out.glob("*.parquet")
    )
    # Each shard's own record: when it ended and how many images it kept.
    shards = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    completions = [(shard["end_time"], shard["successes"]) for shard in shards]
    return {
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "steady_images_per_s": steady_rate(completions, processes),
    }


def crawlers(url_list: Path, repeats: int) -> list[dict]:
    """Both crawlers, back to back, `repeats` times, the first of a pair taking turns (load that
    grows or fades during a pair then favours neither); each run with the machine's load average
    as it began (this machine may be shared: a loaded one shows there)."""
    tools = {
        "curate": lambda: ours(str(url_list), WORK / "data-crawl", "crawl"),
        "img2dataset": lambda: img2dataset(url_list, WORK / "img2dataset-out"),
    }
    runs = []
    for repeat in range(repeats):
        run = {}
        for tool in sorted(tools, reverse=repeat % 2 == 1):
            load = os.getloadavg()[0]
            run[tool] = {**tools[tool](), "load": load}
        runs.append(run)
    return runs


def median_run(runs: list[dict], tool: str) -> dict:
    ordered = sorted((run[tool] for run in runs), key=lambda row: row["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def pair_ratios(runs: list[dict], rate: str) -> list[float | None]:
    """Ours over img2dataset's `rate`, per back-to-back pair of runs."""
    return [_ratio(run["curate"][rate], run["img2dataset"][rate]) for run in runs]


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _rate(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each crawler, in alternation (default 3)"
    )
    args = parser.parse_args()

    files = make_corpus(WORK / "jpegs", args.count)
    server = subprocess.Popen(
        [sys.executable, str(BENCH / "static_server.py"), str(WORK / "jpegs")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        url_list = WORK / "urls.txt"
        url_list.write_text(
            "".join(f"http://127.0.0.1:{port}/{p.relative_to(WORK / 'jpegs')}\n" for p in files)
        )
        fixed_cost = startup(os.cpu_count() or 1)
        runs = crawlers(url_list, args.repeats)
        crawler, i2d = median_run(runs, "curate"), median_run(runs, "img2dataset")
        rows = {
            "bare decode loop": bare_decode(files),
            "curate: folder": ours(str(WORK / "jpegs"), WORK / "data-folder", "folder"),
            "curate: crawler": crawler,
            "img2dataset: crawler": i2d,
        }
    finally:
        server.kill()
    for row in rows.values():
        row.setdefault("images_per_s", row["images"] / row["wall_s"])
        if "stage_s" in row:
            row["stage_images_per_s"] = row["images"] / row["stage_s"]
    # The crawlers' ratios pair each run with the other tool's run beside it in time, so that a
    # burst of load elsewhere on the machine weighs on one pair, not on one tool's median.
    per_pair = {
        "wall": pair_ratios(runs, "images_per_s"),
        "steady state": pair_ratios(runs, "steady_images_per_s"),
    }
    ratios = {
        "crawler vs img2dataset (wall)": _median(per_pair["wall"]),
        "crawler vs img2dataset (steady state)": _median(per_pair["steady state"]),
        "folder vs bare decode (wall)": rows["curate: folder"]["images_per_s"]
        / rows["bare decode loop"]["images_per_s"],
        "folder vs bare decode (stage)": rows["curate: folder"]["stage_images_per_s"]
        / rows["bare decode loop"]["images_per_s"],
    }
    result = {
        "benchmark": "ingest",
        "files": len(files),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "ratios": ratios,
        "targets": {
            "crawler vs img2dataset (wall)": 2.0,
            "crawler vs img2dataset (steady state)": 3.0,
            "folder vs bare decode (wall)": 0.8,
        },
        "crawler_runs": runs,
        "crawler_ratios_per_pair": per_pair,
        "startup": fixed_cost,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Ingest throughput: {len(files)} JPEGs (320-800 px), {os.cpu_count()} CPUs",
        "",
        "| method | images | wall s | images/s (wall) | stage s | images/s (stage) "
        "| images/s (steady state) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        stage = f"{row['stage_s']:.1f}" if "stage_s" in row else ""
        stage_rate = f"{row['stage_images_per_s']:.0f}" if "stage_s" in row else ""
        lines.append(
            f"| {name} | {row['images']} | {row['wall_s']:.1f} | {row['images_per_s']:.0f} | "
            f"{stage} | {stage_rate} | {_rate(row.get('steady_images_per_s'))} |"
        )
    lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
    for name, value in ratios.items():
        target = result["targets"].get(name)
        shown = f"{value:.2f}" if value is not None else ""
        lines.append(f"| {name} | {shown} | {'≥ ' + str(target) if target else ''} |")

    def listed(values: list[float | None]) -> str:
        return ", ".join(f"{value:.2f}" if value is not None else "-" for value in values)

    loads = ", ".join(
        f"{run['curate']['load']:.1f}/{run['img2dataset']['load']:.1f}" for run in runs
    )
    pieces = fixed_cost["pieces_s"]
    lines += [
        "",
        f"Crawler runs: {len(runs)} pairs, back to back, taking turns to go first. The rows are "
        "each tool's run of median wall time; the crawler ratios are the medians of the pairs' "
        "ratios: wall "
        f"{listed(per_pair['wall'])}; steady state {listed(per_pair['steady state'])}. Load "
        f"average (1 minute) as each run began, ours/img2dataset's: {loads}; it still counts the "
        "bench's own run before, so a few units on 2 CPUs is this bench alone.",
        "",
        "Per image, our crawler entropy-decodes every byte (a 1/8-scale JPEG draft) to validate "
        "it and keeps the original bytes; img2dataset (its defaults, `--resize_mode no`) decodes "
        "it fully and re-encodes it.",
        "",
        "Wall times include start-up (Python imports, our local Ray, img2dataset's processes).",
        "Stage time is what the catalog records for the ingest stage itself. Steady state: the "
        "images of the parts completed after the first one per CPU, over the time from that "
        "completion to the last (our catalog's commit times; img2dataset's shard end times).",
        "",
        "## Fixed cost of a `curate run` that stops at ingest (bench/startup.py)",
        "",
        "| piece | seconds |",
        "|---|---:|",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in pieces.items()),
        f"| whole process (exit included) | {fixed_cost['process_wall_s']:.2f} |",
        "",
        "Heavy modules loaded (torch, timm, faiss): driver "
        f"{fixed_cost['heavy_modules']['driver'] or 'none'}, workers "
        f"{fixed_cost['heavy_modules']['workers'] or 'none'}.",
    ]
    (RESULTS / "ingest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
