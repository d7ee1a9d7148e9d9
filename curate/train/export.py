"""The teacher backbone as one safetensors file with timm key names: the embedder's weights.

The file loads with
    timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size)
        .load_state_dict(safetensors.torch.load_file(path), strict=True)
where arch and img_size come from the file's metadata ("format": "lvd-curate-backbone").
"""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from curate.core.atomic import atomic_path
from curate.stages.embed.model import EXPORT_FORMAT as FORMAT
from curate.train.checkpoint import checkpoint_config, load_teacher, read_meta
from curate.train.model import SSLNetwork
from schemas.errors import InputError

_BACKBONE = "backbone."


class ExportError(InputError, ValueError):
    """A file that is not an exported lvd-curate backbone, or a checkpoint that cannot export."""

    code = "export_invalid"


def backbone_tensors(network_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's entries of an SSLNetwork state dict, under timm's own key names."""
    # safetensors refuses shared or strided storage: every tensor gets its own contiguous copy.
    return {
        key[len(_BACKBONE) :]: value.detach().to("cpu").contiguous().clone()
        for key, value in network_state.items()
        if key.startswith(_BACKBONE)
    }


def save_backbone(
    tensors: dict[str, torch.Tensor], out: Path, arch: str, img_size: int, patch_size: int
) -> Path:
    """Write backbone tensors and their metadata to `out` (atomically)."""
    out = Path(out)
    metadata = {
        "format": FORMAT,
        "arch": arch,
        "img_size": str(img_size),
        "patch_size": str(patch_size),
    }
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def gather_backbone(network: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full backbone tensors of a (possibly FSDP-sharded) network on rank 0; None elsewhere.

    Collective under FSDP: every rank must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(network, options=options)
    # cpu_offload leaves the full state only on rank 0; other ranks get an empty dict.
    return backbone_tensors(state) if state else None


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Export the teacher backbone of a training checkpoint folder to a safetensors file."""
    checkpoint = Path(checkpoint)
    read_meta(checkpoint)
    config = checkpoint_config(checkpoint)
    teacher = SSLNetwork(config.model, config.crops.global_size, drop_path_rate=0.0)
    load_teacher(checkpoint, teacher)
    return save_backbone(
        backbone_tensors(teacher.state_dict()),
        out,
        config.model.arch,
        config.crops.global_size,
        teacher.patch_size,
    )


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of an exported backbone file; ExportError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ExportError(f"{path}: not a safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise ExportError(f"{path}: metadata format is {metadata.get('format')!r}, not {FORMAT}")
    return metadata
