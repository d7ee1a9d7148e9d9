"""Ingest throughput, side by side in one run on the same JPEGs:

  (a) our folder ingest, (b) our crawler ingest from a local HTTP server, (c) img2dataset on the
  same URL list (its own virtualenv, parquet output, no resize), (d) a bare read + decode loop
  over the files on every core: the limit of this machine for validating these images.

Writes bench/results/ingest.json and bench/results/ingest.md.
"""

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

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


def ours(source: str, data_root: Path, job: str) -> dict:
    """`curate run` as a user runs it; wall time includes start-up, Ray's included."""
    shutil.rmtree(data_root, ignore_errors=True)
    env = {
        **os.environ,
        "CURATE_DATA_ROOT": str(data_root),
        "CURATE_PROGRESS": "0",
        "CURATE_ALLOW_PRIVATE_NETWORKS": "1",
    }
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
    shown = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "jobs", "show", job, "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    (stage,) = json.loads(shown.stdout)["stages"]
    return {
        "images": stage["rows_out"],
        "wall_s": wall,
        "stage_s": stage["seconds"],
        "errors": stage["errors"],
    }


def img2dataset(url_list: Path, out: Path) -> dict:
    if not (I2D_VENV / "bin" / "img2dataset").exists():
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run(
            [str(I2D_VENV / "bin" / "pip"), "install", "--quiet", "img2dataset"], check=True
        )
    shutil.rmtree(out, ignore_errors=True)
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
            str(os.cpu_count() or 1),
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
    return {"images": images, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
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
        rows = {
            "bare decode loop": bare_decode(files),
            "curate: folder": ours(str(WORK / "jpegs"), WORK / "data-folder", "folder"),
            "curate: crawler": ours(str(url_list), WORK / "data-crawl", "crawl"),
            "img2dataset: crawler": img2dataset(url_list, WORK / "img2dataset-out"),
        }
    finally:
        server.kill()
    for row in rows.values():
        row["images_per_s"] = row["images"] / row["wall_s"]
        if "stage_s" in row:
            row["stage_images_per_s"] = row["images"] / row["stage_s"]
    ratios = {
        "crawler vs img2dataset (wall)": rows["curate: crawler"]["images_per_s"]
        / rows["img2dataset: crawler"]["images_per_s"],
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
        "targets": {"crawler vs img2dataset (wall)": 1.5, "folder vs bare decode (wall)": 0.8},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Ingest throughput: {len(files)} JPEGs (320-800 px), {os.cpu_count()} CPUs",
        "",
        "| method | images | wall s | images/s (wall) | stage s | images/s (stage) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        stage = f"{row['stage_s']:.1f}" if "stage_s" in row else ""
        stage_rate = f"{row['stage_images_per_s']:.0f}" if "stage_s" in row else ""
        lines.append(
            f"| {name} | {row['images']} | {row['wall_s']:.1f} | {row['images_per_s']:.0f} | "
            f"{stage} | {stage_rate} |"
        )
    lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
    for name, value in ratios.items():
        target = result["targets"].get(name)
        lines.append(f"| {name} | {value:.2f} | {'≥ ' + str(target) if target else ''} |")
    lines += [
        "",
        "Wall times include start-up (Python imports, our local Ray, img2dataset's processes).",
        "Stage time is what the catalog records for the ingest stage itself.",
    ]
    (RESULTS / "ingest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
