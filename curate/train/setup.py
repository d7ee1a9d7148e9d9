"""A run's starting point: its folder checked and stamped, its learner built, its checkpoint loaded.

A new run refuses a folder that already holds checkpoints; a resumed one refuses a checkpoint
written with another model, crops, batch size or seed, or shards that changed since it started,
since its batches and random draws would no longer continue the interrupted run's.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from curate.core.atomic import write_text
from curate.train.checkpoint import (
    CHECKPOINTS,
    CheckpointConflict,
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    saved_data_pass,
)
from curate.train.model import build_student_teacher, param_groups
from curate.train.runtime import Runtime, shard_network
from curate.train.step import Centers, Learner
from schemas.train import TrainConfig

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
DATA_MANIFEST = "data.json"


# -- the run folder --------------------------------------------------------------------------------


def _check_resumable(saved: TrainConfig, config: TrainConfig, where: Path) -> None:
    for name in ("model", "crops", "batch_size", "seed"):
        if getattr(saved, name) != getattr(config, name):
            raise CheckpointConflict(
                f"{where} was trained with a different `{name}`; resume with the same one "
                "(or train into another --out folder)"
            )


def _data_manifest(files: list[Path]) -> list[list]:
    """The shards a run reads, as (name, bytes): the batch sequence is a function of them."""
    return [[Path(f).name, Path(f).stat().st_size] for f in files]


def _check_same_data(path: Path, data: list[list]) -> None:
    """A resumed run must read the shards it started on, or its batches would differ."""
    if path.exists() and json.loads(path.read_text()) != data:
        raise CheckpointConflict(
            f"the training shards changed since this run started (see {path}); resume with the "
            "same data, or train into another --out folder"
        )


def open_run_folder(
    config: TrainConfig, files: list[Path], out_dir: Path, runtime: Runtime, resume: bool
) -> Path | None:
    """Check `out_dir` fits this run and stamp it (config, data manifest) on rank 0; the
    checkpoint to resume from, or None for a run from step 0."""
    ckpt_root = out_dir / CHECKPOINTS
    start = latest_checkpoint(ckpt_root) if resume else None
    if start is None and not resume and latest_checkpoint(ckpt_root) is not None:
        # Every rank sees the same folder, so every rank raises: none is left in a collective.
        raise CheckpointConflict(
            f"{out_dir} already holds checkpoints: resume, or use a new folder"
        )
    data = _data_manifest(files)
    if start is not None:
        _check_resumable(checkpoint_config(start), config, start)
        _check_same_data(out_dir / DATA_MANIFEST, data)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / CONFIG, config.to_yaml())
        write_text(out_dir / DATA_MANIFEST, json.dumps(data, indent=1) + "\n")
    return start


# -- the learner -----------------------------------------------------------------------------------


def build_learner(config: TrainConfig, runtime: Runtime, dtype: torch.dtype) -> Learner:
    """Student and teacher on the run's device (FSDP2-sharded on several ranks), AdamW over the
    student's parameter groups (lr and weight decay set every step by the schedules), and zero
    centres."""
    student, teacher = build_student_teacher(config.model, config.crops.global_size, config.seed)
    student.to(runtime.device)
    teacher.to(runtime.device)
    if runtime.world_size > 1:
        shard_network(student, runtime, dtype)
        shard_network(teacher, runtime, dtype)
    optimizer = torch.optim.AdamW(
        param_groups(student, config.optim.layerwise_decay, config.optim.patch_embed_lr_mult),
        lr=0.0,
        betas=tuple(config.optim.betas),
    )
    k_ibot = config.model.ibot_prototypes or config.model.prototypes
    if not config.model.separate_ibot_head:
        k_ibot = config.model.prototypes
    centers = Centers(
        dino=torch.zeros(1, config.model.prototypes, device=runtime.device),
        ibot=torch.zeros(1, k_ibot, device=runtime.device),
    )
    return Learner(student, teacher, optimizer, centers)


def train_entries(learner: Learner) -> dict[str, torch.Tensor]:
    """The checkpoint's `train` entries: the step counter and the centres, loaded in place."""
    step_tensor = torch.zeros((), dtype=torch.int64)
    return {"step": step_tensor, **learner.centers.as_state()}


# -- resuming --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartPoint:
    """Where a run begins: its step, and the data pass and batch of this rank's loader."""

    step: int = 0
    data_pass: int = 0
    data_batches: int = 0


def resume_from(start: Path, learner: Learner, train_state: dict[str, torch.Tensor]) -> StartPoint:
    """Load checkpoint `start` (collectively) and put this rank's RNGs back where they were."""
    rank_state = load_checkpoint(
        start, learner.student, learner.teacher, learner.optimizer, train_state
    )
    step = int(train_state["step"])
    if rank_state is None:
        log.warning(
            "%s was written by a different number of ranks: weights and optimizer resume, "
            "the data order restarts with the next pass",
            start,
        )
        point = StartPoint(step, data_pass=saved_data_pass(start) + 1)
    else:
        rank_state.restore_rng()
        point = StartPoint(step, rank_state.data_pass, rank_state.data_batches)
    log.info("resumed from %s at step %d", start, step)
    return point
