"""The named copy edits and the training augmentations: shapes, determinism, checked settings."""

import numpy as np
import pytest
import torch
from PIL import Image

from curate.copy_model.augment import copy_view, positive_pairs, to_tensor
from curate.copy_model.config import AugmentConfig, CopyConfigError, CopyTrainConfig
from curate.copy_model.edits import BY_NAME, EASY_FAMILIES, EDITS, FAMILIES, family_of
from tests.images import photo


def test_every_edit_gives_an_rgb_image_in_its_family():
    img = photo(120, 90, seed=1)
    assert len(EDITS) == 14 and {e.family for e in EDITS} == set(FAMILIES)
    for edit in EDITS:
        out = edit.apply(img)
        assert out.mode == "RGB" and min(out.size) > 0, edit.name
    assert BY_NAME["resize 50%"].apply(img).size == (60, 45)
    assert BY_NAME["crop 50%"].apply(img).size == (60, 45)
    assert BY_NAME["padding"].apply(img).size == (132, 98)  # 5% a side, rounded
    mirrored = np.asarray(BY_NAME["mirror"].apply(img))
    assert (mirrored == np.asarray(img)[:, ::-1]).all()
    # A codec edit decodes what its file holds: lossy, so not the input's pixels.
    assert not np.array_equal(np.asarray(BY_NAME["JPEG q30"].apply(img)), np.asarray(img))
    assert family_of(["", "WebP", "mirror"]) == ["", "re-encoding", "hard geometric"]
    assert set(EASY_FAMILIES) < set(FAMILIES)


def test_views_are_square_strong_and_drawn_only_from_the_rng():
    img = photo(160, 120, seed=2)
    config = AugmentConfig(size=48)
    first = copy_view(img, config, np.random.default_rng(5))
    again = copy_view(img, config, np.random.default_rng(5))
    other = copy_view(img, config, np.random.default_rng(6))
    assert first.size == (48, 48) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    # Every step switched on: crops, flips, rotations, colour, grey, blur, text, emoji, pad, JPEG.
    everything = AugmentConfig(
        size=48, flip=1, rotate=1, colour=1, grey=1, blur=1, text=1, emoji=1, pad=1, jpeg=1
    )
    assert copy_view(img, everything, np.random.default_rng(0)).size == (48, 48)


def test_positive_pairs_stack_two_views_per_image_normalised():
    images = [photo(80, 60, seed=s) for s in range(3)]
    batch = positive_pairs(images, AugmentConfig(size=32), np.random.default_rng(0))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    white = to_tensor([Image.new("RGB", (4, 4), (255, 255, 255))])
    assert torch.allclose(white[0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.64]), atol=1e-3)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: AugmentConfig(size=8), "size"),
        (lambda: AugmentConfig(jpeg=1.5), "augment.jpeg"),
        (lambda: CopyTrainConfig(batch_size=1), "batch_size"),
        (lambda: CopyTrainConfig(arch="vit"), "arch"),
        (lambda: CopyTrainConfig(minutes=0), "minutes"),
        (lambda: CopyTrainConfig(lr=-1), "lr"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(make, named):
    with pytest.raises(CopyConfigError, match=named) as raised:
        make()
    assert raised.value.kind == "input" and raised.value.code == "copy_config_invalid"


def test_the_run_key_changes_with_the_images_and_every_setting():
    config = CopyTrainConfig(minutes=2)
    assert config.key("a") == CopyTrainConfig(minutes=2).key("a")
    assert config.key("a") != config.key("b")
    assert config.key("a") != CopyTrainConfig(minutes=3).key("a")
    assert config.key("a") != CopyTrainConfig(minutes=2, augment=AugmentConfig(size=64)).key("a")
