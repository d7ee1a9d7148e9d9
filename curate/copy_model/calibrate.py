"""Calibration: a copy model's precision/recall curve on a labelled copy set, and the operating
points a job runs at when it gives no threshold of its own.

A cosine threshold means nothing across models (a model trained for minutes spreads its
descriptors differently from SSCD's published ResNet-50), so it is measured per model:
  - labelled set: originals and the named edits of each (`edits`), the other originals being
    the distractors. By default, held-out images of the model's own training corpus (a model
    always comes calibrated); the copy benchmark's tune split where one is built.
  - curve: for every threshold on a grid, the copy pass's groups (components of the pairs above
    it) scored as the benchmark scores them (`scores`), and the precision of the raw pairs.
  - copy threshold: the lowest threshold at which group pair precision reaches `precision`
    (0.95): the most recall the copy pass can have at that precision.
  - eval threshold: the same on raw-pair precision at `eval_precision` (0.8), never above the
    copy threshold. An evaluation set is small and a missed copy of one of its images leaks the
    test into training, so this pass trades precision for recall, as DINOv2's 0.45 against 0.6.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from curate.copy_model.edits import EDITS
from curate.copy_model.scores import score_groups
from curate.core.atomic import atomic_path
from curate.stages.dedup.copy_detection import copy_descriptors, copy_transform
from curate.stages.dedup.grouping import connected_components
from curate.stages.dedup.model_card import ModelCard, read_model_card

# Cosine thresholds, finer near 1: a briefly trained model packs its copies in 0.9-1.0.
# Bumped when a calibration record gains what a job needs from it: an older record is redone.
CALIBRATION_VERSION = 3
GRID = np.round(np.r_[np.arange(0.2, 0.9, 0.01), np.arange(0.9, 0.998, 0.0025)], 4)
PRECISION = 0.95
EVAL_PRECISION = 0.8


def labelled_copies(
    originals: list[Image.Image],
) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """The originals and every named edit of each: (images, source index, edit name or "")."""
    images, source, edit = list(originals), list(range(len(originals))), [""] * len(originals)
    for s, img in enumerate(originals):
        for named in EDITS:
            images.append(named.apply(img))
            source.append(s)
            edit.append(named.name)
    return images, np.asarray(source, np.int64), np.asarray(edit, dtype=object)


def _pairs_above(descriptors: np.ndarray, floor: float) -> tuple[np.ndarray, ...]:
    """(left, right, cosine) of every pair i < j above `floor`, by decreasing cosine."""
    x = np.asarray(descriptors, np.float32)
    lefts, rights, sims = [], [], []
    for start in range(0, len(x), 1024):
        block = x[start : start + 1024] @ x.T
        rows, cols = np.nonzero(block > floor)
        rows = rows + start
        later = cols > rows
        lefts.append(rows[later])
        rights.append(cols[later])
        sims.append(block[rows[later] - start, cols[later]])
    left, right, sim = (np.concatenate(a) if a else np.zeros(0) for a in (lefts, rights, sims))
    order = np.argsort(-sim, kind="stable")
    return left[order].astype(np.int64), right[order].astype(np.int64), sim[order]


def distractor_pairs(source: np.ndarray) -> int:
    """Pairs of images of different sources: where a false match can happen."""
    sizes = np.bincount(source).astype(np.int64)
    n = int(sizes.sum())
    return n * (n - 1) // 2 - int((sizes * (sizes - 1) // 2).sum())


def false_match_rates(pictures: np.ndarray) -> np.ndarray:
    """Per threshold of GRID, the share of pairs of distinct pictures (unedited, as most of a
    crawl is) whose descriptors are above it."""
    count = len(pictures)
    if count < 2:
        return np.zeros(len(GRID))
    _, _, sim = _pairs_above(pictures, float(GRID[0]))
    above = np.searchsorted(-sim, -GRID, side="left")  # pairs with cosine > t (sim descends)
    return above / (count * (count - 1) / 2)


def curve(
    descriptors: np.ndarray,
    source: np.ndarray,
    edit: np.ndarray,
    pictures: np.ndarray | None = None,
) -> list[dict]:
    """The copy pass's scores at every threshold of GRID on the labelled set, and the
    false-match rate per pair among `pictures` (descriptors of distinct unedited pictures; the
    labelled set's originals by default), which a job scales its threshold by."""
    left, right, sim = _pairs_above(descriptors, float(GRID[0]))
    rates = false_match_rates(descriptors[edit == ""] if pictures is None else pictures)
    points = []
    for threshold, rate in zip(GRID, rates, strict=True):
        kept = int(np.searchsorted(-sim, -threshold, side="left"))  # pairs with cosine > t
        a, b = left[:kept], right[:kept]
        scores = score_groups(connected_components(len(source), a, b), source, edit)
        edge_precision = float((source[a] == source[b]).mean()) if kept else 1.0
        points.append(
            {
                "threshold": float(threshold),
                "pair_precision": round(scores["pair_precision"], 4),
                "edge_precision": round(edge_precision, 4),
                "false_match_rate": float(rate),
                "easy_recall": round(scores["easy_recall"], 4),
                "hard_geometric_recall": round(scores["hard_geometric_recall"], 4),
                "per_family_recall": {
                    k: round(v, 4) for k, v in scores["per_family_recall"].items()
                },
                "wrongly_merged": scores["wrongly_merged"],
            }
        )
    return points


def _lowest_reaching(points: list[dict], key: str, target: float) -> float:
    """The lowest threshold at which `key` reaches the target (the top of the grid if none):
    the most recall at that precision. Not the lowest from which it never falls again: near the
    top of the grid a handful of pairs decide the precision, and one false edge chained into a
    group there dips it under the target at thresholds that keep almost no copies."""
    for point in points:
        if point[key] >= target:
            return point["threshold"]
    return points[-1]["threshold"]


def operating_points(
    points: list[dict], precision: float = PRECISION, eval_precision: float = EVAL_PRECISION
) -> dict:
    copy = _lowest_reaching(points, "pair_precision", precision)
    evaluation = min(copy, _lowest_reaching(points, "edge_precision", eval_precision))
    at = {p["threshold"]: p for p in points}
    return {
        "copy_threshold": copy,
        "eval_threshold": evaluation,
        "precision_target": precision,
        "eval_precision_target": eval_precision,
        "precision_reached": at[copy]["pair_precision"] >= precision,
        "at_copy_threshold": at[copy],
    }


def calibrate(
    weights: Path,
    images: list[Image.Image],
    source: np.ndarray,
    edit: np.ndarray,
    *,
    labelled_set: str,
    distractors: list[Image.Image] = (),
    precision: float = PRECISION,
    eval_precision: float = EVAL_PRECISION,
) -> dict:
    """The calibration record of the model in `weights` on a labelled copy set.

    distractors: more distinct pictures for the false-match rate, with the labelled set's
    originals: a rate a job of N images scales by must be measured on many more than the
    hundred or so originals a labelled set has (a rate of 1e-5 needs 100,000 pairs).
    """
    from curate.stages.dedup.copy_detection import load_copy_descriptor

    card = read_model_card(weights)
    model = load_copy_descriptor(weights, allow_random=False)
    transform = copy_transform(card.input_size)
    descriptors = copy_descriptors(model, images, transform=transform)
    pictures = descriptors[edit == ""]
    if len(distractors):
        pictures = np.concatenate(
            [pictures, copy_descriptors(model, distractors, transform=transform)]
        )
    points = curve(descriptors, source, edit, pictures)
    return {
        "version": CALIBRATION_VERSION,
        "set": labelled_set,
        "images": len(images),
        "originals": int(len(np.unique(source))),
        "distractor_pairs": distractor_pairs(source),
        "false_match_pictures": len(pictures),
        **operating_points(points, precision, eval_precision),
        "curve": points,
    }


def calibrate_self(
    weights: Path, held_out: list[Image.Image], distractors: list[Image.Image] = ()
) -> dict:
    """Calibration on held-out images of the training corpus and their named edits; the
    false-match rate over those and `distractors` (training images: for the model of a crawl
    trained on that crawl, the very pairs a job compares)."""
    images, source, edit = labelled_copies(held_out)
    name = (
        f"self: {len(held_out)} held-out training images x {len(EDITS)} named edits, "
        f"false matches among {len(held_out) + len(distractors)} pictures"
    )
    return calibrate(weights, images, source, edit, labelled_set=name, distractors=distractors)


def write_card(weights: Path, card: ModelCard) -> None:
    """Rewrite the weights file with `card` as its metadata, atomically."""
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    with atomic_path(Path(weights)) as tmp:
        save_file(tensors, str(tmp), metadata=card.to_metadata())


def recalibrated(weights: Path, calibration: dict) -> ModelCard:
    """Store a new calibration in the weights file's card; returns the new card."""
    card = replace(read_model_card(weights), calibration=calibration)
    write_card(weights, card)
    return card


def is_current(calibration: dict | None) -> bool:
    """Whether a model's calibration record is of this version (None: not calibrated)."""
    return calibration is not None and calibration.get("version") == CALIBRATION_VERSION
