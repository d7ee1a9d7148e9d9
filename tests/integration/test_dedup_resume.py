"""SIGKILL a `curate run` inside each dedup stage (at fixed points, see tests/kill.py), re-run
it: exactly the uninterrupted decisions."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import ImageEnhance

from curate.catalog import Catalog
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.images import encode, photo
from tests.integration.test_dedup_stage import ThumbnailDescriptor, crop
from tests.kill import run_killed

SHARD_SIZE = 3
JOB = "k"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dedup-resume")
    crawl = root / "crawl"
    crawl.mkdir()
    originals = [photo(160, 120, seed=2000 + i) for i in range(18)]
    for i, img in enumerate(originals):
        (crawl / f"o{i:02d}.jpg").write_bytes(encode(img, "JPEG", quality=92))
    # One duplicate of every kind, spread over the shards (names sort after the originals).
    (crawl / "z-exact.jpg").write_bytes((crawl / "o00.jpg").read_bytes())
    (crawl / "z-q30.jpg").write_bytes(encode(originals[1], "JPEG", quality=30))
    bright = ImageEnhance.Brightness(originals[3]).enhance(1.3)
    (crawl / "z-bright.jpg").write_bytes(encode(bright, "JPEG"))
    (crawl / "z-crop.png").write_bytes(encode(crop(originals[4], 0.05).resize((160, 120)), "PNG"))
    evaluation = root / "eval"
    evaluation.mkdir()
    (evaluation / "copy-of-6.png").write_bytes(encode(crop(originals[6], 0.05), "PNG"))
    weights = root / "thumbnail.torchscript.pt"
    torch.jit.script(ThumbnailDescriptor()).save(str(weights))
    return {"crawl": crawl, "eval": evaluation, "weights": weights}


def run_dedup_killed(corpus: dict[str, Path], data_root: Path, stage: str, after: int) -> None:
    args = ["run", "--source", str(corpus["crawl"]), "--job", JOB, "--until", "dedup"]
    args += ["--shard-size", str(SHARD_SIZE), "--eval-sets", "bench"]
    run_killed(args, data_root, stage, after, CURATE_COPY_WEIGHTS=str(corpus["weights"]))


def registered(catalog: Catalog, job: str, stage: str) -> list[tuple]:
    """Every row of the stage's registered shards, comparable across jobs."""
    rows = []
    for path in catalog.shard_paths(job, stage):
        table = pq.read_table(path)
        rows += [tuple(str(v) for v in row.values()) for row in table.to_pylist()]
    return sorted(rows)


def stage_summary(report: dict) -> dict[str, tuple]:
    return {
        s["stage"]: (s["status"], s["parts_done"], s["parts_total"], s["rows_in"], s["rows_out"])
        for s in report["stages"]
    }


def test_sigkill_in_each_dedup_stage_then_resume_decides_exactly_once(ray_local, settings, corpus):
    settings = settings.model_copy(update={"copy_weights": corpus["weights"]})
    catalog = Catalog(settings.catalog_file, settings.data_root)
    catalog.add_eval_set("bench", str(corpus["eval"]))
    spec = {
        "source": str(corpus["crawl"]),
        "until": "dedup",
        "eval_sets": ["bench"],
        "ingest": {"shard_size": SHARD_SIZE},
    }
    reference = run_job(parse_job_spec({**spec, "job_id": "ref"}), settings, log=lambda _: None)
    parts = len(catalog.shard_paths("ref", "ingest"))
    assert parts == 8

    # Killed inside the features pass, then inside the decisions pass after the features finish.
    run_dedup_killed(corpus, settings.data_root, "dedup_features", after=2)
    assert len(catalog.committed_parts(JOB, "dedup_features")) == 2
    assert catalog.stage_status(JOB, "dedup") is None
    run_dedup_killed(corpus, settings.data_root, "dedup", after=3)
    assert len(catalog.committed_parts(JOB, "dedup_features")) == parts
    assert len(catalog.committed_parts(JOB, "dedup")) == 3
    stage_dir = settings.job_dir(JOB) / "dedup"
    on_disk = sorted(stage_dir.glob("part-*.parquet"))
    # The fourth shard (and any other part in flight) is in place, unregistered, at the kill.
    assert len(on_disk) > 3

    report = run_job(parse_job_spec({**spec, "job_id": JOB}), settings, log=lambda _: None)

    assert report["status"] == "done"
    assert stage_summary(report) == stage_summary(reference)
    for stage in ("dedup_features", "dedup"):
        rows = registered(catalog, JOB, stage)
        assert rows == registered(catalog, "ref", stage), f"{stage} differs from the reference"
        where = [  # (part, item) of every registered row: none written twice
            (row["part"], row["item"])
            for path in catalog.shard_paths(JOB, stage)
            for row in pq.read_table(path, columns=["part", "item"]).to_pylist()
        ]
        assert len(set(where)) == len(where) == len(rows)
    decisions = {s["stage"]: s["metrics"] for s in report["stages"]}["dedup"]
    expected = {s["stage"]: s["metrics"] for s in reference["stages"]}["dedup"]
    assert decisions == expected
    assert decisions["removed"] == {
        "exact": 1,
        "pca_hash": 2,
        "copy": 1,
        "eval_contamination": 1,
    }
    # The shard the kill left unregistered was rewritten in place: no stray files either.
    assert sorted(stage_dir.glob("*.parquet")) == catalog.shard_paths(JOB, "dedup")
    assert not list(stage_dir.glob(".*.tmp"))
