"""Training an SSCD-style copy descriptor on unlabelled images (Pizzi et al., CVPR 2022).

The network is the copy pass's own `SSCDNet` (ResNet trunk, GeM p = 3, 512-d projection, L2
norm). Each step takes `batch_size` images, two strong copy augmentations of each (`augment`),
and minimises InfoNCE over the 2N views (each view's positive is the other view of its image,
the other 2N - 2 are negatives) plus SSCD's differential-entropy regulariser, KoLeo
(curate.train.losses) on one view per image, which spreads descriptors of distinct images apart
so that one cosine threshold separates copies from look-alikes. SSCD trains with 4,096 images a
batch at temperature 0.05 and KoLeo weight 30; with 64 a batch, that weight held InfoNCE above
chance for the first hundreds of steps (measured here), so the defaults are 0.1 and 1, the
usual small-batch temperature and a weight at which both terms fall together.

A run lives in `<out>/<key>/`, the key hashing the images' content and every setting: the same
command resumes an interrupted run (`state.pt`, written atomically every few minutes, holds the
model, optimiser, step and clock) and reuses a finished one. With a time budget the number of
steps is planned from the time per step, after a few steps and again every tenth of the run, so
the learning-rate schedule anneals to its end inside the budget however busy the machine is. A
finished run exports `copy_model.safetensors` (what CURATE_COPY_WEIGHTS loads) with its model
card: how it was made and its calibration (`calibrate`).
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from curate.copy_model.augment import positive_pairs
from curate.copy_model.calibrate import calibrate_self, is_current, write_card
from curate.copy_model.config import CopyTrainConfig
from curate.copy_model.corpus import Corpus
from curate.core.atomic import atomic_path, write_json
from curate.core.devices import pick_device
from curate.stages.dedup.copy_detection import SSCDNet
from curate.stages.dedup.model_card import ModelCard, read_model_card
from curate.train.losses import koleo_loss
from curate.train.schedules import cosine_schedule
from schemas.errors import DataError

WEIGHTS_NAME = "copy_model.safetensors"
STATE_NAME = "state.pt"
DONE_NAME = "done.json"
_PLAN_AFTER = 6  # steps measured before a time budget is turned into a number of steps
_RATE_WINDOW = 50  # recent steps whose mean time is the rate a plan assumes
# Distinct pictures the false-match rate is measured on: 2,000 give 2 million pairs.
_FALSE_MATCH_PICTURES = 2000
_CHECKPOINT_EVERY_S = 180.0
# A run whose steps slow down after its plan (a shared machine) ends at this share of its budget.
_OVERRUN = 1.1


class CopyRunError(DataError, ValueError):
    """A run folder whose saved state cannot be resumed (unreadable or of another version)."""

    code = "copy_run_invalid"


@dataclass(frozen=True)
class TrainedModel:
    weights: Path  # the file CURATE_COPY_WEIGHTS names
    card: ModelCard
    run_dir: Path
    reused: bool  # a finished run of the same images and settings was found


def info_nce(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over 2N unit descriptors [2N, D], view k of image i at row k * N + i: each row's
    positive is the other view of its image, every other row a negative."""
    count = views.shape[0]
    sims = views @ views.t() / temperature
    sims = sims.masked_fill(torch.eye(count, dtype=torch.bool, device=views.device), float("-inf"))
    targets = (torch.arange(count, device=views.device) + count // 2) % count
    return F.cross_entropy(sims, targets)


def copy_loss(
    views: torch.Tensor, config: CopyTrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    contrastive = info_nce(views.float(), config.temperature)
    entropy = koleo_loss(views[: views.shape[0] // 2])  # one view per image: no positive pair
    total = contrastive + config.entropy_weight * entropy
    return total, {"info_nce": float(contrastive.detach()), "koleo": float(entropy.detach())}


class _Batches:
    """Augmented batches made ahead in a thread (PIL releases the GIL in its heavy work) while
    the model trains. The batch of step s depends only on (seed, s): a resumed run sees the
    batches the interrupted one would have seen."""

    def __init__(self, images: list, config: CopyTrainConfig, first_step: int):
        self.images, self.config = images, config
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.step = first_step
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        step = self.step
        while not self.stopped.is_set():
            rng = np.random.default_rng([self.config.seed, step])
            count = min(self.config.batch_size, len(self.images))
            chosen = rng.choice(len(self.images), count, replace=False)
            batch = positive_pairs([self.images[i] for i in chosen], self.config.augment, rng)
            while not self.stopped.is_set():
                try:
                    self.queue.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue
            step += 1

    def next(self) -> torch.Tensor:
        return self.queue.get()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


@dataclass
class _State:
    step: int = 0
    planned: int | None = None  # steps of the whole run, once the time budget is measured
    elapsed_s: float = 0.0  # training time so far, over every resumed session
    loss: float | None = None


def _save_state(path: Path, model, optimizer, state: _State, config, fingerprint: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": asdict(state),
                "config": asdict(config),
                "corpus": fingerprint,
            },
            tmp,
        )


def _load_state(path: Path, model, optimizer) -> _State:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        return _State(**saved["state"])
    except Exception as error:  # torch raises many kinds for a torn or foreign file
        raise CopyRunError(f"cannot resume from {path}: {type(error).__name__}: {error}") from None


def _export(model: SSCDNet, path: Path, card: ModelCard) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=card.to_metadata())


def _plan_due(state: _State, measured: int) -> bool:
    """A plan after the first few steps of a session, then again every tenth of the run."""
    if measured < _PLAN_AFTER:
        return False
    if state.planned is None or measured == _PLAN_AFTER:
        return True
    return state.step % max(_PLAN_AFTER, state.planned // 10) == 0


def _replan(state: _State, recent: list[float], budget_s: float, config: CopyTrainConfig) -> None:
    """The run's length in steps from the budget left and the recent time per step. Made again
    through the run: on a shared machine the rate moves, and a plan made once either overran
    the budget or ended early with the learning rate annealed too soon."""
    per_step = float(np.mean(recent))
    left = max(0.0, budget_s - state.elapsed_s)
    state.planned = max(state.step, min(config.steps, state.step + int(left / per_step)))


def _calibrated(weights: Path, corpus: Corpus, config: CopyTrainConfig) -> dict:
    """Self-calibration: the held-out images and their named edits, with a seeded sample of the
    training images as further distinct pictures for the false-match rate."""
    rng = np.random.default_rng(config.seed)
    count = min(len(corpus.train), _FALSE_MATCH_PICTURES - len(corpus.held_out))
    sample = np.sort(rng.choice(len(corpus.train), max(0, count), replace=False))
    return calibrate_self(weights, corpus.held_out, [corpus.train[i] for i in sample])


def _lr(config: CopyTrainConfig, step: int, total: int) -> float:
    warmup = max(1, round(config.warmup_share * total))
    return cosine_schedule(step, config.lr, config.min_lr, total, warmup)


def train_copy_model(
    corpus: Corpus,
    out: Path,
    config: CopyTrainConfig,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainedModel:
    """Train (or resume, or reuse) the copy model of `corpus` under out/<key>/.

    stop_after: end this session after that many steps without finishing the run (tests of
    resumption); the next call resumes it.
    """
    run_dir = Path(out) / config.key(corpus.fingerprint)
    weights = run_dir / WEIGHTS_NAME
    if (run_dir / DONE_NAME).exists() and weights.is_file():
        log(f"copy model: reusing {weights} (same images, same settings)")
        card = read_model_card(weights)
        if not is_current(card.calibration) and len(corpus.held_out) >= 2:
            log("copy model: its calibration is of an older version; calibrating again")
            card = replace(card, calibration=_calibrated(weights, corpus, config))
            write_card(weights, card)
        return TrainedModel(weights, card, run_dir, reused=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(pick_device())
    torch.manual_seed(config.seed)
    model = SSCDNet(trunk=config.arch, dim=config.dim).to(device)
    # channels_last suits cuDNN; on a CPU it made each training step and the optimiser's twice
    # as slow (measured on this project's 2-core machine).
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    state_path = run_dir / STATE_NAME
    state = _load_state(state_path, model, optimizer) if state_path.exists() else _State()
    if state.step:
        log(f"copy model: resuming {run_dir} at step {state.step}")
    budget_s = None if config.minutes is None else config.minutes * 60.0
    if budget_s is None:
        state.planned = config.steps
    _steps(model, optimizer, corpus, config, state, budget_s, device, run_dir, stop_after, progress)
    _save_state(state_path, model, optimizer, state, config, corpus.fingerprint)
    if state.planned is None or state.step < state.planned:
        return TrainedModel(weights, ModelCard(), run_dir, reused=False)
    made = {
        "arch": config.arch,
        "images": len(corpus.train),
        "held_out": len(corpus.held_out),
        "source": corpus.source,
        "corpus_sha256": corpus.fingerprint,
        "steps": state.step,
        "batch_size": config.batch_size,
        "input_size": config.augment.size,
        "minutes": state.elapsed_s / 60.0,
        "device": str(device),
        "final_loss": state.loss,
        "torch": torch.__version__,
        "recipe": (
            f"SSCD: InfoNCE (t = {config.temperature:g}) + {config.entropy_weight:g} x KoLeo, "
            "strong copy augmentations"
        ),
    }
    card = ModelCard(config.arch, config.augment.size, config.flip_invariant, made)
    _export(model.eval(), weights, card)
    if len(corpus.held_out) >= 2:
        log(f"copy model: calibrating on {len(corpus.held_out)} held-out images x named edits")
        card = replace(card, calibration=_calibrated(weights, corpus, config))
        write_card(weights, card)
    write_json(run_dir / DONE_NAME, {"weights": str(weights), "made": made})
    log(f"copy model: {card.summary()}; weights {weights}")
    return TrainedModel(weights, card, run_dir, reused=False)


def _steps(model, optimizer, corpus, config, state, budget_s, device, run_dir, stop_after, bar_on):
    total = state.planned or config.steps
    batches = _Batches(corpus.train, config, state.step)
    bar = tqdm(
        total=total,
        initial=state.step,
        unit="step",
        desc="copy model",
        disable=not bar_on,
        dynamic_ncols=True,
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    session_steps, measured, last_save = 0, [], time.monotonic()
    model.train()
    try:
        while state.step < (state.planned or config.steps):
            if stop_after is not None and session_steps >= stop_after:
                break
            started = time.perf_counter()
            views = batches.next().to(device, non_blocking=True)
            if device.type == "cuda":
                views = views.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, state.step, state.planned or config.steps)
            with autocast:
                descriptors = model(views)
            loss, parts = copy_loss(descriptors.float(), config)
            if not torch.isfinite(loss):
                raise CopyRunError(f"loss is {float(loss)} at step {state.step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - started
            state.step += 1
            state.elapsed_s += seconds
            state.loss = float(loss.detach())
            session_steps += 1
            measured.append(seconds)
            if budget_s is not None and _plan_due(state, len(measured)):
                # The session's first step pays for warm-up: it is not a rate.
                _replan(state, measured[1:][-_RATE_WINDOW:], budget_s, config)
                bar.total = state.planned
                bar.refresh()
            if budget_s is not None and state.elapsed_s > _OVERRUN * budget_s:
                # The machine slowed down after the plan was made: a budget is a promise.
                state.planned = state.step
            bar.update(1)
            bar.set_postfix(
                loss=f"{state.loss:.3f}",
                nce=f"{parts['info_nce']:.3f}",
                img_s=f"{config.batch_size / seconds:.0f}",
            )
            if time.monotonic() - last_save > _CHECKPOINT_EVERY_S:
                _save_state(
                    run_dir / STATE_NAME, model, optimizer, state, config, corpus.fingerprint
                )
                last_save = time.monotonic()
        if state.planned is None and state.step >= config.steps:
            state.planned = state.step  # the steps ran out before the budget was measured
    finally:
        batches.close()
        bar.close()
