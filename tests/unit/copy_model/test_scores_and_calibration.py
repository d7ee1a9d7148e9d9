"""Scoring a grouping against known copies, the calibration curve and its operating points, and
the thresholds a job runs at."""

import numpy as np
import pytest

from curate.copy_model.calibrate import (
    GRID,
    curve,
    distractor_pairs,
    labelled_copies,
    operating_points,
)
from curate.copy_model.scores import originals_of, score_groups
from curate.stages.dedup.model_card import ModelCard, read_model_card, resolve_thresholds
from tests.images import photo

# Two sources: 0 (an original and two edits) and 1 (an original and one edit), plus 2 alone.
SOURCE = np.array([0, 0, 0, 1, 1, 2])
EDIT = np.array(["", "JPEG q30", "mirror", "", "greyscale", ""], dtype=object)


def test_perfect_grouping_scores_one_and_merges_nothing():
    scores = score_groups(np.array([0, 0, 0, 3, 3, 5]), SOURCE, EDIT)
    assert scores["pair_precision"] == 1.0 and scores["pair_recall"] == 1.0
    assert scores["easy_recall"] == 1.0 and scores["hard_geometric_recall"] == 1.0
    assert scores["wrongly_merged"] == 0


def test_a_false_edge_chains_groups_and_is_counted_once_per_picture():
    # The mirrored copy is missed, and source 1 joins source 2 through one false edge.
    scores = score_groups(np.array([0, 0, 2, 3, 3, 3]), SOURCE, EDIT)
    assert scores["per_edit_recall"] == {"JPEG q30": 1.0, "greyscale": 1.0, "mirror": 0.0}
    assert scores["hard_geometric_recall"] == 0.0 and scores["easy_recall"] == 1.0
    # Pairs inside groups: (0,1) true; (3,4) true, (3,5) and (4,5) false.
    assert scores["predicted_pairs"] == 4 and scores["true_pairs_found"] == 2
    assert scores["pair_precision"] == 0.5 and scores["wrongly_merged"] == 2


def test_every_source_needs_its_original():
    with pytest.raises(ValueError, match="original"):
        originals_of(np.array([0, 0]), np.array(["JPEG q30", "mirror"], dtype=object))


def _descriptors(copies: float, look_alikes: float, originals: int = 6) -> tuple:
    """Unit vectors where each original's 14 edits sit at cosine `copies` to it and originals
    0 and 1 are look-alikes at cosine `look_alikes`."""
    images, source, edit = labelled_copies([photo(24, 24, seed=s) for s in range(originals)])
    rng = np.random.default_rng(0)
    bases = np.linalg.qr(rng.standard_normal((64, 64)))[0][:originals]
    bases[1] = look_alikes * bases[0] + np.sqrt(1 - look_alikes**2) * bases[1]
    vectors = np.empty((len(images), 64), np.float32)
    for row, s in enumerate(source):
        if edit[row] == "":
            vectors[row] = bases[s]
        else:
            noise = rng.standard_normal(64)
            noise -= (noise @ bases[s]) * bases[s]
            noise /= np.linalg.norm(noise)
            vectors[row] = copies * bases[s] + np.sqrt(1 - copies**2) * noise
    return vectors, source, edit


def test_calibration_picks_the_lowest_threshold_that_reaches_the_precision():
    vectors, source, edit = _descriptors(copies=0.8, look_alikes=0.6)
    points = curve(vectors, source, edit)
    assert [p["threshold"] for p in points] == GRID.tolist()
    chosen = operating_points(points)
    # Below 0.6 the look-alike originals merge; above 0.8 the copies fall apart. Edits of one
    # original sit at about 0.64 to each other, which chains nothing across sources.
    assert 0.6 <= chosen["copy_threshold"] < 0.8 and chosen["precision_reached"]
    at = chosen["at_copy_threshold"]
    assert at["pair_precision"] >= 0.95 and at["easy_recall"] == 1.0
    assert chosen["eval_threshold"] <= chosen["copy_threshold"]


def test_unreachable_precision_says_so():
    vectors, source, edit = _descriptors(copies=0.5, look_alikes=0.99)
    chosen = operating_points(curve(vectors, source, edit))
    assert not chosen["precision_reached"] or chosen["copy_threshold"] >= 0.9


def test_a_job_threshold_wins_then_the_model_then_dinov2():
    calibrated = ModelCard(calibration={"copy_threshold": 0.72, "eval_threshold": 0.5})
    assert resolve_thresholds(0.3, None, calibrated).metrics() == {
        "copy_threshold": 0.3,
        "copy_threshold_source": "job",
        "eval_threshold": 0.5,
        "eval_threshold_source": "calibrated",
    }
    published = resolve_thresholds(None, None, ModelCard())
    assert (published.copy, published.eval) == (0.6, 0.45)
    assert published.copy_source == published.eval_source == "default"


def test_files_without_a_card_read_as_published_sscd(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a model")
    for path in (None, junk, tmp_path / "missing.safetensors"):
        card = read_model_card(path)
        assert card.input_size == 320 and card.calibration is None and not card.flip_invariant
    assert ModelCard.from_metadata({}).summary().startswith("a published")


def test_false_match_rates_fall_with_the_threshold_and_count_distinct_pairs():
    vectors, source, edit = _descriptors(copies=0.8, look_alikes=0.6)
    points = curve(vectors, source, edit)
    rates = [p["false_match_rate"] for p in points]
    assert rates == sorted(rates, reverse=True) and rates[-1] == 0.0 and rates[0] > 0
    # 6 originals x 15 images: pairs of different originals only.
    assert distractor_pairs(source) == 90 * 89 // 2 - 6 * (15 * 14 // 2)


def test_a_job_scales_the_calibrated_threshold_to_its_size():
    rates = [(0.5, 1e-2), (0.6, 1e-4), (0.7, 1e-6), (0.8, 0.0)]
    card = ModelCard(
        calibration={
            "copy_threshold": 0.6,
            "eval_threshold": 0.5,
            "images": 100,
            "false_match_pictures": 100,
            "at_copy_threshold": {"threshold": 0.6, "false_match_rate": 1e-4},
            "curve": [{"threshold": t, "false_match_rate": r} for t, r in rates],
        }
    )
    calibrated = resolve_thresholds(None, None, card)
    # The calibration's size, or less: the calibrated point.
    small = calibrated.at_scale(101, eval_images=1)
    assert small.copy == 0.6 and small.copy_source.startswith("calibrated on 100 images")
    assert calibrated.at_scale(20).copy == 0.6
    assert small.eval == 0.5  # 1% of 101 images against one eval image: 1e-2 allowed
    assert calibrated.at_scale(101, eval_images=10).eval == 0.6  # 1e-3 allowed
    # 100 times the images: a hundredth of the rate keeps the false pairs per image.
    assert calibrated.at_scale(10_000).copy == 0.7
    # A million images allow 1e-8 per pair: more than the calibration set could see.
    assert calibrated.at_scale(1_000_000).copy == 0.8
    given = resolve_thresholds(0.55, None, card).at_scale(1_000_001)
    assert given.copy == 0.55 and given.copy_source == "job"
    assert resolve_thresholds(None, None, ModelCard()).at_scale(10**6).copy == 0.6
