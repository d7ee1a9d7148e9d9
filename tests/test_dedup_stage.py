"""The dedup stage end to end: real Ray, real catalog, planted duplicates of every kind."""

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageEnhance
from torch import nn

from curate.catalog import Catalog
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.images import encode, photo


class ThumbnailDescriptor(nn.Module):
    """A copy descriptor that truly finds the copies planted here: the mean-free 16x16 gray
    thumbnail, L2-normalised, padded to 512. Saved as TorchScript, it stands in for an SSCD
    release file, which cannot be downloaded in tests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.mean(dim=1, keepdim=True)
        thumb = nn.functional.adaptive_avg_pool2d(gray, 16).flatten(1)
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        padded = nn.functional.pad(thumb, (0, 512 - 256))
        return nn.functional.normalize(padded, dim=1)


def crop(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * fraction), int(h * fraction)
    return img.crop((dx, dy, w - dx, h - dy))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    crawl = root / "crawl"
    crawl.mkdir()
    originals = [photo(200, 150, seed=1000 + i) for i in range(24)]
    for i, img in enumerate(originals):
        (crawl / f"o{i:02d}.jpg").write_bytes(encode(img, "JPEG", quality=92))
    planted = {
        "z-exact.jpg": (0, (crawl / "o00.jpg").read_bytes()),
        "z-q30.jpg": (1, encode(originals[1], "JPEG", quality=30)),
        "z-half.jpg": (2, encode(originals[2].resize((100, 75)), "JPEG", quality=92)),
        "z-bright.jpg": (3, encode(ImageEnhance.Brightness(originals[3]).enhance(1.3), "JPEG")),
        "z-crop.png": (4, encode(crop(originals[4], 0.05).resize((200, 150)), "PNG")),
    }
    for name, (_, data) in planted.items():
        (crawl / name).write_bytes(data)
    evaluation = root / "eval"
    evaluation.mkdir()
    (evaluation / "copy-of-5.png").write_bytes(encode(crop(originals[5], 0.05), "PNG"))
    (evaluation / "unrelated.jpg").write_bytes(encode(photo(200, 150, seed=99), "JPEG"))
    weights = root / "thumbnail.torchscript.pt"
    torch.jit.script(ThumbnailDescriptor()).save(str(weights))
    return {"crawl": crawl, "eval": evaluation, "weights": weights, "planted": planted}


def rows_by_uri(settings, job):
    catalog = Catalog(settings.catalog_file, settings.data_root)
    _, rows = catalog.query(
        f'SELECT uri, keep, reason, duplicate_of, group_id, image_id FROM "{job}".dedup'
    )
    return {uri.rsplit("/", 1)[1]: row for uri, *row in rows}


def test_planted_duplicates_are_found_and_nothing_else_merged(ray_local, settings, corpus):
    settings = settings.model_copy(update={"copy_weights": corpus["weights"]})
    catalog = Catalog(settings.catalog_file, settings.data_root)
    catalog.add_eval_set("bench", str(corpus["eval"]))
    spec = parse_job_spec(
        {
            "source": str(corpus["crawl"]),
            "job_id": "d",
            "eval_sets": ["bench"],
            "ingest": {"shard_size": 10},
        }
    )
    report = run_job(spec, settings, log=lambda _: None)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["dedup"]["status"] == "done"
    removed = stages["dedup"]["metrics"]["removed"]
    assert removed["exact"] == 1 and removed["eval_contamination"] == 1

    rows = rows_by_uri(settings, "d")
    ids = {name: row[4] for name, row in rows.items()}
    for name, (source, _) in corpus["planted"].items():
        keep, reason, duplicate_of, group_id, _ = rows[name]
        original = f"o{source:02d}.jpg"
        assert not keep and reason in ("exact", "pca_hash", "copy"), (name, reason)
        assert duplicate_of == ids[original], f"{name} should point at {original}"
        assert group_id == ids[original] and rows[original][0], f"{original} is kept"
    assert rows["z-exact.jpg"][1] == "exact"
    assert rows["z-q30.jpg"][1] == "pca_hash" and rows["z-bright.jpg"][1] == "pca_hash"

    keep, reason, duplicate_of, _, _ = rows["o05.jpg"]
    assert not keep and reason == "eval_contamination" and duplicate_of.startswith("bench:")
    others = [row for name, row in rows.items() if name.startswith("o") and name != "o05.jpg"]
    assert all(row[0] and row[1] is None for row in others), "no original merged with another"
    assert (settings.job_dir("d") / "dedup" / "pca_hash.npz").exists()


def test_without_weights_copy_detection_is_skipped_loudly(ray_local, settings, corpus):
    spec = parse_job_spec(
        {"source": str(corpus["crawl"]), "job_id": "nw", "dedup": {"hash": "phash"}}
    )
    with pytest.warns(RuntimeWarning, match="CURATE_COPY_WEIGHTS"):
        report = run_job(spec, settings, log=lambda _: None)
    dedup = next(s for s in report["stages"] if s["stage"] == "dedup")
    assert dedup["metrics"]["copy_detection"].startswith("skipped")
    rows = rows_by_uri(settings, "nw")
    assert rows["z-exact.jpg"][1] == "exact" and rows["z-q30.jpg"][1] == "pca_hash"


def test_interrupted_dedup_resumes_to_the_same_decisions(ray_local, settings, corpus):
    settings = settings.model_copy(update={"copy_weights": corpus["weights"]})
    spec = {"source": str(corpus["crawl"]), "ingest": {"shard_size": 7}}
    run_job(parse_job_spec({**spec, "job_id": "ref"}), settings, log=lambda _: None)
    run_job(
        parse_job_spec({**spec, "job_id": "cut", "until": "ingest"}), settings, log=lambda _: None
    )
    catalog = Catalog(settings.catalog_file, settings.data_root)
    # One ingest shard goes missing mid-stage: the features pass fails after other parts commit.
    victim = catalog.shard_paths("cut", "ingest")[-1]
    hidden = victim.with_suffix(".away")
    victim.rename(hidden)
    with pytest.raises(Exception, match="part"):
        run_job(parse_job_spec({**spec, "job_id": "cut"}), settings, log=lambda _: None)
    parts = len(catalog.shard_paths("cut", "ingest"))
    assert len(catalog.committed_parts("cut", "dedup_features")) < parts
    hidden.rename(victim)
    run_job(parse_job_spec({**spec, "job_id": "cut"}), settings, log=lambda _: None)

    def decisions(job):
        tables = [pq.read_table(p) for p in catalog.shard_paths(job, "dedup")]
        rows = [r for t in tables for r in t.to_pylist()]
        return sorted(
            (r["image_id"], r["part"], r["item"], r["keep"], r["reason"], r["duplicate_of"])
            for r in rows
        )

    assert decisions("cut") == decisions("ref") and len(decisions("cut")) == 29
