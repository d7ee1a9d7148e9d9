"""SSCD-style copy descriptors (Pizzi et al., CVPR 2022): model, weights, preprocessing, inference.

The descriptor is a ResNet trunk, GeM pooling (p = 3), a linear projection to 512 dimensions and
L2 normalisation, so cosine similarity is a dot product. Two descriptors above a threshold are
treated as copies: the model's calibrated point when its file has one (`model_card`), DINOv2's
0.6 for a published SSCD file; the kNN graph over them lives in `knn_graph`. Models trained here
(`curate.copy_model`) are SSCDNets saved as safetensors with their card in the metadata.
"""

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from curate.core.devices import pick_device
from curate.core.weights import WRAPPER_PREFIXES, is_torchscript, read_state_dict, strip_wrappers
from curate.stages.dedup.model_card import DEFAULT_INPUT_SIZE, ModelCard
from schemas.errors import ModelError

log = logging.getLogger(__name__)

WEIGHTS_SETTING = "CURATE_COPY_WEIGHTS"
DESCRIPTOR_DIM = 512
SHORT_SIDE = 288  # SSCD's recommended inference size when aspect ratio is kept
FIXED_SIZE = DEFAULT_INPUT_SIZE  # SSCD's square size: skews the image, but batches on a GPU
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TRUNKS = {
    "resnet50": (torchvision.models.resnet50, 2048),
    "resnet18": (torchvision.models.resnet18, 512),
}
# Wrappers that training code puts around a model: DDP, torch.compile, and Lightning modules,
# which hold the network as `model`.
_WRAPPER_PREFIXES = (*WRAPPER_PREFIXES, "model.")


class CopyWeightsError(ModelError, ValueError):
    """A copy-descriptor checkpoint that is missing, unreadable or does not fit the model."""

    code = "copy_weights_invalid"


class GeM(nn.Module):
    """Generalised-mean pooling over all spatial positions: (mean x^p)^(1/p).

    p is fixed, not learned, as in SSCD (p = 3); p = 1 is average pooling, p -> inf max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The clamp keeps fractional powers real; trunk features are post-ReLU anyway.
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SSCDNet(nn.Module):
    """ResNet trunk -> GeM(p=3) -> Linear(features -> 512) -> L2 normalisation.

    `trunk="resnet50"` is SSCD's architecture (2048 trunk features). `trunk="resnet18"` (512
    features) is a convenience for tests and the demo only: same head, a fraction of the compute.
    """

    def __init__(self, trunk: str = "resnet50", dim: int = DESCRIPTOR_DIM, gem_p: float = 3.0):
        super().__init__()
        if trunk not in _TRUNKS:
            raise ValueError(f"unknown trunk {trunk!r}; choose one of {sorted(_TRUNKS)}")
        build, features = _TRUNKS[trunk]
        resnet = build(weights=None)
        # Up to the last stage; GeM and the projection replace avgpool and the classifier.
        layers = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in layers))
        self.pool = GeM(gem_p)
        self.projection = nn.Linear(features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.pool(self.trunk(x))), dim=-1)


class FlipInvariant(nn.Module):
    """A descriptor made blind to mirroring: normalise(f(x) + f(mirror(x))).

    A model trained for minutes on a CPU learns crops and colour well before it learns that a
    mirrored picture is the same picture; summing both orientations makes that exact, for
    twice the inference cost. Files store the wrapped model; their card says to wrap it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(x) + self.model(x.flip(-1)), dim=-1)


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_if_unweighted(path: Path | None, allow_random: bool) -> bool:
    """Say loudly when copy detection is skipped or runs on random weights; False if skipped."""
    if path is not None:
        return True
    if not allow_random:
        _warn(
            f"copy detection SKIPPED: no copy-descriptor weights; set {WEIGHTS_SETTING} to a "
            "local SSCD checkpoint (e.g. sscd_disc_mixup.torchscript.pt)"
        )
        return False
    _warn(
        "copy detection runs with RANDOM WEIGHTS: its copy groups are meaningless "
        f"(allowed for tests and the demo only; set {WEIGHTS_SETTING} for real runs)"
    )
    return True


def _load_torchscript(path: Path, device: str) -> nn.Module:
    with warnings.catch_warnings():
        # The published SSCD models exist only as TorchScript (besides state dicts), so the
        # deprecation notice is noise to us.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        return torch.jit.load(str(path), map_location=device)


def _canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and map SSCD's torchvision release layout onto SSCDNet's names."""
    renamed = {}
    for key, value in state.items():
        key = strip_wrappers(key, _WRAPPER_PREFIXES)
        # SSCD's `*.torchvision.pt` files keep the whole torchvision ResNet under `backbone.`,
        # with GeM in place of avgpool (no weights) and the 512-d projection as `fc`.
        if key.startswith("backbone.fc."):
            key = "projection." + key[len("backbone.fc.") :]
        elif key.startswith("backbone."):
            key = "trunk." + key[len("backbone.") :]
        renamed[key] = value
    return renamed


def _load_state_dict(path: Path, device: str) -> nn.Module:
    checkpoint = read_state_dict(path, what="copy-descriptor weights", error=CopyWeightsError)
    card = ModelCard.from_metadata(checkpoint.metadata)
    state = _canonical_keys(checkpoint.state)
    projection = state.get("projection.weight")
    trunk = "resnet18" if projection is not None and projection.shape[1] == 512 else "resnet50"
    trunk = card.arch or trunk
    if trunk not in _TRUNKS:
        raise CopyWeightsError(f"{path}: unknown trunk {trunk!r}; known: {sorted(_TRUNKS)}")
    dim = projection.shape[0] if projection is not None else DESCRIPTOR_DIM
    model = SSCDNet(trunk=trunk, dim=dim)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CopyWeightsError(
            f"{path} does not fit SSCDNet({trunk!r}): missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}"
        )
    return (FlipInvariant(model) if card.flip_invariant else model).to(device)


def load_copy_descriptor(
    path: Path | None, *, allow_random: bool, device: str | None = None, trunk: str = "resnet50"
) -> nn.Module | None:
    """The copy-descriptor model in eval mode, or None when there are no weights and no licence
    to run without them.

    path: a TorchScript file (the published `sscd_*.torchscript.pt`), a PyTorch state dict
    (raw or in a training checkpoint, see `curate.core.weights`; SSCD's `*.torchvision.pt`
    included) or safetensors.
    """
    device = device or pick_device()
    if path is None:
        if not warn_if_unweighted(path, allow_random):
            return None
        return SSCDNet(trunk=trunk).to(device).eval()
    path = Path(path)
    if not path.is_file():
        raise CopyWeightsError(f"copy-descriptor weights not found: {path}")
    try:
        model = (
            _load_torchscript(path, device)
            if is_torchscript(path)
            else _load_state_dict(path, device)
        )
    except CopyWeightsError:
        raise
    except Exception as error:  # torch raises many kinds for corrupt or foreign files
        raise CopyWeightsError(
            f"cannot read copy-descriptor weights {path}: {type(error).__name__}: {error}"
        ) from error
    log.info("copy descriptor loaded from %s on %s", path, device)
    return model.eval()


def copy_transform(
    fixed_size: int | None = FIXED_SIZE, short_side: int = SHORT_SIDE
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor [3, H, W], as SSCD was evaluated.

    fixed_size: resize (skewing) to fixed_size x fixed_size so batches stack; None keeps the
    aspect ratio with the short side at `short_side`. Runs in decode workers, not on the GPU.
    """
    size = [fixed_size, fixed_size] if fixed_size is not None else short_side
    steps = v2.Compose(
        [
            v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def transform(image: Image.Image) -> torch.Tensor:
        return steps(image if image.mode == "RGB" else image.convert("RGB"))

    return transform


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _embed_batch(model: nn.Module, tensors: list[torch.Tensor], device: torch.device) -> np.ndarray:
    # Short-side resizing gives images of different shapes: run one sub-batch per shape.
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_shape.setdefault(tuple(tensor.shape), []).append(position)
    out: np.ndarray | None = None
    for positions in by_shape.values():
        batch = torch.stack([tensors[p] for p in positions]).to(device, non_blocking=True)
        # channels_last suits cuDNN and oneDNN alike; convolutions carry it from the input on,
        # so the caller's model keeps its own memory format.
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            descriptors = model(batch)
        # bf16 compute (and any model that skips it) leaves norms off 1; cosine needs unit norm.
        descriptors = F.normalize(descriptors.float(), dim=-1).cpu().numpy()
        if out is None:
            out = np.empty((len(tensors), descriptors.shape[1]), dtype=np.float32)
        out[positions] = descriptors
    assert out is not None
    return out


def copy_descriptors(
    model: nn.Module,
    images: Iterable[Image.Image | torch.Tensor],
    batch_size: int = 32,
    device: str | None = None,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> np.ndarray:
    """Unit-norm float16 copy descriptors [N, dim] for PIL images or preprocessed tensors.

    PIL images go through `transform` (default `copy_transform()`, 320 x 320); tensors are taken
    as already preprocessed by the decode workers.
    """
    target = torch.device(device) if device is not None else _model_device(model)
    model = model.to(target).eval()
    transform = transform or copy_transform()
    chunks: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    with torch.inference_mode():
        for image in images:
            pending.append(image if isinstance(image, torch.Tensor) else transform(image))
            if len(pending) == batch_size:
                chunks.append(_embed_batch(model, pending, target).astype(np.float16))
                pending = []
        if pending:
            chunks.append(_embed_batch(model, pending, target).astype(np.float16))
    if not chunks:
        return np.empty((0, DESCRIPTOR_DIM), dtype=np.float16)
    return np.concatenate(chunks)


def normalize_scores(
    sims: np.ndarray,
    query_background_sims: np.ndarray,
    beta: float = 1.0,
    ranks: tuple[int, int] = (0, 2),
) -> np.ndarray:
    """SSCD's background score normalisation: s'(q, r) = s(q, r) - beta * s_bg(q).

    s_bg(q) is the mean similarity of q to its background neighbours of ranks ranks[0]..ranks[1]
    (0-based, inclusive). A query that is close to many unrelated images (a logo, a blank
    frame) needs a higher raw score to count as a copy. The SSCD paper (section 3.4) writes it
    with one neighbour, s(q, b_n(q)), i.e. ranks=(n, n); SSCD's DISC evaluation
    (`disc_eval.py`, `--score_norm 1.0[0,2]`) averages ranks 0..2 with beta = 1, our default.

    sims: [Q] or [Q, K] raw cosine similarities of each query; query_background_sims: [Q, >=
    ranks[1] + 1] the query's background similarities sorted high to low (a FAISS search).
    """
    first, last = ranks
    if query_background_sims.shape[1] <= last:
        raise ValueError(
            f"need {last + 1} background neighbours, got {query_background_sims.shape[1]}"
        )
    background = query_background_sims[:, first : last + 1].astype(np.float32).mean(axis=1)
    offset = beta * background
    sims = np.asarray(sims, dtype=np.float32)
    return sims - (offset if sims.ndim == 1 else offset[:, None])
