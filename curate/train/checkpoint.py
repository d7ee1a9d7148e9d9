"""Sharded, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding:
  - DCP shards of {student, teacher, optimizer, train}: every rank writes its own FSDP shards,
    and a later run with any number of ranks (or the exporter, in one process) reads them back;
  - `rank-R.pt` per rank: its data position and RNG states, so a resumed run continues with the
    same batches and the same drop-path draws;
  - `meta.json`: step, world size and the full training configuration.
It is written under a `.partial` name and renamed once every rank has finished, so a folder
without that suffix is always complete.
"""

import json
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from curate.train.runtime import fenced_rngs
from schemas.errors import ConflictError, DataError
from schemas.train import TrainConfig

CHECKPOINTS = "checkpoints"  # a run folder's checkpoints, one `step-NNNNNNNN` folder each
PREFIX = "step-"
PARTIAL = ".partial"
META = "meta.json"


class CheckpointError(DataError, ValueError):
    """A checkpoint folder that is missing, incomplete or does not fit this run."""

    code = "checkpoint_invalid"


class CheckpointConflict(ConflictError, CheckpointError):
    """A run folder whose checkpoints belong to another run: other settings or other shards."""

    code = "checkpoint_conflict"


@dataclass
class RankState:
    """What differs between ranks and must come back on resume."""

    data_pass: int
    data_batches: int
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    python_rng: tuple

    @classmethod
    def capture(cls, data_pass: int, data_batches: int) -> "RankState":
        """This process's RNG states now, with the loader position given."""
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        return cls(data_pass, data_batches, torch.get_rng_state(), cuda, random.getstate())

    def restore_rng(self) -> None:
        """Put this process's RNGs back where they were at capture."""
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.cuda_rng)
        random.setstate(self.python_rng)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def checkpoint_name(step: int) -> str:
    """The folder name of checkpoint `step`: zero-padded, so names sort by step."""
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and not p.name.endswith(PARTIAL)
        and (p / META).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json (step, world_size, config)."""
    meta = path / META
    if not meta.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META})")
    return json.loads(meta.read_text())


def checkpoint_config(path: Path) -> TrainConfig:
    """The training configuration a checkpoint was written with."""
    return TrainConfig.model_validate(read_meta(path)["config"])


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    # One process without a process group is a supported DCP mode; its warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


def save_checkpoint(
    root: Path,
    step: int,
    config: TrainConfig,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, torch.Tensor],
    rank_state: RankState,
    keep: int,
) -> Path:
    """Write checkpoint `step` collectively (every rank calls this) and prune old ones.

    Random states are left as they were: the run goes on from exactly the RNG state that
    `rank_state` holds, as a run resumed from this checkpoint will.
    """
    with fenced_rngs():
        return _save(root, step, config, student, teacher, optimizer, train_state, rank_state, keep)


def _save(
    root: Path,
    step: int,
    config: TrainConfig,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, torch.Tensor],
    rank_state: RankState,
    keep: int,
) -> Path:
    final = root / checkpoint_name(step)
    partial = final.with_name(final.name + PARTIAL)
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    student_sd, optim_sd = get_state_dict(student, optimizer)
    state = {
        "student": student_sd,
        "teacher": get_model_state_dict(teacher),
        "optimizer": optim_sd,
        "train": dict(train_state),
    }
    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(partial))
    torch.save(rank_state.__dict__, partial / f"rank-{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"step": step, "world_size": _world(), "config": config.model_dump(mode="json")}
        (partial / META).write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: Path,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, torch.Tensor],
) -> RankState | None:
    """Load a checkpoint into the (possibly sharded) modules and optimizer, collectively.

    `train_state` is filled in place. Returns this rank's RankState, or None when the checkpoint
    was written by a different number of ranks (model and optimizer still load; the data
    sequence cannot continue exactly).
    """
    meta = read_meta(path)
    student_sd, optim_sd = get_state_dict(student, optimizer)
    state = {
        "student": student_sd,
        "teacher": get_model_state_dict(teacher),
        "optimizer": optim_sd,
        "train": train_state,
    }
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        student, optimizer, model_state_dict=state["student"], optim_state_dict=state["optimizer"]
    )
    set_model_state_dict(teacher, state["teacher"])
    if meta["world_size"] != _world():
        return None
    rank_file = path / f"rank-{_rank()}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path}: {rank_file.name} missing")
    body = torch.load(rank_file, map_location="cpu", weights_only=True)
    return RankState(**body)


def saved_data_pass(path: Path) -> int:
    """The data pass rank 0 was in when the checkpoint was written."""
    rank_file = path / "rank-0.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path}: rank-0.pt missing")
    return int(torch.load(rank_file, map_location="cpu", weights_only=True)["data_pass"])


def load_teacher(path: Path, teacher: nn.Module) -> None:
    """Load only the teacher's weights from a checkpoint into an unsharded module."""
    state = {"teacher": teacher.state_dict()}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    teacher.load_state_dict(state["teacher"], strict=True)
