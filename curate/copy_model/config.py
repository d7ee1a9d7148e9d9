"""A copy-model run's settings, checked: the augmentation strengths and the training knobs.

Light on purpose (no torch): the command line checks its flags against these before the
training modules load.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from schemas.errors import InputError

TRUNKS = ("resnet18", "resnet50")  # copy_detection.SSCDNet's
# Bumped when the training code changes what a run makes: a cached run of the old recipe is
# not reused for a new one.
RECIPE_VERSION = 2


class CopyConfigError(InputError, ValueError):
    """A copy-model setting out of its range; the message names the setting."""

    code = "copy_config_invalid"


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths of each augmentation step (SSCD's values where it gives them;
    curate.copy_model.augment applies them)."""

    size: int = 128  # side of the square training view, and the model's inference size
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area share of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    rotate: float = 0.25
    max_degrees: float = 15.0
    colour: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grey: float = 0.2
    blur: float = 0.3
    text: float = 0.25
    emoji: float = 0.25
    pad: float = 0.1
    jpeg: float = 0.3

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 512:
            raise CopyConfigError(f"size must be within 32..512 pixels, got {self.size}")
        for item in fields(self):
            value = getattr(self, item.name)
            if (
                item.name
                in ("flip", "rotate", "colour", "grey", "blur", "text", "emoji", "pad", "jpeg")
                and not 0.0 <= value <= 1.0
            ):
                raise CopyConfigError(f"augment.{item.name} is a probability, got {value}")


@dataclass(frozen=True)
class CopyTrainConfig:
    """Every setting of a copy-model run; all of them are part of the run's key."""

    arch: str = "resnet18"
    dim: int = 512
    batch_size: int = 64  # images per step, two views each
    lr: float = 1e-3  # AdamW peak
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_share: float = 0.05
    temperature: float = 0.1  # InfoNCE temperature (train.py: why not SSCD's 0.05)
    entropy_weight: float = 1.0  # weight of the KoLeo term (see train.py on SSCD's 30)
    steps: int = 50_000  # an upper bound: a time budget usually ends the run first
    minutes: float | None = None  # training time budget
    seed: int = 0
    flip_invariant: bool = True  # see copy_detection.FlipInvariant
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        checks = {
            "arch": (self.arch in TRUNKS, f"one of {', '.join(TRUNKS)}"),
            "dim": (8 <= self.dim <= 4096, "within 8..4096"),
            "batch_size": (self.batch_size >= 2, "at least 2 (InfoNCE needs negatives)"),
            "lr": (self.lr > 0, "positive"),
            "min_lr": (0 <= self.min_lr <= self.lr, "within 0..lr"),
            "weight_decay": (self.weight_decay >= 0, "non-negative"),
            "warmup_share": (0 <= self.warmup_share < 1, "within 0..1"),
            "temperature": (self.temperature > 0, "positive"),
            "entropy_weight": (self.entropy_weight >= 0, "non-negative"),
            "steps": (self.steps >= 1, "at least 1"),
            "minutes": (self.minutes is None or self.minutes > 0, "positive"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise CopyConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    def key(self, corpus_fingerprint: str) -> str:
        """The run folder's name: the images' content, every setting and the recipe's version."""
        text = json.dumps(
            {"corpus": corpus_fingerprint, "recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]
