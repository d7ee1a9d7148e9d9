"""Schedules, the run configuration, and a 2-process FSDP (gloo) run launched by torchrun."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from curate.train.schedules import cosine_schedule, peak_lr, step_values
from schemas.train import TrainConfigError, load_train_config
from tests.shards import write_curated_shards

REPO = Path(__file__).resolve().parents[2]


def _reference_cosine(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """DINOv2's CosineScheduler, as the array it builds."""
    iters = np.arange(total - warmup - freeze)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start_warmup, base, warmup), schedule))


@pytest.mark.parametrize(
    "args", [(1.0, 0.1, 50, 10, 0.0, 0), (0.04, 0.2, 30, 0, 0.0, 0), (2.0, 0.0, 40, 5, 0.5, 3)]
)
def test_cosine_schedule_matches_the_reference_array(args):
    expected = _reference_cosine(*args)
    for step, value in enumerate(expected):
        assert cosine_schedule(step, *args) == pytest.approx(value, abs=1e-12)
    assert cosine_schedule(len(expected) + 5, *args) == args[1]


def test_step_values():
    config = load_train_config(
        preset="tiny",
        overrides={"steps": 100, "batch_size": 16, "optim": {"freeze_last_layer_steps": 7}},
    )
    assert peak_lr(config, world_size=4) == pytest.approx(
        config.optim.base_lr * math.sqrt(64 / 1024)
    )
    first, later = step_values(config, 0, 4), step_values(config, 7, 4)
    assert first.last_layer_lr == 0.0 and later.last_layer_lr == later.lr > 0
    assert first.momentum == config.optim.momentum_teacher
    assert step_values(config, 100, 4).momentum == config.optim.momentum_teacher_end
    assert first.teacher_temp == config.loss.warmup_teacher_temp
    warm = config.loss.warmup_teacher_temp_steps
    assert step_values(config, warm, 4).teacher_temp == config.loss.teacher_temp
    assert first.weight_decay == pytest.approx(config.optim.weight_decay)


def test_config_from_yaml_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 50\nloss:\n  centering: softmax\nmodel:\n  prototypes: 128\n")
    config = load_train_config(path, preset="tiny")
    assert (config.steps, config.loss.centering, config.model.prototypes) == (50, "softmax", 128)
    assert config.model.arch == "test_vit"  # from the preset
    assert load_train_config(overrides=config.model_dump(mode="json")) == config
    path.write_text("loss:\n  centering: nope\noptim:\n  warmup_steps: -1\n")
    with pytest.raises(TrainConfigError, match="loss.centering") as error:
        load_train_config(path)
    assert "optim.warmup_steps" in str(error.value)
    with pytest.raises(TrainConfigError, match="unknown preset"):
        load_train_config(preset="huge")
    with pytest.raises(TrainConfigError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")


# -- the distributed run ---------------------------------------------------------------------------


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CURATE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "services.cli.train",
        "train",
        "run",
        *args,
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _losses(run: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "loss" in line}


def _teacher_backbone(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    from curate.train.export import export_checkpoint

    return load_file(str(export_checkpoint(checkpoint, out)))


def test_two_process_fsdp_run_moves_the_teacher_exports_and_resumes_exactly(tmp_path):
    data = tmp_path / "shards"
    # One broken image among them: skipped and counted by the loader, never fatal.
    write_curated_shards(data, shards=4, per_shard=10, bad=1)
    run = tmp_path / "run"
    common = ["--data", str(data), "--batch-size", "4", "--checkpoint-every", "2"]
    _torchrun(*common, "--out", str(run), "--preset", "tiny", "--steps", "4")

    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    for line in losses.values():
        for term in ("loss", "dino_local", "dino_global", "ibot", "koleo"):
            assert math.isfinite(line[term]), line

    # The EMA teacher moves between checkpoints, and stays distinct from the student.
    checkpoints = run / "checkpoints"
    at_2 = _teacher_backbone(checkpoints / "step-00000002", tmp_path / "t2.safetensors")
    at_4 = _teacher_backbone(checkpoints / "step-00000004", tmp_path / "t4.safetensors")
    moved = [k for k in at_2 if not torch.equal(at_2[k], at_4[k])]
    assert len(moved) > len(at_2) // 2

    # The run's own export loads strictly where the embedder loads it, and is the final teacher.
    exported = run / "teacher_backbone.safetensors"
    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "lvd-curate-backbone" and meta["arch"] == "test_vit"
    model = timm.create_model(
        meta["arch"], pretrained=False, num_classes=0, img_size=int(meta["img_size"])
    )
    model.load_state_dict(load_file(str(exported)), strict=True)
    final = load_file(str(exported))
    assert all(torch.equal(final[k], at_4[k]) for k in final)

    # A run stopped after step 2 (its folder holds the step-2 checkpoint), resumed: the same
    # next losses as the uninterrupted run.
    stopped = tmp_path / "stopped"
    shutil.copytree(checkpoints / "step-00000002", stopped / "checkpoints" / "step-00000002")
    _torchrun(*common, "--out", str(stopped), "--resume")
    resumed = _losses(stopped)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for term in ("loss", "dino_local", "dino_global", "ibot", "koleo"):
            assert resumed[step][term] == pytest.approx(losses[step][term], rel=1e-6, abs=1e-7)
