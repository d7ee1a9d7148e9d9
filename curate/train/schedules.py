"""Per-iteration schedules: learning rate, weight decay, teacher momentum and temperature.

`cosine_schedule` is the reference CosineScheduler evaluated at one iteration rather than
materialised as an array, so a 1M-iteration run costs nothing to set up and a resumed run gets
the same value at the same step.
"""

import math
from dataclasses import dataclass

from schemas.train import TrainConfig


def cosine_schedule(
    step: int,
    base: float,
    final: float,
    total: int,
    warmup: int = 0,
    start_warmup: float = 0.0,
    freeze: int = 0,
) -> float:
    """Zero for `freeze` steps, linear warmup start -> base (inclusive), cosine base -> final."""
    if step >= total:
        return final
    if step < freeze:
        return 0.0
    step -= freeze
    if step < warmup:
        # numpy.linspace(start, base, warmup): both ends included.
        return (
            start_warmup
            if warmup == 1
            else start_warmup + (base - start_warmup) * step / (warmup - 1)
        )
    step -= warmup
    length = total - freeze - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / length))


@dataclass(frozen=True)
class StepValues:
    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


def peak_lr(config: TrainConfig, world_size: int) -> float:
    """base_lr scaled by sqrt(global batch / 1024), the reference's rule."""
    return config.optim.base_lr * math.sqrt(config.batch_size * world_size / 1024.0)


def step_values(config: TrainConfig, step: int, world_size: int) -> StepValues:
    """Every scheduled value at iteration `step` (0-based)."""
    optim, loss = config.optim, config.loss
    lr_args = (peak_lr(config, world_size), optim.min_lr, config.steps, optim.warmup_steps)
    lr = cosine_schedule(step, *lr_args)
    # The prototypes layer is frozen at the start: it collapses if it learns before the rest.
    last_layer_lr = 0.0 if step < optim.freeze_last_layer_steps else lr
    warm = loss.warmup_teacher_temp_steps
    teacher_temp = cosine_schedule(
        step, loss.teacher_temp, loss.teacher_temp, warm, warm, loss.warmup_teacher_temp
    )
    return StepValues(
        lr=lr,
        last_layer_lr=last_layer_lr,
        weight_decay=cosine_schedule(
            step, optim.weight_decay, optim.weight_decay_end, config.steps
        ),
        momentum=cosine_schedule(
            step, optim.momentum_teacher, optim.momentum_teacher_end, config.steps
        ),
        teacher_temp=teacher_temp,
    )


def apply_to_optimizer(optimizer, values: StepValues) -> None:
    """Set each parameter group's lr and weight decay from its multipliers."""
    for group in optimizer.param_groups:
        lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values.weight_decay * group["wd_multiplier"]
