"""Reading model weights from disk: one reader for every model (embedder, copy descriptor).

What a file holds is told by its content, never its name: a safetensors file (tensors and string
metadata), a torch.save checkpoint (a state dict, raw or inside an entry of a training
checkpoint), or a TorchScript archive (a compiled model, not a state dict: only a model that is
published that way loads one, itself). Mapping the keys onto a model's own names stays with each
model; the prefixes that training wrappers put on every key are stripped with `strip_wrappers`.
"""

import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from schemas.errors import ModelError

# Wrappers training code puts around a module: DDP / FSDP1 and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Entries of a saved training checkpoint that hold a state dict, in order of preference: a
# self-supervised teacher is the model DINO and DINOv2 evaluate.
CHECKPOINT_ENTRIES = ("teacher", "model", "state_dict", "student")
# Keys an error message names before it only counts the rest.
REPORTED_KEYS = 6


class Checkpoint(NamedTuple):
    """A state dict read from a file, on the CPU."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]  # a safetensors header's metadata; empty for torch.save files


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save) rather than saved data."""
    # TorchScript archives carry compiled code and constants; torch.save archives only data.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def is_safetensors(path: Path) -> bool:
    """Whether `path` starts like a safetensors file, whatever its name."""
    if zipfile.is_zipfile(path):  # torch.save archives are zip files
        return False
    # 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < path.stat().st_size


def _read_safetensors(path: Path) -> Checkpoint:
    tensors = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return Checkpoint(tensors, metadata)


def unwrap_checkpoint(
    checkpoint: object, path: Path, error: type[ModelError]
) -> dict[str, torch.Tensor]:
    """The state dict inside a saved training checkpoint (itself, when it is one)."""
    while isinstance(checkpoint, dict) and not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        entry = next((k for k in CHECKPOINT_ENTRIES if isinstance(checkpoint.get(k), dict)), None)
        if entry is None:
            keys = sorted(str(k) for k in checkpoint)[:REPORTED_KEYS]
            raise error(
                f"{path}: no state dict found: top-level entries {keys} hold no tensors and none "
                f"of {list(CHECKPOINT_ENTRIES)}"
            )
        checkpoint = checkpoint[entry]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise error(f"{path}: expected a state dict, found {type(checkpoint).__name__}")
    return checkpoint


def read_state_dict(path: Path, *, what: str, error: type[ModelError]) -> Checkpoint:
    """The state dict in `path` (safetensors or torch.save), with any safetensors metadata.

    Problems are raised as the caller's `error`; a file neither format reads says
    "cannot read {what} {path}: ..." with the underlying cause.
    """
    path = Path(path)
    try:
        if is_torchscript(path):
            raise error(
                f"cannot read {what} {path}: a TorchScript archive holds a compiled model, "
                "not a state dict"
            )
        if is_safetensors(path):
            return _read_safetensors(path)
        # weights_only: a checkpoint is data, never code to run.
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except error:
        raise
    except Exception as cause:  # torch and safetensors raise many kinds for foreign files
        raise error(f"cannot read {what} {path}: {type(cause).__name__}: {cause}") from None
    return Checkpoint(unwrap_checkpoint(checkpoint, path, error), {})


def strip_wrappers(key: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> str:
    """`key` without the wrapper prefixes in front of it, however many and in whatever order."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key
