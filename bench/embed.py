"""Embed stage throughput against the bare model forward, same model and batch size, one run.

  1. bare: the backbone's forward alone on pre-decoded, pre-normalised float tensors in this
     process, torch given every core; measured before and after the stage runs (shared machine);
  2. stage: the embed stage through the executor (RayCompute.map_parts) end to end over
     INGEST + DEDUP shards of generated JPEGs on a local Ray (decode tasks, model actor, shard
     writes, commits). Reported twice: end to end (Ray workers and model start-up included) and
     steady state (images of the parts after the first over the time between the first and the
     last commit: the rate a long job runs at). The 0.85x target is on steady state. Two CPU
     placements are compared: the actor given all cores as torch threads (the default), and all
     cores but one;
  3. on a GPU (when present): ViT-H/14 bf16 images/s through the Embedder on uint8 crops and its
     share of the GPU's dense bf16 peak, FLOPs counted by torch's FlopCounterMode.

Writes bench/results/embed.json and bench/results/embed.md.
"""

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from measuring import code_line, code_version
from PIL import Image

from curate.core.shards import PartResult, shard_name, write_shard
from curate.stages.embed.embedder import Embedder, EmbedInput, preprocess
from curate.stages.embed.model import ModelSpec, load_backbone
from curate.stages.embed.stage import STAGE as EMBED_STAGE
from curate.stages.embed.stage import EmbedInputs
from pipelines.executor import RayCompute
from schemas.shards import DEDUP, INGEST

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work" / "embed"
RESULTS = BENCH / "results"
TARGET = 0.85  # stage images/s over bare forward images/s
MEASURED = (
    "curate/stages/embed/embedder.py",
    "curate/stages/embed/model.py",
    "curate/core/weights.py",
    "curate/stages/embed/stage.py",
    "pipelines/executor.py",
)
# Dense bf16 tensor-core peaks (no sparsity), by device-name fragment, FLOP/s.
GPU_PEAKS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth random photo-like image, JPEG q90: decodes like a web photo of that size."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 24, width // 24, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_corpus(folder: Path, images: int, part_size: int, size: tuple[int, int]) -> list:
    """INGEST and DEDUP shards (every image kept) of generated JPEGs, part_size images a part."""
    shutil.rmtree(folder, ignore_errors=True)
    inputs = []
    for part in range((images + part_size - 1) // part_size):
        rows, decisions = [], []
        for item in range(min(part_size, images - part * part_size)):
            data = photo_jpeg(*size, seed=part * part_size + item)
            image_id = hashlib.sha256(data).hexdigest()
            uri = f"bench://{part}/{item}.jpg"
            rows.append(
                {
                    "image_id": image_id,
                    "uri": uri,
                    "image": {"bytes": data, "path": f"{image_id}.jpg"},
                    "width": size[0],
                    "height": size[1],
                    "format": "JPEG",
                    "mode": "RGB",
                    "resized": False,
                    "part": part,
                    "item": item,
                    "metadata": "{}",
                }
            )
            decisions.append(
                {"image_id": image_id, "uri": uri, "part": part, "item": item, "keep": True}
            )
        ingest = folder / "ingest" / shard_name(part)
        dedup = folder / "dedup" / shard_name(part)
        write_shard(pa.Table.from_pylist(rows, schema=INGEST), ingest)
        write_shard(pa.Table.from_pylist(decisions, schema=DEDUP), dedup)
        inputs.append(EmbedInput(part, ingest, dedup))
    return inputs


def pre_decoded(inputs: list, image_size: int) -> np.ndarray:
    import pyarrow.parquet as pq

    crops = [
        preprocess(row["bytes"], image_size)
        for part in inputs
        for row in pq.read_table(part.ingest, columns=["image"]).column("image").to_pylist()
    ]
    return np.stack(crops)


def bare_forward(spec: ModelSpec, pixels: np.ndarray, batch_size: int, threads: int) -> dict:
    """images/s of model(x) alone on tensors already decoded, normalised and batched."""
    torch.set_num_threads(threads)
    model = load_backbone(spec)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    batches = [
        (torch.from_numpy(pixels[i : i + batch_size]).float() / 255.0 - mean) / std
        for i in range(0, len(pixels), batch_size)
    ]
    with torch.inference_mode():
        model(batches[0])  # warm-up: first-call allocations and kernel selection
        started = time.perf_counter()
        for batch in batches:
            model(batch)
        seconds = time.perf_counter() - started
    return {"images": len(pixels), "seconds": seconds, "images_per_s": len(pixels) / seconds}


def stage_run(
    inputs: list, spec: ModelSpec, out: Path, batch_size: int, threads: int | None
) -> dict:
    """The embed stage's parts through the executor end to end; steady state from the commit
    times."""
    shutil.rmtree(out, ignore_errors=True)
    commits: list[tuple[float, PartResult]] = []
    started = time.perf_counter()
    RayCompute(progress=False).map_parts(
        EMBED_STAGE,
        EmbedInputs(spec, out, batch_size, compile=False, threads=threads),
        inputs,
        label="embed",
        commit=lambda result: commits.append((time.perf_counter(), result)),
        total=len(inputs),
    )
    seconds = time.perf_counter() - started
    images = sum(r.rows_out for _, r in commits)
    steady_images = sum(r.rows_out for _, r in commits[1:])
    steady_seconds = commits[-1][0] - commits[0][0]
    return {
        "threads": threads,
        "images": images,
        "errors": sum(r.errors for _, r in commits),
        "seconds": seconds,
        "images_per_s": images / seconds,
        "first_commit_s": commits[0][0] - started,
        "steady_images": steady_images,
        "steady_seconds": steady_seconds,
        "steady_images_per_s": steady_images / steady_seconds,
    }


def gpu_section(arch: str, batch_size: int, batches: int) -> dict:
    """ViT-H/14 bf16 images/s through the Embedder on uint8 crops, and its share of peak."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = ModelSpec(arch, None, allow_random=True, img_size=224)
    embedder = Embedder(spec, batch_size=batch_size)
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, 3, 224, 224), dtype=np.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        embedder.model(torch.randn(1, 3, 224, 224, device=embedder.device))
    flops_per_image = counter.get_total_flops()
    for _ in range(3):
        embedder(pixels)  # warm-up: cuDNN / cuBLAS heuristics, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        embedder(pixels)  # returns host float16: the sync is inside
    seconds = time.perf_counter() - started
    rate = batches * batch_size / seconds
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in GPU_PEAKS.items() if key in name), None)
    return {
        "device": name,
        "arch": arch,
        "batch_size": batch_size,
        "images": batches * batch_size,
        "seconds": seconds,
        "images_per_s": rate,
        "gflops_per_image": flops_per_image / 1e9,
        "achieved_tflops": rate * flops_per_image / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "share_of_peak": rate * flops_per_image / peak if peak else None,
    }


def markdown(result: dict) -> str:
    a, cpu = result["args"], result["cpu"]
    lines = [
        f"# Embed stage against the bare model forward, {result['machine']['cpus']} CPUs",
        "",
        f"{result['machine']['platform']}; torch {result['machine']['torch']}, ray "
        f"{result['machine']['ray']}. Load average {result['machine']['load_before']:.1f} before, "
        f"{result['machine']['load_after']:.1f} after (shared machine); whole run "
        f"{result['seconds'] / 60:.1f} min.",
        "",
        code_line(result["code"]),
        "",
        f"## CPU: {a['arch']} at {a['image_size']} px, batch {a['batch_size']}, random weights",
        "",
        f"{a['images']} generated {a['width']}x{a['height']} JPEGs (q90) in parts of "
        f"{a['part_size']}. Bare: `model(x)` on pre-decoded, normalised float batches "
        f"({a['bare_images']} images), measured before and after each stage run. Stage: "
        "the embed stage over INGEST + DEDUP shards on a local Ray (decode tasks, model actor, "
        "normalise + forward + L2 + float16, shard writes, commits). Steady state: images of "
        "parts 2..N over the time from the first commit to the last; end to end includes Ray "
        "worker start, model load and the first part's pipeline fill.",
        "",
        "| torch threads | bare images/s (before, after) | stage images/s, steady state "
        "| stage / bare, steady state | stage images/s, end to end | stage / bare, end to end "
        "| target | met |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in cpu["runs"]:
        stage = run["stage"]
        met = "yes" if run["ratio_steady"] >= TARGET else "**no**"
        lines.append(
            f"| {run['threads']} | {run['bare_images_per_s']:.2f} "
            f"({run['bare_before']['images_per_s']:.2f}, {run['bare_after']['images_per_s']:.2f}) "
            f"| {stage['steady_images_per_s']:.2f} | {run['ratio_steady']:.2f} "
            f"| {stage['images_per_s']:.2f} | {run['ratio_end_to_end']:.2f} | ≥ {TARGET} | {met} |"
        )
    lines += [
        "",
        f"Decoding one {a['width']}x{a['height']} JPEG to a {a['image_size']} px crop "
        f"(`preprocess`, JPEG draft mode) costs {cpu['preprocess_ms_per_image']:.1f} ms in this "
        "process, against the forward's "
        f"{1000 / cpu['runs'][0]['bare_images_per_s']:.0f} ms per image: the decode task "
        "takes a few percent of the cores from the model. The model actor holds 1 logical Ray "
        "CPU so that decode tasks can run beside it; the rows differ in its torch threads (the "
        "default is every core of the node). Bare runs use the same thread count as the stage "
        "run they frame.",
        "",
    ]
    gpu = result.get("gpu")
    if gpu:
        share = f"{gpu['share_of_peak']:.1%}" if gpu["share_of_peak"] is not None else "n/a"
        lines += [
            f"## GPU: {gpu['arch']} bf16 on {gpu['device']}",
            "",
            "| batch | images/s | GFLOPs / image | achieved TFLOP/s | dense bf16 peak TFLOP/s | "
            "share of peak |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {gpu['batch_size']} | {gpu['images_per_s']:.0f} | {gpu['gflops_per_image']:.1f} | "
            f"{gpu['achieved_tflops']:.0f} | {gpu['peak_bf16_tflops'] or 'n/a'} | {share} |",
            "",
            "Embedder on uint8 crops already in host memory (transfer, normalisation, forward, "
            "L2, float16 back to the host included); FLOPs of one forward counted by "
            "torch.utils.flop_counter.",
        ]
    else:
        lines += ["## GPU", "", "No GPU on this machine: section skipped."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--arch", default="vit_small_patch16_224")
    add("--image-size", type=int, default=224)
    add("--batch-size", type=int, default=32)
    add("--images", type=int, default=160)
    add("--bare-images", type=int, default=64, help="images of each bare-forward measurement")
    add("--part-size", type=int, default=32)
    add("--width", type=int, default=640)
    add("--height", type=int, default=480)
    add("--gpu-arch", default="vit_huge_patch14_224")
    add("--gpu-batch-size", type=int, default=256)
    add("--gpu-batches", type=int, default=20)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")
    began = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    machine = {
        "cpus": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_before": os.getloadavg()[0],
    }
    spec = ModelSpec(args.arch, None, allow_random=True, img_size=args.image_size)
    inputs = make_corpus(WORK, args.images, args.part_size, (args.width, args.height))
    pixels = pre_decoded(inputs, args.image_size)
    sample = [photo_jpeg(args.width, args.height, seed=i) for i in range(32)]
    started = time.perf_counter()
    for data in sample:
        preprocess(data, args.image_size)
    preprocess_ms = 1000 * (time.perf_counter() - started) / len(sample)

    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    # Each placement: bare, stage, bare again, so that a stage run is compared with bare runs
    # taken just around it (the machine's load drifts).
    placements = [cores] + ([cores - 1] if cores > 1 else [])
    runs = []
    for threads in placements:
        bare_pixels = pixels[: args.bare_images]
        before = bare_forward(spec, bare_pixels, args.batch_size, threads)
        stage = stage_run(inputs, spec, WORK / "embed", args.batch_size, threads)
        after = bare_forward(spec, bare_pixels, args.batch_size, threads)
        bare_rate = (before["images_per_s"] + after["images_per_s"]) / 2
        runs.append(
            {
                "threads": threads,
                "bare_before": before,
                "bare_after": after,
                "bare_images_per_s": bare_rate,
                "stage": stage,
                "ratio_steady": stage["steady_images_per_s"] / bare_rate,
                "ratio_end_to_end": stage["images_per_s"] / bare_rate,
            }
        )
    ray.shutdown()
    result = {
        "args": vars(args),
        "machine": machine,
        "code": code_version(MEASURED),
        "cpu": {
            "cores": cores,
            "preprocess_ms_per_image": preprocess_ms,
            "runs": runs,
            "target": TARGET,
        },
    }
    if torch.cuda.is_available():
        result["gpu"] = gpu_section(args.gpu_arch, args.gpu_batch_size, args.gpu_batches)
    machine["load_after"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - began
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embed.json").write_text(json.dumps(result, indent=2, default=float))
    (RESULTS / "embed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
