"""A copy-model run end to end, kept tiny: a few dozen generated images, 32-pixel views, a few
steps; the weights it writes load through the copy pass's own loader with their card."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curate.copy_model.calibrate import CALIBRATION_VERSION
from curate.copy_model.config import AugmentConfig, CopyTrainConfig
from curate.copy_model.corpus import CorpusError, CorpusNotFound, load_corpus
from curate.copy_model.train import STATE_NAME, info_nce, train_copy_model
from curate.stages.dedup.copy_detection import (
    FlipInvariant,
    SSCDNet,
    copy_descriptors,
    copy_transform,
    load_copy_descriptor,
)
from curate.stages.dedup.model_card import read_model_card
from tests.images import encode, photo

TINY = CopyTrainConfig(batch_size=4, steps=3, augment=AugmentConfig(size=32))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy-corpus")
    for i in range(30):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        (root / f"img-{i:02d}.{ext}").write_bytes(encode(photo(72, 56, seed=300 + i), fmt))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "notes.txt").write_text("not an image")
    return root


def test_info_nce_rewards_aligned_views():
    views = F.normalize(torch.randn(8, 16), dim=-1)
    aligned = torch.cat([views[:4], views[:4]])
    assert info_nce(aligned, 0.1) < info_nce(views, 0.1)


def test_corpus_decodes_small_holds_out_and_fingerprints_content(folder, tmp_path):
    corpus = load_corpus(str(folder), side=40, max_images=100, progress=False)
    assert len(corpus.train) + len(corpus.held_out) == 30 and corpus.skipped == 1
    assert len(corpus.held_out) == 3 and min(corpus.train[0].size) == 40
    again = load_corpus(f"{folder}/*.jpg", side=40, max_images=100, progress=False)
    assert again.fingerprint != corpus.fingerprint  # another set of images
    copied = tmp_path / "copy"
    copied.mkdir()
    for path in folder.glob("img-*"):
        (copied / path.name).write_bytes(path.read_bytes())
    assert load_corpus(str(copied), side=40, max_images=100, progress=False).fingerprint == (
        corpus.fingerprint
    ), "same bytes elsewhere: same fingerprint"


def test_corpus_errors_name_the_source(folder, tmp_path, settings):
    with pytest.raises(CorpusNotFound, match="no image files"):
        load_corpus(str(tmp_path), side=32, max_images=10, progress=False)
    with pytest.raises(CorpusNotFound, match="glob"):
        load_corpus(f"{tmp_path}/*.png", side=32, max_images=10, progress=False)
    with pytest.raises(CorpusNotFound, match="no catalog"):
        load_corpus("some-job", side=32, max_images=10, settings=settings, progress=False)
    with pytest.raises(CorpusError, match="at least 8"):
        load_corpus(f"{folder}/img-0[0-4].*", side=32, max_images=10, progress=False)


def test_a_run_resumes_then_exports_a_calibrated_checkpoint_the_copy_pass_loads(folder, tmp_path):
    corpus = load_corpus(str(folder), side=40, max_images=100, progress=False)
    stopped = train_copy_model(corpus, tmp_path, TINY, stop_after=2, progress=False, log=print)
    assert not stopped.card.made and (stopped.run_dir / STATE_NAME).exists()
    assert not stopped.weights.exists()

    trained = train_copy_model(corpus, tmp_path, TINY, progress=False, log=print)
    assert trained.run_dir == stopped.run_dir and not trained.reused
    card = read_model_card(trained.weights)
    assert card.made["steps"] == 3 and card.made["images"] == 27
    assert card.input_size == 32 and card.flip_invariant and card.arch == "resnet18"
    calibration = card.calibration
    assert calibration["set"].startswith("self: 3 held-out") and calibration["images"] == 45
    assert 0.2 <= calibration["copy_threshold"] < 1 and len(calibration["curve"]) > 10
    assert (
        calibration["version"] == CALIBRATION_VERSION and calibration["false_match_pictures"] == 30
    )
    assert "false_match_rate" in calibration["curve"][0]

    model = load_copy_descriptor(trained.weights, allow_random=False, device="cpu")
    assert isinstance(model, FlipInvariant) and isinstance(model.model, SSCDNet)
    images = [photo(72, 56, seed=s) for s in range(3)]
    descriptors = copy_descriptors(model, images, transform=copy_transform(card.input_size))
    assert descriptors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(descriptors.astype(np.float32), axis=1), 1, atol=1e-2)
    mirrored = copy_descriptors(
        model, [img.transpose(0) for img in images], transform=copy_transform(32)
    )
    np.testing.assert_allclose(descriptors, mirrored, atol=2e-3)  # blind to mirroring

    reused = train_copy_model(corpus, tmp_path, TINY, progress=False, log=print)
    assert reused.reused and reused.weights == trained.weights
