"""The companion trainer, measured: throughput, memory, and proof that it learns.

  1. throughput: images/s and peak RSS of the `tiny` and `small` presets through the whole
     training step (curated shards -> multi-crop -> teacher -> student -> AdamW -> EMA), one
     process on this CPU, side by side with the bare limit: the same timm backbones' forward +
     backward (student) and forward (teacher) on ready-made crops, with no heads, losses, data,
     optimizer or EMA. Each preset runs in a fresh spawned process.
  2. gpu: ViT-S/14 and ViT-L/14 (DINOv2 shapes: 224 + 8 x 98 crops, 65,536 prototypes, bf16)
     training-step images/s per GPU on ready-made crops; skipped without a GPU.
  3. proof: the `small` preset trained on the demo corpus (`curate demo`) for a bounded time;
     k-NN accuracy (k = 20, T = 0.07) on the demo's labelled classes at random initialisation
     (step 0: the teacher is the student's initial weights) and after training.

Writes bench/results/train.json and bench/results/train.md.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from measuring import code_line, code_version, in_fresh_process, reset_peak_rss, status_mib

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work" / "train"
RESULTS = BENCH / "results"
MEASURED = (
    "curate/train/loop.py",
    "curate/train/step.py",
    "curate/train/setup.py",
    "curate/train/runtime.py",
    "curate/train/windows.py",
    "curate/train/shards.py",
    "curate/train/model.py",
    "curate/train/losses.py",
    "curate/train/data.py",
    "curate/train/augment.py",
)
RSS_NOTE = (
    "Memory: peak RSS of the measuring process (VmHWM of /proc/self/status, reset through "
    "/proc/self/clear_refs just before the measured call), in brackets the RSS before it."
)


def _steady_images_per_s(metrics: list[dict], skip: int) -> float:
    """Images/s over the steps after the first `skip` (warm-up); needs one metrics line a step."""
    rates = [m["images_per_s"] for m in metrics if "images_per_s" in m][skip:]
    # Each line is one step of the same number of images: the harmonic mean is total / time.
    return len(rates) / sum(1.0 / r for r in rates)


# -- 1. throughput on this CPU ---------------------------------------------------------------------


def _photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth random RGB image as JPEG (as tests/images.py makes them)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3))
    img = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_photo_shards(folder: Path, count: int, per_shard: int = 64) -> list[Path]:
    """Curated-schema shards of generated photo-like JPEGs."""
    import pyarrow as pa

    from curate.core.shards import shard_name, write_shard
    from schemas.shards import CURATED

    if folder.is_dir() and len(list(folder.glob("*.parquet"))) == -(-count // per_shard):
        return sorted(folder.glob("*.parquet"))
    for part, start in enumerate(range(0, count, per_shard)):
        rows = [
            {
                "image": {"bytes": _photo_jpeg(160, 120, seed=i), "path": f"{i}.jpg"},
                "image_id": f"{i:064x}",
                "uri": f"bench://{i}",
                "method": "as-is",
                "matches": 1,
                "width": 160,
                "height": 120,
            }
            for i in range(start, min(count, start + per_shard))
        ]
        write_shard(pa.Table.from_pylist(rows, schema=CURATED), folder / shard_name(part))
    return sorted(folder.glob("*.parquet"))


def bare_limit(config, steps: int) -> float:
    """Images/s of the backbones alone: student fwd + bwd on all crops, teacher fwd on globals."""
    import torch

    from curate.train.model import build_student_teacher

    student, teacher = build_student_teacher(config.model, config.crops.global_size, 0)
    b, crops = config.batch_size, config.crops
    g = torch.randn(2 * b, 3, crops.global_size, crops.global_size)
    loc = torch.randn(crops.n_local * b, 3, crops.local_size, crops.local_size)
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        with torch.no_grad():
            teacher.tokens(g)
        out = student.tokens(g).sum()
        if crops.n_local:
            out = out + student.tokens(loc)[:, 0].sum()
        out.backward()
        timings.append(time.perf_counter() - started)
    return b / (sum(timings[1:]) / steps)


def throughput_one(preset: str, steps: int, data: str, workers: int) -> dict:
    """One preset in this (fresh) process: the trainer, then the bare limit."""
    import torch

    from curate.train.loop import train
    from schemas.train import load_train_config

    config = load_train_config(
        preset=preset,
        overrides={
            "steps": max(steps + 1, 40),  # schedule length only: the run stops after `steps`
            "checkpoint_every": 10_000,
            "log_every": 1,
            "num_workers": workers,
            "optim": {"warmup_steps": 2},
        },
    )
    out = WORK / f"throughput-{preset}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    before = status_mib("VmRSS")
    reset_peak_rss()
    result = train(
        config,
        sorted(Path(data).glob("*.parquet")),
        out,
        stop_after=steps,
        progress=False,
        export=False,
    )
    peak = status_mib("VmHWM")
    trainer = _steady_images_per_s(result.metrics, skip=2)
    bare = bare_limit(config, steps=steps)
    crops = config.crops
    return {
        "preset": preset,
        "arch": config.model.arch,
        "crops": f"2 x {crops.global_size} + {crops.n_local} x {crops.local_size}",
        "prototypes": config.model.prototypes,
        "batch_size": config.batch_size,
        "steps_timed": steps - 2,
        "loader_workers": workers,
        "torch_threads": torch.get_num_threads(),
        "images_per_s": trainer,
        "bare_images_per_s": bare,
        "peak_rss_mib": peak,
        "rss_before_mib": before,
        "last_loss": result.metrics[-1]["loss"],
    }


def throughput(args: argparse.Namespace) -> dict:
    data = WORK / "photo-shards"
    write_photo_shards(data, 512)
    runs = [
        in_fresh_process(throughput_one, preset, steps, str(data), args.workers)
        for preset, steps in (("tiny", args.tiny_steps), ("small", args.small_steps))
    ]
    return {"runs": runs}


# -- 2. GPU ----------------------------------------------------------------------------------------


@dataclass
class _ReadyBatch:
    global_crops: object
    local_crops: object
    masks: object
    bad_images: int = 0


class _ReadyLoader:
    """The same ready-made batch forever: measures the model, not JPEG decoding."""

    def __init__(self, config, patch_size: int, device):
        import torch

        from curate.train.augment import MaskingConfig, block_masks

        b, c = config.batch_size, config.crops
        grid = c.global_size // patch_size
        masks = block_masks(2 * b, grid, MaskingConfig(), random.Random(0))
        self.batch = _ReadyBatch(
            torch.randn(2 * b, 3, c.global_size, c.global_size, device=device),
            torch.randn(c.n_local * b, 3, c.local_size, c.local_size, device=device),
            masks.to(device),
        )
        self.bad_images = 0
        self.position = None

    def __iter__(self):
        while True:
            yield self.batch


def gpu_one(arch: str, batch: int, steps: int) -> dict:
    import torch

    from curate.train.loop import train
    from schemas.train import load_train_config

    config = load_train_config(
        overrides={
            "model": {"arch": arch, "drop_path_rate": 0.1},
            "crops": {"global_size": 224, "local_size": 98, "n_local": 8},
            "steps": 1000,
            "batch_size": batch,
            "checkpoint_every": 100_000,
            "log_every": 1,
            "optim": {"warmup_steps": 10},
        }
    )

    def loader(files, cfg, runtime, patch_size, position):
        return _ReadyLoader(cfg, patch_size, runtime.device)

    out = WORK / f"gpu-{arch}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    torch.cuda.reset_peak_memory_stats()
    result = train(
        config,
        [Path("ready-made")],
        out,
        stop_after=steps,
        progress=False,
        export=False,
        make_loader=loader,
    )
    return {
        "arch": arch,
        "batch_per_gpu": batch,
        "images_per_s_per_gpu": _steady_images_per_s(result.metrics, skip=3),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
        "device": torch.cuda.get_device_name(),
    }


def gpu(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no GPU on this machine"}
    runs = [
        in_fresh_process(gpu_one, "vit_small_patch14_dinov2", 128, args.gpu_steps),
        in_fresh_process(gpu_one, "vit_large_patch14_dinov2", 64, args.gpu_steps),
    ]
    return {"runs": runs}


# -- 3. proof of learning --------------------------------------------------------------------------


def proof(args: argparse.Namespace) -> dict:
    from curate.demo import generate_demo
    from curate.train.loop import train
    from schemas.train import load_train_config
    from services.cli.train import write_demo_training_data

    started = time.perf_counter()
    demo = WORK / f"demo-{args.demo_count}"
    generate_demo(demo, count=args.demo_count, seed=0)
    data = write_demo_training_data(demo, WORK / "demo-train")
    prepared_s = time.perf_counter() - started
    files = sorted(Path(data["shards"]).glob("*.parquet"))
    config = load_train_config(
        preset="small",
        overrides={
            "model": {"arch": args.proof_arch},
            "steps": args.schedule_steps,
            "num_workers": args.workers,
            "checkpoint_every": 100_000,
            "knn_every": 100_000,  # k-NN at step 0 (random init) and at the end only
        },
    )
    out = WORK / "proof-run"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result = train(
        config,
        files,
        out,
        time_limit_s=args.minutes * 60,
        knn_folder=Path(data["knn"]),
        progress=False,
    )
    random_init, trained = result.knn[0], result.knn[-1]
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    return {
        "demo_count": args.demo_count,
        "train_images": data["images"],
        "classes": 10,
        "arch": config.model.arch,
        "preset": "small",
        "schedule_steps": config.steps,
        "steps_done": result.steps_done,
        "stopped_by_time": result.out_of_time,
        "minutes_limit": args.minutes,
        "images_seen": result.steps_done * config.batch_size,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "knn_random_init": random_init["knn_accuracy"],
        "knn_trained": trained["knn_accuracy"],
        "knn_queries": trained["knn_queries"],
        "knn_bank": trained["knn_bank"],
        "prepare_s": prepared_s,
        "wall_s": time.perf_counter() - started,
    }


# -- report ----------------------------------------------------------------------------------------


def _context_line(section: dict) -> str:
    c = section.get("context")
    if not c:
        return ""
    return (
        f"Measured {c['measured']} in {c['seconds'] / 60:.1f} min, load average "
        f"{c['load_before']:.1f} before and {c['load_after']:.1f} after (shared machine), "
        f"commit {c['commit']}."
    )


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Trainer: DINO + iBOT + KoLeo throughput and proof of learning, {m['cpus']} CPUs",
        "",
        f"{m['platform']}; torch {m['torch']}, timm {m['timm']}. Load average "
        f"{m['load_before']:.1f} before, {m['load_after']:.1f} after (shared machine); whole run "
        f"{result['wall_s'] / 60:.1f} min.",
        "",
        code_line(result["code"]),
    ]
    if "throughput" in result:
        lines += [
            "",
            "## 1. Throughput on this CPU (one process)",
            "",
            "Trainer: the whole step from curated shards. Bare limit: the same backbones' "
            "student forward + backward and teacher forward on ready-made crops (no heads, "
            f"losses, data, optimizer, EMA). Warm-up steps excluded. {RSS_NOTE}",
            "",
            _context_line(result["throughput"]),
            "",
            "| preset | arch | crops | K | batch | trainer img/s | bare limit img/s | "
            "trainer / bare | peak RSS MiB (before) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["throughput"]["runs"]:
            lines.append(
                f"| {r['preset']} | {r['arch']} | {r['crops']} | {r['prototypes']} | "
                f"{r['batch_size']} | {r['images_per_s']:.1f} | {r['bare_images_per_s']:.1f} | "
                f"{r['images_per_s'] / r['bare_images_per_s']:.2f} | "
                f"{r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) |"
            )
    if "gpu" in result:
        lines += ["", "## 2. GPU, bf16, DINOv2 shapes (2 x 224 + 8 x 98, K = 65,536)", ""]
        g = result["gpu"]
        if "skipped" in g:
            lines.append(f"Skipped: {g['skipped']}.")
        else:
            lines += [
                "| arch | batch / GPU | img/s / GPU | peak GPU MiB | device |",
                "|---|---:|---:|---:|---|",
            ]
            for r in g["runs"]:
                lines.append(
                    f"| {r['arch']} | {r['batch_per_gpu']} | {r['images_per_s_per_gpu']:.1f} | "
                    f"{r['peak_gpu_mib']:.0f} | {r['device']} |"
                )
            lines.append(
                "\nReference: the DINOv2 README's figures imply about 90 img/s per A100 for "
                "ViT-L/16."
            )
    if "proof" in result:
        p = result["proof"]
        better = p["knn_trained"] - p["knn_random_init"]
        lines += [
            "",
            "## 3. Proof of learning: the demo corpus",
            "",
            _context_line(p),
            "",
            f"`{p['preset']}` preset ({p['arch']}), {p['train_images']} demo originals of "
            f"{p['classes']} classes as curated shards; trained for at most {p['minutes_limit']} "
            f"min ({p['steps_done']} of {p['schedule_steps']} scheduled steps"
            f"{', stopped by the time limit' if p['stopped_by_time'] else ''}, "
            f"{p['images_seen']:,} images seen). k-NN (k = 20, T = 0.07) on the teacher "
            f"backbone: {p['knn_bank']} bank images, {p['knn_queries']} queries.",
            "",
            "| network | k-NN top-1 |",
            "|---|---:|",
            f"| same network, random initialisation | {p['knn_random_init']:.3f} |",
            f"| trained | {p['knn_trained']:.3f} |",
            "",
            f"Difference {better:+.3f}; loss {p['first_loss']:.3f} at step 1, "
            f"{p['last_loss']:.3f} at the end.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--sections", nargs="+", default=["throughput", "gpu", "proof"])
    add("--tiny-steps", type=int, default=12)
    add("--small-steps", type=int, default=8)
    add("--gpu-steps", type=int, default=15)
    add("--minutes", type=float, default=9.0, help="proof: training time limit")
    add("--schedule-steps", type=int, default=400, help="proof: the schedules' length")
    add(
        "--proof-arch",
        default="vit_tiny_patch16_224",
        help="proof: the ViT trained (ViT-Ti/16 by default: more steps fit 2 CPU cores)",
    )
    add("--demo-count", type=int, default=2000, help="proof: demo corpus size")
    add("--workers", type=int, default=1, help="data loader processes")
    add(
        "--keep-other-sections",
        action="store_true",
        help="keep the earlier results of the sections not run now",
    )
    args = parser.parse_args()

    import timm
    import torch

    started = time.perf_counter()
    result = {
        "benchmark": "train",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "load_before": os.getloadavg()[0],
        },
        "code": code_version(MEASURED),
    }
    sections = {"throughput": throughput, "gpu": gpu, "proof": proof}
    previous = RESULTS / "train.json"
    if args.keep_other_sections and previous.is_file():
        # Sections not re-run keep their earlier figures, each with its own run's context.
        earlier = json.loads(previous.read_text())
        for name in sections:
            if name not in args.sections and name in earlier:
                result[name] = earlier[name]
    for name in args.sections:
        print(f"[train] {name} ...", flush=True)
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        result[name] = sections[name](args)
        result[name]["context"] = {
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "seconds": time.perf_counter() - t0,
            "commit": result["code"]["commit"],
            "modules": result["code"]["modules"],
        }
        print(f"[train] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    result["machine"]["load_after"] = os.getloadavg()[0]
    result["wall_s"] = time.perf_counter() - started
    result["args"] = vars(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=2, default=float))
    text = markdown(result)
    (RESULTS / "train.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
