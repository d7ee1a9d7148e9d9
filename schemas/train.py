"""The trainer's run configuration: every knob of a DINO + iBOT + KoLeo run, validated.

Schedules are counted in iterations (there is no "epoch" of a fixed, made-up length). Defaults
follow the DINOv2 reference (ViT-L/16 short schedule: 100 of its 1,250-iteration "epochs") where
it has one, converted to iterations; `PRESETS` holds the small
configurations this repository tests and benchmarks on CPU.
"""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import InputError


class TrainConfigError(InputError, ValueError):
    """A training configuration that does not validate; the message names every bad field."""

    code = "train_config_invalid"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelOptions(_Section):
    """The timm backbone and the projection heads.

    The backbone takes the arch's own timm defaults, so the exported weights load into
    `timm.create_model(arch)` unchanged. Two differences from the reference follow from that:
    LayerScale exists only where the arch has it (the *_dinov2 archs; the default
    vit_large_patch16_224 has none, the reference uses 1e-5), and timm's drop path grows
    linearly over the blocks up to `drop_path_rate` where the reference applies it uniformly.
    """

    arch: str = Field("vit_large_patch16_224", description="timm ViT architecture name")
    drop_path_rate: float = Field(0.3, ge=0, lt=1, description="student only; teacher has none")
    prototypes: int = Field(65536, ge=2, description="K: DINO (and iBOT) head output size")
    head_hidden: int = Field(2048, ge=1)
    head_bottleneck: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    separate_ibot_head: bool = Field(False, description="iBOT head of its own, else shared")
    ibot_prototypes: int | None = Field(None, ge=2, description="separate head's K (default K)")


class CropOptions(_Section):
    """Multi-crop and iBOT masking (curate.train.augment's configs)."""

    global_size: int = Field(224, ge=8)
    local_size: int = Field(96, ge=8)
    n_local: int = Field(8, ge=0)
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    mask_probability: float = Field(0.5, ge=0, le=1, description="share of masked global crops")
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    min_block_patches: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> "CropOptions":
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must be 0 < low <= high <= 1, got {(low, high)}")
        low, high = self.mask_ratio
        if not 0 <= low <= high <= 1:
            raise ValueError(f"mask_ratio must be 0 <= low <= high <= 1, got {(low, high)}")
        return self


class LossOptions(_Section):
    centering: Literal["softmax", "sinkhorn"] = "sinkhorn"
    sinkhorn_iterations: int = Field(3, ge=1)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0, description="after the warmup")
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_steps: int = Field(37_500, ge=0, description="the reference's 30 epochs")
    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)


class OptimOptions(_Section):
    base_lr: float = Field(0.004, gt=0, description="for a global batch of 1024 (sqrt scaling)")
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(12_500, ge=0, description="the reference's 10 epochs")
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.2, ge=0)
    momentum_teacher: float = Field(0.992, ge=0, le=1)
    momentum_teacher_end: float = Field(1.0, ge=0, le=1)
    freeze_last_layer_steps: int = Field(1_250, ge=0)
    clip_grad: float | None = Field(3.0, gt=0, description="global gradient norm; null: none")
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)


class TrainConfig(_Section):
    """One training run. `steps` is the schedules' length; a run may stop earlier and resume."""

    model: ModelOptions = ModelOptions()
    crops: CropOptions = CropOptions()
    loss: LossOptions = LossOptions()
    optim: OptimOptions = OptimOptions()
    steps: int = Field(125_000, ge=1, description="iterations the schedules span")
    batch_size: int = Field(64, ge=2, description="images per rank per step")
    seed: int = 0
    num_workers: int = Field(0, ge=0, description="data loader worker processes per rank")
    checkpoint_every: int = Field(1_000, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept")
    log_every: int = Field(1, ge=1, description="steps between metrics lines")
    knn_every: int | None = Field(None, ge=1, description="steps between k-NN evaluations")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) > steps")
        if self.crops.local_size > self.crops.global_size:
            raise ValueError("crops.local_size must not exceed crops.global_size")
        return self

    def to_yaml(self) -> str:
        """The full configuration as YAML: what a run directory records and resumes with."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `update`, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Small runs: `tiny` is the tests' network (seconds per step on one CPU core), `small` the CPU
# benchmark and proof-of-learning network. Both keep every part of the method switched on.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            # timm's own test ViT: 6 blocks of width 64, a class token, seconds per step.
            "arch": "test_vit",
            "drop_path_rate": 0.1,
            "prototypes": 64,
            "head_hidden": 128,
            "head_bottleneck": 32,
        },
        "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
        "loss": {"warmup_teacher_temp_steps": 5},
        "optim": {"warmup_steps": 2, "freeze_last_layer_steps": 1, "base_lr": 0.02},
        "steps": 20,
        "batch_size": 4,
        "checkpoint_every": 10,
        "log_every": 1,
    },
    "small": {
        "model": {
            "arch": "vit_small_patch16_224",
            "drop_path_rate": 0.1,
            "prototypes": 1024,
            "head_hidden": 512,
            "head_bottleneck": 128,
        },
        "crops": {"global_size": 64, "local_size": 32, "n_local": 4},
        "loss": {"warmup_teacher_temp_steps": 30},
        "optim": {"warmup_steps": 20, "freeze_last_layer_steps": 10, "base_lr": 0.008},
        "steps": 300,
        "batch_size": 32,
        "checkpoint_every": 50,
    },
}


def _validated(body: dict[str, Any], where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(body)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
        )
        raise TrainConfigError(f"{where}: {problems}") from None


def load_train_config(
    path: Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """A preset (or the defaults), updated by a YAML file, then by `overrides` (nested dicts)."""
    body: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise TrainConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        body = deep_merge(body, PRESETS[preset])
    where = f"preset {preset}" if preset else "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"{path}: training config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise TrainConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: expected a mapping at the top level")
        body = deep_merge(body, loaded)
        where = str(path)
    if overrides:
        body = deep_merge(body, overrides)
    return _validated(body, where)
