"""The dataset card says which copy model dedup ran and how it was made."""

from curate.stages.curated.card import dataset_card, dataset_stats

MADE = {
    "arch": "resnet18",
    "images": 1800,
    "source": "data/demo/crawl",
    "steps": 240,
    "minutes": 2.0,
    "device": "cpu",
}


def _report(dedup_metrics: dict) -> dict:
    return {
        "job_id": "demo",
        "stages": [{"stage": "dedup", "status": "done", "metrics": dedup_metrics}],
    }


def test_the_card_names_the_copy_model_its_making_and_its_operating_point():
    calibration = {
        "set": "self: 100 held-out training images x 14 named edits",
        "at_copy_threshold": {
            "pair_precision": 0.97,
            "easy_recall": 0.9,
            "hard_geometric_recall": 0.4,
        },
    }
    metrics = {
        "copy_threshold": 0.91,
        "copy_threshold_source": "calibrated",
        "eval_threshold": 0.85,
        "eval_threshold_source": "calibrated",
        "copy_model": {
            "file": "demo.safetensors",
            "made": MADE,
            "calibration": calibration,
            "summary": "resnet18 trained in-house by `curate copy-model train` on "
            "1800 images of data/demo/crawl for 240 steps (2.0 min on cpu)",
        },
    }
    stats = dataset_stats(_report(metrics), curated=[], cluster=[])
    assert stats["copy_model"]["made"] == MADE and stats["copy_model"]["copy_threshold"] == 0.91
    text = dataset_card(stats, job_id="demo", spec={"source": "data/demo/crawl"})
    assert "copy model: resnet18 trained in-house" in text
    assert "copies above cosine 0.91 (calibrated)" in text
    assert "calibrated on self: 100 held-out" in text and "hard-geometric recall 0.400" in text


def test_the_card_says_when_copy_detection_was_skipped():
    stats = dataset_stats(_report({"copy_detection": "skipped"}), curated=[], cluster=[])
    text = dataset_card(stats, job_id="demo", spec={"source": "x"})
    assert "copy detection was skipped" in text
