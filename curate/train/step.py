"""One training iteration: schedules -> teacher targets -> student loss -> clipped AdamW -> EMA.

Teacher targets use softmax centring or Sinkhorn-Knopp. Loss terms are averaged over ranks every
step, so a NaN or inf on any rank stops every rank at once, before the optimizer step, naming the
step, the term and the last checkpoint.
"""

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from curate.train import losses
from curate.train.model import SSLNetwork, StudentOutput, TeacherOutput
from curate.train.runtime import Runtime
from curate.train.schedules import StepValues, apply_to_optimizer, step_values
from schemas.errors import InternalError
from schemas.train import LossOptions, TrainConfig

LOSS_TERMS = ("dino_local", "dino_global", "ibot", "koleo")


class NonFiniteLossError(InternalError, RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the optimizer step."""

    code = "non_finite_loss"


@dataclass
class Centers:
    """Softmax-centring state: the EMA centres of the DINO and iBOT teacher logits."""

    dino: Tensor
    ibot: Tensor

    def as_state(self) -> dict[str, Tensor]:
        """The centres as checkpoint entries (the same tensors, loaded in place)."""
        return {"dino_center": self.dino, "ibot_center": self.ibot}


@dataclass
class Learner:
    """What an iteration updates: the student, its EMA teacher, the optimizer, the centres."""

    student: SSLNetwork
    teacher: SSLNetwork
    optimizer: torch.optim.Optimizer
    centers: Centers


@dataclass(frozen=True)
class StepOutcome:
    values: StepValues  # the scheduled values the step ran with
    names: tuple[str, ...]  # the loss terms, in `reported`'s order
    reported: Tensor  # each loss term averaged over ranks

    def metrics(self) -> dict[str, float]:
        """The step's metrics-line fields: the loss, its terms and the scheduled values."""
        return {
            "loss": float(self.reported.sum()),
            **{name: float(v) for name, v in zip(self.names, self.reported.tolist(), strict=True)},
            "lr": self.values.lr,
            "weight_decay": self.values.weight_decay,
            "momentum": self.values.momentum,
            "teacher_temp": self.values.teacher_temp,
        }


# -- the objective ---------------------------------------------------------------------------------


def teacher_targets(
    teacher: TeacherOutput, options: LossOptions, temp: float, centers: Centers, n_images: int
) -> tuple[Tensor, Tensor]:
    """Teacher probabilities for the class tokens (views swapped) and the masked patches."""
    cls_logits = teacher.global_logits
    # Student view 0 learns from teacher view 1 and the other way round.
    cls_logits = torch.cat([cls_logits[n_images:], cls_logits[:n_images]])
    if options.centering == "sinkhorn":
        iterations = options.sinkhorn_iterations
        cls_probs = losses.sinkhorn_knopp(cls_logits, temp, iterations)
        patch_probs = losses.sinkhorn_knopp(teacher.patch_logits, temp, iterations)
        return cls_probs, patch_probs
    cls_probs = losses.softmax_center(cls_logits, centers.dino, temp)
    patch_probs = losses.softmax_center(teacher.patch_logits, centers.ibot, temp)
    centers.dino.copy_(losses.update_center(centers.dino, cls_logits, options.center_momentum))
    if teacher.patch_logits.shape[0] > 0 or losses.world_size() > 1:
        patch_logits = teacher.patch_logits
        if patch_logits.shape[0] == 0:
            # A rank without masked tokens still joins the collective, with the old centre.
            patch_logits = centers.ibot
        centers.ibot.copy_(
            losses.update_center(centers.ibot, patch_logits, options.center_momentum)
        )
    return cls_probs, patch_probs


def ssl_loss_terms(
    student: StudentOutput,
    cls_probs: Tensor,
    patch_probs: Tensor,
    masks: Tensor,
    options: LossOptions,
    n_local: int,
) -> dict[str, Tensor]:
    """The reference's weighted loss terms; their sum is the training loss."""
    temp = options.student_temp
    teacher_views = list(cls_probs.chunk(2))
    # The reference normalises by the number of (student, teacher) view pairs it sums over,
    # counting the local pairs as at least 1 (dinov2/train/ssl_meta_arch.py).
    pairs = 2 * 1 + max(2 * n_local, 1)
    terms: dict[str, Tensor] = {}
    if n_local > 0:
        local = losses.dino_loss(list(student.local_logits.chunk(n_local)), teacher_views, temp)
        terms["dino_local"] = options.dino_weight * local / pairs
    else:
        terms["dino_local"] = cls_probs.new_zeros(())
    # Mean over both global views in one pass, hence the factor 2 (the reference's loss_scales).
    glob = losses.dino_loss([student.global_logits], [cls_probs], temp)
    terms["dino_global"] = options.dino_weight * glob * 2 / pairs
    # The reference scales iBOT by loss_scales (2) * 1 / n_global_crops (1/2).
    terms["ibot"] = options.ibot_weight * losses.ibot_loss(
        student.patch_logits, patch_probs, masks, temp
    )
    terms["koleo"] = options.koleo_weight * sum(
        losses.koleo_loss(view) for view in student.global_cls.chunk(2)
    )
    return terms


# -- the update ------------------------------------------------------------------------------------


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, shard by shard."""
    # Matched by name: FSDP may register a module's parameters in another order.
    student_params = dict(student.named_parameters())
    names = [name for name, _ in teacher.named_parameters()]
    teacher_params = [_local(p) for _, p in teacher.named_parameters()]
    student_params = [_local(student_params[name].detach()) for name in names]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def clip_gradients(student: SSLNetwork, max_norm: float | None) -> None:
    """Clip backbone (with mask token) and each head separately, as the reference does."""
    if max_norm is None:
        return
    parts = [list(student.backbone.parameters()) + [student.mask_token]]
    parts.append(list(student.dino_head.parameters()))
    if student.ibot_head is not None:
        parts.append(list(student.ibot_head.parameters()))
    for params in parts:
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            torch.nn.utils.clip_grad_norm_(with_grad, max_norm)


def autocast_for(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to `dtype` on `device`; nothing to do in float32."""
    if dtype != torch.float32:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return nullcontext()


def _check_finite(names: list[str], reported: Tensor, step: int, last: Path | None) -> None:
    for name, value in zip(names, reported.tolist(), strict=True):
        if not math.isfinite(value):
            where = last or "none written yet"
            # Numbered like the metrics lines: iteration step + 1 is the one that failed.
            raise NonFiniteLossError(
                f"step {step + 1}: loss term {name} is {value}; last good checkpoint: {where}"
            )


def train_step(
    learner: Learner,
    batch,
    config: TrainConfig,
    step: int,
    runtime: Runtime,
    autocast: AbstractContextManager,
    last_checkpoint: Path | None,
) -> StepOutcome:
    """Iteration `step` (0-based) on one batch; NonFiniteLossError before any update if a term
    is not finite on some rank (`last_checkpoint` is named in the message)."""
    student, teacher = learner.student, learner.teacher
    values = step_values(config, step, runtime.world_size)
    apply_to_optimizer(learner.optimizer, values)
    global_crops = batch.global_crops.to(runtime.device, non_blocking=True)
    local_crops = batch.local_crops.to(runtime.device, non_blocking=True)
    masks = batch.masks.to(runtime.device, non_blocking=True)
    n_images = global_crops.shape[0] // 2
    with autocast:
        with torch.no_grad():
            teacher_out = teacher(global_crops, None, masks, teacher=True)
            if hasattr(teacher, "reshard"):
                # FSDP2 keeps a root's parameters gathered after forward, expecting a
                # backward; the teacher has none, and its EMA update works on shards.
                teacher.reshard()
            cls_probs, patch_probs = teacher_targets(
                teacher_out, config.loss, values.teacher_temp, learner.centers, n_images
            )
        student_out = student(global_crops, local_crops, masks)
        terms = ssl_loss_terms(
            student_out, cls_probs, patch_probs, masks, config.loss, config.crops.n_local
        )
    loss = sum(terms.values())
    reported = (
        losses.all_reduce_sum(torch.stack([t.detach().float() for t in terms.values()]))
        / runtime.world_size
    )
    _check_finite(list(terms), reported, step, last_checkpoint)
    loss.backward()
    clip_gradients(student, config.optim.clip_grad)
    learner.optimizer.step()
    learner.optimizer.zero_grad(set_to_none=True)
    update_teacher(student, teacher, values.momentum)
    return StepOutcome(values, tuple(terms), reported)
