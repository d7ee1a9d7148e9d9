"""`curate copy-model` as a user runs it, and a model it trained through the dedup stage: the
checkpoint loads from CURATE_COPY_WEIGHTS and the copy pass runs at its calibrated point."""

import os
import subprocess

import pytest

from curate.copy_model.config import AugmentConfig, CopyTrainConfig
from curate.copy_model.corpus import load_corpus
from curate.copy_model.train import train_copy_model
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.cli import run_curate
from tests.images import encode, photo

TINY_FLAGS = ("--steps", "3", "--batch-size", "4", "--size", "32")


def curate(*args: str, data_root, check_code: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "CURATE_DATA_ROOT": str(data_root), "CURATE_PROGRESS": "0"}
    return run_curate(*args, env=env, code=check_code, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy-images")
    for i in range(24):
        (root / f"p{i:02d}.jpg").write_bytes(encode(photo(96, 72, seed=500 + i), "JPEG"))
    return root


def test_train_exports_a_calibrated_model_and_reuses_it(images, tmp_path):
    out, export = tmp_path / "models", tmp_path / "demo.safetensors"
    args = ("copy-model", "train", str(images), "--out", str(out), *TINY_FLAGS)
    first = curate(*args, "--export", str(export), data_root=tmp_path / "data")
    assert f"weights:  {export}" in first.stdout and "calibrated on self:" in first.stdout
    assert "CURATE_COPY_WEIGHTS=" in first.stdout and export.is_file()
    stamp = export.stat().st_mtime_ns
    again = curate(*args, "--export", str(export), data_root=tmp_path / "data")
    assert "reusing" in again.stderr and export.stat().st_mtime_ns == stamp


def test_bad_commands_are_clear_errors(images, tmp_path):
    data = tmp_path / "data"
    cases = [
        (("train", str(images), "--out", str(tmp_path), "--minutes", "0"), "minutes must be"),
        (("train", str(tmp_path / "none"), "--out", str(tmp_path)), "not a folder"),
        (("train", str(images), "--out", str(tmp_path), "--export", "m.pt"), ".safetensors"),
        (("demo-eval", str(images), str(tmp_path / "eval")), "no complete demo corpus"),
    ]
    for args, message in cases:
        failed = curate("copy-model", *args, data_root=data, check_code=2)
        assert message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr


def test_the_dedup_stage_runs_a_trained_model_at_its_calibrated_point(
    ray_local, settings, images, tmp_path
):
    corpus = load_corpus(str(images), side=64, max_images=100, progress=False)
    config = CopyTrainConfig(batch_size=4, steps=3, augment=AugmentConfig(size=32))
    trained = train_copy_model(corpus, tmp_path / "models", config, progress=False, log=print)
    settings = settings.model_copy(update={"copy_weights": trained.weights})
    spec = parse_job_spec({"source": str(images), "job_id": "cm", "until": "dedup"})
    report = run_job(spec, settings, log=lambda _: None)
    dedup = next(s for s in report["stages"] if s["stage"] == "dedup")
    metrics = dedup["metrics"]
    assert dedup["status"] == "done" and "copy_edges" in metrics
    assert metrics["copy_threshold_source"].startswith("calibrated on ")
    assert metrics["copy_threshold"] == trained.card.calibration["copy_threshold"]
    assert metrics["eval_threshold"] == trained.card.calibration["eval_threshold"]
    model = metrics["copy_model"]
    assert model["made"]["steps"] == 3 and "trained in-house" in model["summary"]
    assert model["calibration"]["set"].startswith("self:") and "curve" not in model["calibration"]

    # A job's ingest shards are a training source too: the same images, the same content.
    from_job = load_corpus("cm", side=64, max_images=100, settings=settings, progress=False)
    assert from_job.fingerprint == corpus.fingerprint
