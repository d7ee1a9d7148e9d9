"""The DINO + iBOT + KoLeo training run: one CPU process to many GPUs, resumable, monitored.

`train` sets the run up (curate.train.setup), then steps (curate.train.step) until the schedule's
end, `stop_after` or the time limit, writing a metrics line every `log_every` steps, a checkpoint
every `checkpoint_every` and a k-NN evaluation every `knn_every`, each also at the end; a run
that reaches its end exports the teacher backbone.
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from curate.train import losses
from curate.train.checkpoint import CHECKPOINTS, RankState, save_checkpoint
from curate.train.export import gather_backbone, save_backbone
from curate.train.runtime import Runtime, compute_dtype, fenced_rngs, init_runtime
from curate.train.setup import (
    StartPoint,
    build_learner,
    open_run_folder,
    resume_from,
    train_entries,
)
from curate.train.step import Learner, StepOutcome, autocast_for, train_step
from schemas.train import TrainConfig

METRICS = "metrics.jsonl"
EXPORT = "teacher_backbone.safetensors"


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


def _data_position(start: StartPoint):
    from curate.train.data import DataPosition

    return DataPosition(pass_index=start.data_pass, batches=start.data_batches)


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


@dataclass
class _Run:
    """One call of `train` from its first step to its end, and what the steps share."""

    config: TrainConfig
    runtime: Runtime
    learner: Learner
    train_state: dict[str, torch.Tensor]  # the checkpoint's `train` entries
    loader: object
    autocast: AbstractContextManager  # mixed precision of the forward passes
    ckpt_root: Path
    logger: _Logger
    result: RunResult
    step: int  # steps done so far
    end: int = 0  # the step this call stops after; the time limit may bring it forward
    time_limit_s: float | None = None
    knn_folder: Path | None = None  # evaluated on every `knn_every` steps when given

    @property
    def knn_due(self) -> bool:
        return self.knn_folder is not None and self.config.knn_every is not None

    def evaluate_knn(self) -> None:
        """k-NN accuracy of the teacher backbone on rank 0; collective (gathers the weights)."""
        tensors = gather_backbone(self.learner.teacher)
        line = None
        if self.runtime.is_main:
            # Fenced off from the global RNGs, like the data: building a model draws random
            # initial weights, and a run resumed after this step must draw what this one draws.
            with fenced_rngs():
                line = _knn_on_main(tensors, self.config, self.runtime, Path(self.knn_folder))
        if self.runtime.world_size > 1:
            dist.barrier()
        if line is not None:
            line = {"step": self.step, **line}
            self.result.knn.append(line)
            self.logger.write(line)

    def steps(self, progress: bool) -> None:
        """Train until `end`: step, then the metrics line, checkpoint and k-NN when due."""
        bar = tqdm(
            total=self.end,
            initial=self.step,
            disable=not (progress and self.runtime.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        batches: Iterator = iter(self.loader)
        images_per_step = self.config.batch_size * self.runtime.world_size
        window_start, window_steps = time.perf_counter(), 0
        loop_start = time.monotonic()
        self.learner.student.train()
        self.learner.teacher.eval()
        while self.step < self.end:
            # The global RNGs fenced off from the data pipeline: torch's DataLoader draws its
            # seed from the global RNG when it starts, so without the fence a resumed run (which
            # starts its loader later) would draw other drop-path masks.
            with fenced_rngs():
                batch = next(batches)
            outcome = train_step(
                self.learner,
                batch,
                self.config,
                self.step,
                self.runtime,
                self.autocast,
                self.result.checkpoint,
            )
            self.step += 1
            window_steps += 1
            bar.update(1)
            if self.time_limit_s is not None and self.step < self.end:
                self._stop_if_late(time.monotonic() - loop_start)
            logged = self.step % self.config.log_every == 0 or self.step == self.end
            if logged:
                elapsed = time.perf_counter() - window_start
                rate = images_per_step * window_steps / max(elapsed, 1e-9)
                line = self._metrics_line(outcome, rate)
                bar.set_postfix(loss=f"{line['loss']:.3f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == self.end:
                self._checkpoint()
            if self.knn_due and (self.step % self.config.knn_every == 0 or self.step == self.end):
                self.evaluate_knn()
            if logged:
                # Here, so that images/s counts training steps, not checkpoints and evaluations.
                window_start, window_steps = time.perf_counter(), 0
        bar.close()

    def _stop_if_late(self, elapsed: float) -> None:
        late = elapsed > self.time_limit_s
        # Every rank must stop at the same step, or the others wait in a collective.
        flag = losses.all_reduce_sum(torch.tensor(float(late), device=self.runtime.device))
        if flag.item() > 0:
            self.result.out_of_time = True
            self.end = self.step

    def _metrics_line(self, outcome: StepOutcome, images_per_s: float) -> dict:
        line = {
            "step": self.step,
            **outcome.metrics(),
            "images_per_s": images_per_s,
            "bad_images": int(getattr(self.loader, "bad_images", 0)),
        }
        self.logger.write(line)
        return line

    def _checkpoint(self) -> None:
        self.train_state["step"].fill_(self.step)
        position = self.loader.position
        self.result.checkpoint = save_checkpoint(
            self.ckpt_root,
            self.step,
            self.config,
            self.learner.student,
            self.learner.teacher,
            self.learner.optimizer,
            self.train_state,
            RankState.capture(position.pass_index, position.batches),
            self.config.keep_checkpoints,
        )

    def export(self, out: Path) -> None:
        """The teacher backbone as safetensors, written by rank 0; collective."""
        tensors = gather_backbone(self.learner.teacher)
        if self.runtime.is_main:
            self.result.export = save_backbone(
                tensors,
                out,
                self.config.model.arch,
                self.config.crops.global_size,
                self.learner.student.patch_size,
            )
        if self.runtime.world_size > 1:
            dist.barrier()


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
        run = _start(config, files, out_dir, runtime, resume, make_loader)
        run.end = min(config.steps, stop_after) if stop_after is not None else config.steps
        run.time_limit_s = time_limit_s
        run.knn_folder = knn_folder
        if run.knn_due and run.step == 0:
            run.evaluate_knn()
        run.steps(progress)
        run.result.steps_done = run.step
        run.result.metrics = run.logger.lines
        if export and (run.step >= config.steps or run.result.out_of_time):
            run.export(out_dir / EXPORT)
        return run.result
    finally:
        if runtime.created_group:
            dist.destroy_process_group()


def _start(
    config: TrainConfig,
    files: list[Path],
    out_dir: Path,
    runtime: Runtime,
    resume: bool,
    make_loader: LoaderFactory,
) -> _Run:
    """The run before its first step: folder checked, learner built, checkpoint loaded, loader
    positioned. The order of the random draws here is what makes a resumed run exact."""
    start = open_run_folder(config, files, out_dir, runtime, resume)
    dtype = compute_dtype(config, runtime.device)
    learner = build_learner(config, runtime, dtype)
    train_state = train_entries(learner)
    # Each rank draws its own drop-path masks.
    torch.manual_seed(config.seed * 100_003 + runtime.rank + 1)
    point = StartPoint() if start is None else resume_from(start, learner, train_state)
    loader = make_loader(files, config, runtime, learner.student.patch_size, _data_position(point))
    return _Run(
        config=config,
        runtime=runtime,
        learner=learner,
        train_state=train_state,
        loader=loader,
        autocast=autocast_for(runtime.device, dtype),
        ckpt_root=out_dir / CHECKPOINTS,
        logger=_Logger(out_dir / METRICS, runtime.is_main),
        result=RunResult(steps_done=point.step, checkpoint=start),
        step=point.step,
    )
