"""What a copy-descriptor file says about itself: its input size, whether its descriptor is
mirror-invariant, how it was made, and its calibrated operating points.

Our own models (`curate copy-model train`) are safetensors files whose metadata holds this card
as JSON under `copy_model`; a published SSCD file has none and gets SSCD's own settings: 320 px
inputs and DINOv2's thresholds (copies above cosine 0.6, eval-set copies above 0.45).

A cosine threshold means something only for the model it was measured on: the card's
`calibration` holds the model's precision/recall curve on a labelled copy set and the operating
points chosen on it, and a job whose options leave a threshold unset uses the model's own.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors import safe_open

from curate.core.weights import is_safetensors

METADATA_KEY = "copy_model"
# DINOv2's settings for SSCD (LVD-142M): what a model without calibration is run at.
DEFAULT_COPY_THRESHOLD = 0.6
DEFAULT_EVAL_THRESHOLD = 0.45
DEFAULT_INPUT_SIZE = 320  # SSCD's square inference size
# What a calibrated job tolerates (see `Thresholds`): images removed as copies of an unrelated
# evaluation image.
EVAL_FALSE_SHARE = 0.01


@dataclass(frozen=True)
class ModelCard:
    """A copy-descriptor file's own account of itself (defaults: a published SSCD file)."""

    arch: str | None = None  # trunk, when the file names it
    input_size: int = DEFAULT_INPUT_SIZE
    flip_invariant: bool = False  # descriptor = normalise(f(x) + f(mirror(x)))
    made: dict[str, Any] = field(default_factory=dict)  # how it was trained, on what
    calibration: dict[str, Any] | None = None  # curve and operating points (`calibrate`)

    @property
    def copy_threshold(self) -> float | None:
        return None if self.calibration is None else float(self.calibration["copy_threshold"])

    @property
    def eval_threshold(self) -> float | None:
        return None if self.calibration is None else float(self.calibration["eval_threshold"])

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "ModelCard":
        if METADATA_KEY not in metadata:
            return cls()
        values = json.loads(metadata[METADATA_KEY])
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def summary(self) -> str:
        """One line for logs and the dataset card."""
        if not self.made:
            return "a published or external copy-descriptor file (no training record)"
        made = self.made
        return (
            f"{made.get('arch', self.arch)} trained in-house by `curate copy-model train` on "
            f"{made.get('images', '?')} images of {made.get('source', '?')} for "
            f"{made.get('steps', '?')} steps ({made.get('minutes', 0):.1f} min on "
            f"{made.get('device', '?')})"
        )


def read_model_card(path: Path | None) -> ModelCard:
    """The card of the weights file at `path` (header only: no tensor is read)."""
    if path is None or not Path(path).is_file() or not is_safetensors(Path(path)):
        return ModelCard()
    try:
        with safe_open(str(path), framework="pt") as handle:
            return ModelCard.from_metadata(handle.metadata() or {})
    except Exception:  # an unreadable header is reported by the loader, with its cause
        return ModelCard()


@dataclass(frozen=True)
class Thresholds:
    """The cosines a job runs at, and where each came from.

    A calibrated model's copy point holds for a set the size of its calibration set: there, its
    false pairs were few enough for the precision it was chosen for. A job compares more images:
    its false pairs grow with the square of their number, its copies with the number. So a job
    with `at_scale` runs at the lowest cosine whose false-match rate (per pair of distinct
    pictures, measured in calibration) is at most the calibrated point's rate times
    calibration images / job images: as many false pairs per image as at calibration. A job
    smaller than the calibration set keeps the calibrated point. The eval-set point allows at
    most EVAL_FALSE_SHARE of the job's images removed as copies of an unrelated evaluation image.
    """

    copy: float
    eval: float
    copy_source: str  # "job" | "calibrated" | "default", then how it was scaled
    eval_source: str
    false_match_rates: tuple[tuple[float, float], ...] = ()  # (threshold, rate), ascending
    # The calibrated copy point's false-match rate and the number of images it was chosen on.
    anchor: tuple[float, int] | None = None

    def metrics(self) -> dict[str, Any]:
        return {
            "copy_threshold": self.copy,
            "copy_threshold_source": self.copy_source,
            "eval_threshold": self.eval,
            "eval_threshold_source": self.eval_source,
        }

    def at_scale(self, images: int, eval_images: int = 0) -> "Thresholds":
        """The calibrated points moved to a job of `images` images (and `eval_images` in its
        evaluation sets); thresholds given by the job or by default stay as they are."""
        if not self.false_match_rates or images < 2:
            return self
        copy, copy_source = self.copy, self.copy_source
        if copy_source == "calibrated" and self.anchor is not None:
            rate, calibration_images = self.anchor
            allowed = rate * calibration_images / images
            copy = max(copy, _rate_threshold(self.false_match_rates, allowed))
            copy_source = (
                f"calibrated on {calibration_images:,} images, scaled to {images:,}: at most "
                "the calibration's false pairs per image"
            )
        evaluation, eval_source = self.eval, self.eval_source
        if eval_source == "calibrated" and eval_images:
            evaluation = _rate_threshold(self.false_match_rates, EVAL_FALSE_SHARE / eval_images)
            evaluation = min(evaluation, copy)
            eval_source = (
                f"calibrated: false eval-set matches for at most {EVAL_FALSE_SHARE:.0%} of "
                f"{images:,} images against {eval_images:,} eval images"
            )
        return replace(
            self, copy=copy, eval=evaluation, copy_source=copy_source, eval_source=eval_source
        )


def _rate_threshold(rates: tuple[tuple[float, float], ...], allowed: float) -> float:
    """The lowest threshold whose measured false-match rate is within `allowed`; when the
    calibration set had too few pairs to measure so small a rate, the lowest at which it saw no
    false match at all (then the top of the grid)."""
    for threshold, rate in rates:
        if rate <= allowed:
            return threshold
    return rates[-1][0]


def resolve_thresholds(
    copy_threshold: float | None, eval_threshold: float | None, card: ModelCard
) -> Thresholds:
    """A threshold given by the job wins; else the model's calibrated point; else DINOv2's."""

    def pick(given: float | None, calibrated: float | None, default: float) -> tuple[float, str]:
        if given is not None:
            return float(given), "job"
        if calibrated is not None:
            return calibrated, "calibrated"
        return default, "default"

    copy, copy_source = pick(copy_threshold, card.copy_threshold, DEFAULT_COPY_THRESHOLD)
    evaluation, eval_source = pick(eval_threshold, card.eval_threshold, DEFAULT_EVAL_THRESHOLD)
    curve = (card.calibration or {}).get("curve", [])
    rates = tuple(
        (float(p["threshold"]), float(p["false_match_rate"]))
        for p in curve
        if "false_match_rate" in p
    )
    return Thresholds(copy, evaluation, copy_source, eval_source, rates, _anchor(card))


def _anchor(card: ModelCard) -> tuple[float, int] | None:
    """(false-match rate at the calibrated copy point, calibration images); a rate of 0 counts
    as one false pair among those measured, the least the calibration could have seen."""
    calibration = card.calibration or {}
    point = calibration.get("at_copy_threshold") or {}
    if "false_match_rate" not in point or "images" not in calibration:
        return None
    pictures = int(calibration.get("false_match_pictures", 0))
    floor = 2 / (pictures * (pictures - 1)) if pictures > 1 else 0.0
    return max(float(point["false_match_rate"]), floor), int(calibration["images"])
