"""The real-image copy benchmark, in one run: imagededup's PHash and DHash, our hash pass, our copy
model after a bounded training on this machine, and the hash pass followed by the copy pass as
the dedup stage chains them, on the same files.

    python bench/copybench/run.py                 # build (cached), train (cached), score
    python bench/copybench/run.py --minutes 30    # the copy model's training budget

The benchmark is built from Debian's image packages (bench/copybench/sources.py, build.py) under
bench/work/copybench/ (git-ignored). Hash methods are scored on both splits (tune, where our
defaults were chosen, and held-out, which confirms them); the copy model trains on the tune
split's originals and a training pool, is calibrated on the tune split's labelled copies, and is
scored on the held-out split only. imagededup's CNN method is left out: it needs MobileNetV3
ImageNet weights from the internet, which this project never downloads.

Writes bench/results/copybench.json and bench/results/copybench.md.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

from copybench import methods, model  # noqa: E402
from copybench.build import Plan, build  # noqa: E402
from copybench.report import markdown  # noqa: E402
from copybench.score import load_split, score_labels, score_pairs  # noqa: E402
from measuring import code_version, timed  # noqa: E402

from curate.stages.dedup.model_card import read_model_card, resolve_thresholds  # noqa: E402
from curate.stages.ingest.decode import load_rgb  # noqa: E402
from schemas.job import DedupOptions  # noqa: E402

WORK = BENCH / "work" / "copybench"
RESULTS = BENCH / "results"
MEASURED = (
    "curate/stages/dedup/pca_hash/features.py",
    "curate/stages/dedup/pca_hash/basis.py",
    "curate/stages/dedup/pca_hash/search.py",
    "curate/stages/dedup/decide.py",
    "curate/copy_model/augment.py",
    "curate/copy_model/train.py",
    "curate/copy_model/calibrate.py",
    "curate/copy_model/config.py",
)
TARGETS = {
    "hash pair precision": 0.95,
    "combined pair precision": 0.95,
    "combined hard-geometric recall": 0.6,
    "combined easy-edit recall": 0.95,
    "PHash hard-geometric recall below": 0.1,
    "training minutes at most": 30.0,
}


def _areas(split) -> np.ndarray:
    return np.array([np.prod(load_rgb(p.read_bytes()).size) for p in split.paths], np.int64)


def _copy_methods(split, hash_pairs, weights: Path) -> dict:
    """The copy model alone and after the hash pass, at the threshold the dedup stage would
    run it at: the model's calibration scaled to the number of files (the copy pass compares
    every file, whether or not the hash pass grouped it)."""
    calibrated = resolve_thresholds(None, None, read_model_card(weights))
    descriptors, seconds = timed(model.describe, weights, split)
    scaled = calibrated.at_scale(len(split))
    point = {"threshold": scaled.copy, "threshold_source": scaled.copy_source}
    left, right = methods.cosine_pairs(descriptors, scaled.copy)
    copy = {**score_pairs(left, right, split), "seconds": seconds, **point}
    labels = methods.chained_labels(
        len(split), *hash_pairs, descriptors, scaled.copy, _areas(split)
    )
    combined = {**score_labels(labels, split), **point}
    return {
        "copy_model": copy,
        "combined": combined,
        "curve": model.held_out_curve(descriptors, split),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="copy-model training budget")
    parser.add_argument("--size", type=int, default=96, help="copy-model input side")
    parser.add_argument("--no-model", action="store_true", help="hash methods only")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = {
        "benchmark": "copybench",
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(MEASURED),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": os.getloadavg()[0],
        },
        "targets": TARGETS,
        "imagededup_cnn": "left out: its MobileNetV3 needs ImageNet weights from the internet",
    }
    folder = build(WORK, Plan())
    manifest = json.loads((folder / "manifest.json").read_text())
    result["build"] = {
        "folder": folder.name,
        "plan": manifest["plan"],
        "pool": len(manifest["pool"]),
        "splits": {s: _split_counts(rows) for s, rows in manifest["splits"].items()},
    }
    options = DedupOptions()
    splits = {name: load_split(folder, name) for name in ("tune", "heldout")}
    trained = None
    if not args.no_model:
        trained, train_s = timed(model.train, folder, WORK / "runs", args.minutes, args.size)
        calibration = model.calibrate_on_tune(trained.weights, splits["tune"], folder)
        result["copy_model"] = {
            "weights": str(trained.weights),
            "made": trained.card.made,
            "reused": trained.reused,
            "wall_s": train_s,
            "calibration": calibration,
        }
    for name, split in splits.items():
        print(f"[copybench] {name}: hashing {len(split)} files", flush=True)
        scores = methods.compare_hashes(split, options)
        hash_pairs = scores.pop("_pairs")
        if trained is not None and name == "heldout":
            scores |= _copy_methods(split, hash_pairs, trained.weights)
        result[name] = scores
    result["machine"]["load_after"] = os.getloadavg()[0]
    result["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "copybench.json").write_text(json.dumps(result, indent=2, default=float))
    text = markdown(result)
    (RESULTS / "copybench.md").write_text(text)
    print(text)


def _split_counts(rows: list[dict]) -> dict:
    originals = [r for r in rows if r["edit"] == ""]
    edited = {r["source"] for r in rows if r["edit"]}
    return {
        "files": len(rows),
        "originals": len(originals),
        "edited_originals": len(edited),
        "photographs": sum(r["kind"] == "photo" for r in originals),
        "artwork": sum(r["kind"] == "art" for r in originals),
        "categories": len({r["category"] for r in originals}),
    }


if __name__ == "__main__":
    main()
