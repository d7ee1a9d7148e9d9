"""The benchmark's copy model: trained with `curate copy-model train`'s own code on the tune
split's originals and the training pool (never on the held-out split), calibrated on the tune
split's labelled copies, then run on the held-out split at its calibrated operating point.
"""

import json
from pathlib import Path

import numpy as np
from copybench.score import Split

from curate.copy_model.calibrate import calibrate, curve, recalibrated
from curate.copy_model.config import AugmentConfig, CopyTrainConfig
from curate.copy_model.corpus import decode_corpus
from curate.copy_model.train import TrainedModel, train_copy_model
from curate.stages.dedup.copy_detection import (
    copy_descriptors,
    copy_transform,
    load_copy_descriptor,
)
from curate.stages.dedup.model_card import read_model_card
from curate.stages.ingest.decode import load_rgb


def training_files(build: Path) -> list[Path]:
    """The tune split's originals (no edits: the model never sees a labelled copy) and the pool."""
    manifest = json.loads((build / "manifest.json").read_text())
    tune = [build / "tune" / r["file"] for r in manifest["splits"]["tune"] if r["edit"] == ""]
    return tune + [build / "pool" / r["file"] for r in manifest["pool"]]


def train(build: Path, runs: Path, minutes: float, size: int, log=print) -> TrainedModel:
    """Train (or reuse the finished run of the same images and settings) for `minutes`."""
    config = CopyTrainConfig(minutes=minutes, augment=AugmentConfig(size=size))
    corpus = decode_corpus(
        training_files(build),
        "copybench tune-split originals + training pool",
        side=2 * size,
        max_images=20_000,
        max_held_out=200,  # self-calibration images; the benchmark recalibrates on its tune split
        progress=False,
    )
    log(f"[copybench] copy model: {len(corpus.train)} training images, {minutes:g} min budget")
    return train_copy_model(corpus, runs, config, progress=True, log=log)


def describe(weights: Path, split: Split) -> np.ndarray:
    """Descriptors of every file of a split, as the dedup stage computes them."""
    card = read_model_card(weights)
    model = load_copy_descriptor(weights, allow_random=False)
    images = (load_rgb(path.read_bytes()) for path in split.paths)
    return copy_descriptors(model, images, transform=copy_transform(card.input_size))


def calibrate_on_tune(weights: Path, split: Split, build: Path) -> dict:
    """The model's operating points from the tune split, stored in its card; the false-match
    rate over the tune split's originals and training-pool pictures, 2,000 in all (as
    `curate copy-model train` measures it on its own images)."""
    images = [load_rgb(path.read_bytes()) for path in split.paths]
    manifest = json.loads((build / "manifest.json").read_text())
    pool = [build / "pool" / row["file"] for row in manifest["pool"]]
    originals = int((split.edit == "").sum())
    chosen = np.random.default_rng(0).choice(len(pool), 2000 - originals, replace=False)
    distractors = [load_rgb(pool[i].read_bytes()) for i in np.sort(chosen)]
    record = calibrate(
        weights,
        images,
        split.source,
        split.edit,
        labelled_set=f"copybench tune split ({build.name}, {len(split)} files)",
        distractors=distractors,
    )
    recalibrated(weights, record)
    return record


def held_out_curve(descriptors: np.ndarray, split: Split) -> list[dict]:
    return curve(descriptors, split.source, split.edit)
