"""Embedding backbones: a timm architecture name plus a local checkpoint, never a download.

Checkpoints read: safetensors; PyTorch state dicts, raw or wrapped by training code (a "model",
"state_dict", "teacher" or "student" entry; DDP's "module.", a self-supervised network's
"backbone." and torch.compile's "_orig_mod." prefixes); DINOv2's release files
(dinov2_vit*14[_reg4]_pretrain.pth) onto timm's *_dinov2 architectures; and backbones exported by
our trainer (curate/train/export.py). Every load is strict: a checkpoint that does not cover the
architecture exactly is refused with the keys that differ.
"""

import functools
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from curate.core.weights import REPORTED_KEYS, read_state_dict, strip_wrappers
from schemas.errors import ModelError

log = logging.getLogger(__name__)

WEIGHTS_SETTING = "CURATE_EMBED_WEIGHTS"
EXPORT_FORMAT = "lvd-curate-backbone"  # curate/train/export.py FORMAT
# DINOv2 and our trainer normalise with ImageNet statistics, whatever timm's default cfg for the
# architecture says (vit_huge_patch14_224's is 0.5/0.5, from its JAX origin).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINOv2 training checkpoints with block_chunks > 0 nest blocks as blocks.<chunk>.<index>; the
# index is already global (chunks are padded with Identity), so the chunk level just goes.
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


class WeightsError(ModelError, ValueError):
    """Embedding weights that are missing, unreadable, or do not fit the architecture."""

    code = "weights_invalid"


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build the embedding model itself."""

    arch: str  # timm name, e.g. vit_huge_patch14_224, vit_large_patch14_dinov2
    weights: Path | None
    allow_random: bool = False
    img_size: int = 224

    def fingerprint(self) -> str:
        """arch, input size and the weights' content: embeddings of different models never mix."""
        content = _file_sha256(Path(self.weights)) if self.weights is not None else "random"
        return f"{self.arch}@{self.img_size}:{content}"


@functools.cache
def _sha256_cached(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    # A ViT-H checkpoint is 2.5 GB: hash it once per process unless the file changes.
    try:
        stat = path.stat()
    except OSError as error:
        raise WeightsError(f"embedding weights {path}: {error.strerror or error}") from None
    return _sha256_cached(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_spec(spec: ModelSpec) -> None:
    """Fail fast, before any worker starts: unknown arch, missing file, no licence to run random."""
    if not timm.is_model(spec.arch):
        raise WeightsError(f"unknown timm architecture {spec.arch!r}")
    if spec.weights is None:
        if not spec.allow_random:
            raise WeightsError(
                f"no embedding weights: set {WEIGHTS_SETTING} to a local checkpoint for "
                f"{spec.arch} (safetensors, a PyTorch state dict, a DINOv2 release file or a "
                "backbone exported by `curate train export`); weights are never downloaded. "
                "To stop before embedding, run with --until dedup"
            )
        return
    if not Path(spec.weights).is_file():
        raise WeightsError(f"embedding weights not found: {spec.weights} ({WEIGHTS_SETTING})")


def _only_under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, renamed without it, when there are any; else `state`."""
    inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not inside:
        return state
    if len(inside) < len(state):
        log.info(
            "using the %d tensors under %r, ignoring %d others (heads, student)",
            len(inside),
            prefix,
            len(state) - len(inside),
        )
    return {strip_wrappers(k): v for k, v in inside.items()}


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training state dict reduced to the backbone's own keys: wrappers, teacher and heads off."""
    state = {strip_wrappers(k): v for k, v in state.items()}
    if any(k.startswith("teacher.") for k in state):
        state = _only_under(state, "teacher.")
    else:
        state = _only_under(state, "student.")
    return _only_under(state, "backbone.")


def _is_dinov2_release(state: dict[str, torch.Tensor]) -> bool:
    return "mask_token" in state


def _dinov2_to_timm(
    state: dict[str, torch.Tensor], model: nn.Module, spec: ModelSpec, path: Path
) -> dict[str, torch.Tensor]:
    """Check a DINOv2 release dict fits the chosen timm *_dinov2 arch; flatten chunked blocks."""
    if "dinov2" not in spec.arch:
        raise WeightsError(
            f"{path} is a DINOv2 release file: choose a timm *_dinov2 architecture "
            f"(vit_small|base|large|giant_patch14[_reg4]_dinov2), not {spec.arch}"
        )
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    model_registers = getattr(model, "num_reg_tokens", 0)
    if registers != model_registers:
        raise WeightsError(
            f"{path} has {registers} register tokens but {spec.arch} has {model_registers}: "
            + ("use the *_reg4_dinov2 variant" if registers else "use the variant without _reg4")
        )
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}


def _fit_to_model(
    state: dict[str, torch.Tensor], model: nn.Module, spec: ModelSpec, path: Path
) -> dict[str, torch.Tensor]:
    """Map checkpoint keys onto timm's and resample position embeddings to spec.img_size."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if _is_dinov2_release(state):
        state = _dinov2_to_timm(state, model, spec, path)
    if isinstance(model, VisionTransformer):
        # timm's own converter: DINOv2 key names (mlp.w12/w3, registers folded out of pos_embed,
        # mask_token dropped) and bicubic resampling of pos_embed to the model's grid.
        state = checkpoint_filter_fn(dict(state), model)
    return state


def _check_keys(
    state: dict[str, torch.Tensor], model: nn.Module, spec: ModelSpec, path: Path
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {keys[:REPORTED_KEYS]}"
        + (" ..." if len(keys) > REPORTED_KEYS else "")
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise WeightsError(
            f"{path} does not fit {spec.arch} at img_size {spec.img_size}: " + "; ".join(problems)
        )


def _normalisation(metadata: dict[str, str], dinov2: bool) -> dict[str, tuple[float, ...]]:
    """The pixel statistics the checkpoint was trained with, where the file says or implies it."""
    if metadata.get("format") == EXPORT_FORMAT:
        mean = json.loads(metadata["mean"]) if "mean" in metadata else IMAGENET_MEAN
        std = json.loads(metadata["std"]) if "std" in metadata else IMAGENET_STD
        return {"mean": tuple(mean), "std": tuple(std)}
    if dinov2:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {}


def _create(spec: ModelSpec) -> nn.Module:
    # Seeded, so that random-weight runs (tests, demo) embed alike in every actor and process:
    # the crawl and the seed sets must at least share one (meaningless) embedding space.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=spec.img_size)


def load_backbone(spec: ModelSpec) -> nn.Module:
    """The timm backbone of `spec` in eval mode on CPU, its checkpoint loaded strictly.

    The model's `pretrained_cfg` mean/std are those the checkpoint was trained with (ImageNet
    statistics for DINOv2 release files and our trainer's exports). No weights: WeightsError
    naming CURATE_EMBED_WEIGHTS unless spec.allow_random, then a loud warning.
    """
    check_spec(spec)
    model = _create(spec)
    if spec.weights is None:
        _warn(
            f"embedding model {spec.arch} runs with RANDOM WEIGHTS: its embeddings, clusters and "
            f"retrievals are meaningless (allowed for tests and the demo only; set "
            f"{WEIGHTS_SETTING} for real runs)"
        )
        return model.eval()
    path = Path(spec.weights)
    state, metadata = read_state_dict(path, what="embedding weights", error=WeightsError)
    if metadata.get("format") == EXPORT_FORMAT and metadata.get("arch") != spec.arch:
        raise WeightsError(
            f"{path} is an lvd-curate backbone of {metadata.get('arch')!r}, "
            f"but the job's embed arch is {spec.arch!r}"
        )
    state = backbone_state(state)
    dinov2 = _is_dinov2_release(state)
    state = _fit_to_model(state, model, spec, path)
    _check_keys(state, model, spec, path)
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = {**model.pretrained_cfg, **_normalisation(metadata, dinov2)}
    log.info("embedding model %s loaded from %s", spec.arch, path)
    return model.eval()
