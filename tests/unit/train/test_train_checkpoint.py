"""Checkpoints in one process: stop and resume, refusals, NaN stops, export, the train CLI."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from curate.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from curate.train.export import ExportError, export_checkpoint, read_metadata
from curate.train.loop import default_loader, train
from curate.train.step import NonFiniteLossError
from schemas.train import load_train_config
from services.cli.errors import UsageError
from services.cli.train import add_train_parser
from services.cli.train import main as train_main
from tests.images import jpeg
from tests.shards import write_curated_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curated")
    write_curated_shards(folder, shards=2, per_shard=12)
    return sorted(folder.glob("*.parquet"))


def _config(**overrides):
    body = {"steps": 4, "checkpoint_every": 1, "keep_checkpoints": 5, "batch_size": 4}
    body.update(overrides)
    return load_train_config(preset="tiny", overrides=body)


def _terms(result) -> dict[int, list[float]]:
    names = ("loss", "dino_local", "dino_global", "ibot", "koleo")
    return {m["step"]: [m[n] for n in names] for m in result.metrics if "loss" in m}


def labelled_folder(root: Path) -> Path:
    """Two classes of distinct generated photos."""
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            seed = i if label == "a" else 100 + i
            (root / label / f"{i}.jpg").write_bytes(jpeg(64, 64, seed=seed))
    return root


@pytest.mark.parametrize("knn", [False, True])
def test_stop_and_resume_continues_exactly(shards, tmp_path, knn):
    # With k-NN at the checkpoint step too: building its model must not move the training RNG.
    knn_every = {"knn_every": 2} if knn else {}
    config = _config(loss={"centering": "softmax"}, checkpoint_every=2, **knn_every)
    folder = labelled_folder(tmp_path / "labelled") if knn else None
    whole = train(config, shards, tmp_path / "whole", progress=False, knn_folder=folder)
    assert whole.steps_done == 4 and whole.export is not None
    stopped = train(
        config, shards, tmp_path / "part", stop_after=2, progress=False, knn_folder=folder
    )
    assert stopped.steps_done == 2 and stopped.export is None  # not at the end: no export
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step-00000002"
    resumed = train(
        config, shards, tmp_path / "part", resume=True, progress=False, knn_folder=folder
    )
    expected = _terms(whole)
    assert _terms(resumed) == {3: expected[3], 4: expected[4]}  # bit-identical
    final_whole = load_file(str(whole.export))
    final_resumed = load_file(str(resumed.export))
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_refusals_and_partial_checkpoints(shards, tmp_path):
    config = _config(steps=2)
    train(config, shards, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(config, shards, tmp_path / "run", progress=False)
    other = config.model_copy(update={"model": config.model.model_copy(update={"prototypes": 32})})
    with pytest.raises(CheckpointError, match="different `model`"):
        train(other, shards, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="training shards changed"):
        train(config, shards[:1], tmp_path / "run", resume=True, progress=False)
    # A checkpoint cut short (no meta, `.partial` name) is never picked up.
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(root / "step-00000002", root / "step-00000009.partial")
    (root / "step-00000008").mkdir()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]


def test_non_finite_loss_stops_naming_step_term_and_checkpoint(shards, tmp_path):
    def poisoned_loader(files, config, runtime, patch_size, position):
        loader = default_loader(files, config, runtime, patch_size, position)

        class Poisoned:
            bad_images = 0

            @property
            def position(self):
                return loader.position

            def __iter__(self):
                for index, batch in enumerate(loader):
                    if index == 2:  # the third batch: steps 1 and 2 succeed and checkpoint
                        batch.global_crops[:] = float("nan")
                    yield batch

        return Poisoned()

    with pytest.raises(NonFiniteLossError) as error:
        train(_config(), shards, tmp_path / "run", progress=False, make_loader=poisoned_loader)
    message = str(error.value)
    assert "step 3:" in message and "loss term dino_local" in message
    assert str(tmp_path / "run" / "checkpoints" / "step-00000002") in message


def test_cli_run_export_knn_and_errors(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CURATE_PROGRESS", "0")
    data = str(shards[0].parent)
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "train",
                "run",
                "--data",
                data,
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    out = tmp_path / "backbone.safetensors"
    assert train_main(["train", "export", str(run), str(out)]) == 0
    meta = read_metadata(out)
    model = timm.create_model(
        meta["arch"], pretrained=False, num_classes=0, img_size=int(meta["img_size"])
    )
    model.load_state_dict(load_file(str(out)), strict=True)
    assert export_checkpoint(latest_checkpoint(run / "checkpoints"), tmp_path / "again.st")

    folder = labelled_folder(tmp_path / "labelled")
    capsys.readouterr()
    assert train_main(["train", "knn", str(out), str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["queries"] + result["bank"] == 12

    assert train_main(["train", "run", "--data", str(tmp_path / "none"), "--out", str(run)]) == 2
    assert "none" in capsys.readouterr().err
    assert train_main(["train", "export", str(tmp_path / "nothing"), str(out)]) == 2
    with pytest.raises(ExportError, match="not found"):
        read_metadata(tmp_path / "missing.safetensors")
    # Registered on a parser as the main CLI does, the handlers raise UsageError.
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "run", "--data", data, "--out", str(tmp_path / "x"), "--resume"]
    )
    with pytest.raises(UsageError, match="no checkpoint"):
        args.func(args)
