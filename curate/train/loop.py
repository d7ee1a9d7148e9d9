"""The DINO + iBOT + KoLeo training loop: one CPU process to many GPUs, resumable, monitored.

Launched as a plain process (no process group) or by torchrun (gloo on CPU, NCCL on GPU), in
which case student and teacher are sharded with FSDP2, one unit per transformer block. Every
iteration: schedules -> teacher targets (softmax centring or Sinkhorn-Knopp) -> student loss ->
clipped AdamW step -> EMA teacher. Loss terms are averaged over ranks every step, so a NaN or
inf on any rank stops every rank at once, naming the step, the term and the last checkpoint.
"""

import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from curate.train import losses
from curate.train.checkpoint import (
    CheckpointError,
    RankState,
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saved_data_pass,
)
from curate.train.export import gather_backbone, save_backbone
from curate.train.model import (
    SSLNetwork,
    StudentOutput,
    TeacherOutput,
    build_student_teacher,
    param_groups,
)
from curate.train.schedules import apply_to_optimizer, step_values
from schemas.errors import InternalError
from schemas.train import LossOptions, TrainConfig

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
EXPORT = "teacher_backbone.safetensors"
CHECKPOINTS = "checkpoints"
LOSS_TERMS = ("dino_local", "dino_global", "ibot", "koleo")


class NonFiniteLossError(InternalError, RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the optimizer step."""

    code = "non_finite_loss"


# -- processes and devices -------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    created_group: bool  # this run initialised the process group, so it also destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime() -> Runtime:
    """Join torchrun's process group when launched by it (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(rank=rank, world_size=world, device=device, created_group=created)


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bfloat16 on GPU and float32 on CPU unless the config says otherwise."""
    if config.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32


def shard_network(network: SSLNetwork, runtime: Runtime, dtype: torch.dtype) -> None:
    """FSDP2: one unit per transformer block, the rest (tokens, norms, heads) in the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The networks return slices (class tokens, logits split by crop kind); nothing downstream
    # modifies them in place, which is what FSDP2's warning about views is for.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in network.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(network, mesh=mesh, mp_policy=policy)


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _next_batch(batches: Iterator):
    """The next batch, with the global RNGs fenced off from the data pipeline.

    torch's DataLoader draws its seed from the global RNG when it starts: without the fence a
    resumed run (which starts its loader later) would draw other drop-path masks.
    """
    python_rng = random.getstate()
    with torch.random.fork_rng(devices=_rng_devices()):
        batch = next(batches)
    random.setstate(python_rng)
    return batch


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


# -- the objective ---------------------------------------------------------------------------------


@dataclass
class Centers:
    """Softmax-centring state: the EMA centres of the DINO and iBOT teacher logits."""

    dino: Tensor
    ibot: Tensor

    def as_state(self) -> dict[str, Tensor]:
        """The centres as checkpoint entries (the same tensors, loaded in place)."""
        return {"dino_center": self.dino, "ibot_center": self.ibot}


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


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    steps_done: int  # the step count the run ended at (its last checkpoint's)
    metrics: list[dict] = field(default_factory=list)  # this run's per-step lines
    checkpoint: Path | None = None
    export: Path | None = None
    knn: list[dict] = field(default_factory=list)
    out_of_time: bool = False  # stopped by time_limit_s before config.steps


LoaderFactory = Callable[..., object]


def default_loader(
    files: list[Path], config: TrainConfig, runtime: Runtime, patch_size: int, position
) -> object:
    """curate.train.data.TrainLoader with the config's crops and masking."""
    from curate.train.augment import MaskingConfig, MultiCropConfig
    from curate.train.data import TrainLoader

    crops = config.crops
    return TrainLoader(
        files,
        batch_size=config.batch_size,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=config.seed,
        crops=MultiCropConfig(
            global_size=crops.global_size,
            local_size=crops.local_size,
            n_local=crops.n_local,
            global_scale=tuple(crops.global_scale),
            local_scale=tuple(crops.local_scale),
        ),
        masking=MaskingConfig(
            probability=crops.mask_probability,
            ratio=tuple(crops.mask_ratio),
            min_block_patches=crops.min_block_patches,
        ),
        patch_size=patch_size,
        num_workers=config.num_workers,
        position=position,
    )


def _data_position(data_pass: int, batches: int):
    from curate.train.data import DataPosition

    return DataPosition(pass_index=data_pass, batches=batches)


def _check_resumable(saved: TrainConfig, config: TrainConfig, where: Path) -> None:
    for name in ("model", "crops", "batch_size", "seed"):
        if getattr(saved, name) != getattr(config, name):
            raise CheckpointError(
                f"{where} was trained with a different `{name}`; resume with the same one "
                "(or train into another --out folder)"
            )


DATA_MANIFEST = "data.json"


def _data_manifest(files: list[Path]) -> list[list]:
    """The shards a run reads, as (name, bytes): the batch sequence is a function of them."""
    return [[Path(f).name, Path(f).stat().st_size] for f in files]


def _check_same_data(path: Path, data: list[list]) -> None:
    """A resumed run must read the shards it started on, or its batches would differ."""
    if path.exists() and json.loads(path.read_text()) != data:
        raise CheckpointError(
            f"the training shards changed since this run started (see {path}); resume with the "
            "same data, or train into another --out folder"
        )


class _Logger:
    """Metrics as JSON lines (rank 0) and the in-memory list a caller gets back."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.lines: list[dict] = []

    def write(self, line: dict) -> None:
        """Keep the line, and append it to metrics.jsonl on rank 0."""
        self.lines.append(line)
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(line) + "\n")


def _knn_eval(
    teacher: nn.Module, config: TrainConfig, runtime: Runtime, folder: Path
) -> dict | None:
    """k-NN accuracy of the teacher backbone on rank 0; collective (gathers the weights)."""
    tensors = gather_backbone(teacher)
    result = None
    if runtime.is_main:
        # Fenced off from the global RNGs, like the data: building a model draws random
        # initial weights, and a run resumed after this step must draw what this one draws.
        python_rng = random.getstate()
        with torch.random.fork_rng(devices=_rng_devices()):
            result = _knn_on_main(tensors, config, runtime, folder)
        random.setstate(python_rng)
    if runtime.world_size > 1:
        dist.barrier()
    return result


def _knn_on_main(tensors: dict, config: TrainConfig, runtime: Runtime, folder: Path) -> dict:
    import timm

    from curate.train.knn_eval import evaluate_knn, labelled_folder

    backbone = timm.create_model(
        config.model.arch,
        pretrained=False,
        num_classes=0,
        img_size=config.crops.global_size,
    )
    backbone.load_state_dict(tensors, strict=True)
    backbone.to(runtime.device)
    knn = evaluate_knn(
        backbone,
        labelled_folder(folder),
        folder,
        config.crops.global_size,
        k=config.knn_k,
        temperature=config.knn_temperature,
    )
    return {"knn_accuracy": knn.accuracy, "knn_queries": knn.queries, "knn_bank": knn.bank}


def train(
    config: TrainConfig,
    files: list[Path],
    out_dir: Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    knn_folder: Path | None = None,
    progress: bool = True,
    export: bool = True,
    make_loader: LoaderFactory = default_loader,
) -> RunResult:
    """Train (or resume) into `out_dir` until `config.steps` or `stop_after` steps are done.

    `time_limit_s` ends the run early (checkpoint, k-NN, export) once the training loop has run
    that long: a bounded-time run whose schedules still span `config.steps`.
    """
    if not files:
        raise ValueError("no curated shards to train on")
    out_dir = Path(out_dir)
    runtime = init_runtime()
    try:
        return _train(
            config,
            files,
            out_dir,
            runtime,
            resume,
            stop_after,
            time_limit_s,
            knn_folder,
            progress,
            export,
            make_loader,
        )
    finally:
        if runtime.created_group:
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    files: list[Path],
    out_dir: Path,
    runtime: Runtime,
    resume: bool,
    stop_after: int | None,
    time_limit_s: float | None,
    knn_folder: Path | None,
    progress: bool,
    export: bool,
    make_loader: LoaderFactory,
) -> RunResult:
    ckpt_root = out_dir / CHECKPOINTS
    start = latest_checkpoint(ckpt_root) if resume else None
    if start is None and not resume and latest_checkpoint(ckpt_root) is not None:
        # Every rank sees the same folder, so every rank raises: none is left in a collective.
        raise CheckpointError(f"{out_dir} already holds checkpoints: resume, or use a new folder")
    data = _data_manifest(files)
    if start is not None:
        _check_resumable(checkpoint_config(start), config, start)
        _check_same_data(out_dir / DATA_MANIFEST, data)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config.to_yaml())
        (out_dir / DATA_MANIFEST).write_text(json.dumps(data, indent=1) + "\n")

    dtype = compute_dtype(config, runtime.device)
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
    step_tensor = torch.zeros((), dtype=torch.int64)
    train_state = {"step": step_tensor, **centers.as_state()}

    # Each rank draws its own drop-path masks.
    torch.manual_seed(config.seed * 100_003 + runtime.rank + 1)
    step, data_pass, data_batches = 0, 0, 0
    if start is not None:
        rank_state = load_checkpoint(start, student, teacher, optimizer, train_state)
        step = int(train_state["step"])
        if rank_state is None:
            log.warning(
                "%s was written by a different number of ranks: weights and optimizer resume, "
                "the data order restarts with the next pass",
                start,
            )
            data_pass = saved_data_pass(start) + 1
        else:
            rank_state.restore_rng()
            data_pass, data_batches = rank_state.data_pass, rank_state.data_batches
        log.info("resumed from %s at step %d", start, step)

    loader = make_loader(
        files, config, runtime, student.patch_size, _data_position(data_pass, data_batches)
    )
    logger = _Logger(out_dir / METRICS, runtime.is_main)
    result = RunResult(steps_done=step, checkpoint=start)
    end = min(config.steps, stop_after) if stop_after is not None else config.steps
    knn_due = knn_folder is not None and config.knn_every is not None

    if knn_due and step == 0:
        line = _knn_eval(teacher, config, runtime, Path(knn_folder))
        if line is not None:
            line = {"step": 0, **line}
            result.knn.append(line)
            logger.write(line)

    autocast = (
        torch.autocast(device_type=runtime.device.type, dtype=dtype)
        if dtype != torch.float32
        else nullcontext()
    )
    bar = tqdm(
        total=end,
        initial=step,
        disable=not (progress and runtime.is_main),
        unit="step",
        dynamic_ncols=True,
    )
    batches: Iterator = iter(loader)
    images_per_step = config.batch_size * runtime.world_size
    window_start, window_steps = time.perf_counter(), 0
    loop_start = time.monotonic()
    out_of_time = False
    student.train()
    teacher.eval()
    while step < end:
        batch = _next_batch(batches)
        values = step_values(config, step, runtime.world_size)
        apply_to_optimizer(optimizer, values)
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
                    teacher_out, config.loss, values.teacher_temp, centers, n_images
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
        for name, value in zip(terms, reported.tolist(), strict=True):
            if not math.isfinite(value):
                where = result.checkpoint or "none written yet"
                # Numbered like the metrics lines: iteration step + 1 is the one that failed.
                raise NonFiniteLossError(
                    f"step {step + 1}: loss term {name} is {value}; last good checkpoint: {where}"
                )
        loss.backward()
        clip_gradients(student, config.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_teacher(student, teacher, values.momentum)
        step += 1
        window_steps += 1
        bar.update(1)
        if time_limit_s is not None and step < end:
            late = time.monotonic() - loop_start > time_limit_s
            # Every rank must stop at the same step, or the others wait in a collective.
            flag = losses.all_reduce_sum(torch.tensor(float(late), device=runtime.device))
            if flag.item() > 0:
                out_of_time = True
                end = step

        logged = step % config.log_every == 0 or step == end
        if logged:
            elapsed = time.perf_counter() - window_start
            line = {
                "step": step,
                "loss": float(reported.sum()),
                **{name: float(v) for name, v in zip(terms, reported.tolist(), strict=True)},
                "lr": values.lr,
                "weight_decay": values.weight_decay,
                "momentum": values.momentum,
                "teacher_temp": values.teacher_temp,
                "images_per_s": images_per_step * window_steps / max(elapsed, 1e-9),
                "bad_images": int(getattr(loader, "bad_images", 0)),
            }
            logger.write(line)
            bar.set_postfix(loss=f"{line['loss']:.3f}")
        if step % config.checkpoint_every == 0 or step == end:
            train_state["step"].fill_(step)
            position = loader.position
            result.checkpoint = save_checkpoint(
                ckpt_root,
                step,
                config,
                student,
                teacher,
                optimizer,
                train_state,
                RankState.capture(position.pass_index, position.batches),
                config.keep_checkpoints,
            )
        if knn_due and (step % config.knn_every == 0 or step == end):
            line = _knn_eval(teacher, config, runtime, Path(knn_folder))
            if line is not None:
                line = {"step": step, **line}
                result.knn.append(line)
                logger.write(line)
        if logged:
            # Here, so that images/s counts training steps, not checkpoints and evaluations.
            window_start, window_steps = time.perf_counter(), 0
    bar.close()
    result.steps_done = step
    result.metrics = logger.lines
    result.out_of_time = out_of_time
    if export and (step >= config.steps or out_of_time):
        tensors = gather_backbone(teacher)
        if runtime.is_main:
            result.export = save_backbone(
                tensors,
                out_dir / EXPORT,
                config.model.arch,
                config.crops.global_size,
                student.patch_size,
            )
        if runtime.world_size > 1:
            dist.barrier()
    return result
