"""The dedup stage end to end: real Ray, real catalog, planted duplicates of every kind."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageEnhance
from torch import nn

from curate.catalog import Catalog
from curate.core.shards import shard_name, write_shard
from curate.stages.dedup.decide import Decisions, decide
from curate.stages.dedup.features import list_column
from curate.stages.dedup.pca_hash.basis import PCAHasher
from curate.stages.dedup.pca_hash.features import FEATURE_DIM
from pipelines.job import run_job
from schemas.job import DedupOptions, parse_job_spec
from schemas.shards import DEDUP_FEATURES
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
            "until": "dedup",
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
        {
            "source": str(corpus["crawl"]),
            "job_id": "nw",
            "until": "dedup",
            "dedup": {"hash": "phash"},
        }
    )
    with pytest.warns(RuntimeWarning, match="CURATE_COPY_WEIGHTS"):
        report = run_job(spec, settings, log=lambda _: None)
    dedup = next(s for s in report["stages"] if s["stage"] == "dedup")
    assert dedup["metrics"]["copy_detection"].startswith("skipped")
    rows = rows_by_uri(settings, "nw")
    assert rows["z-exact.jpg"][1] == "exact" and rows["z-q30.jpg"][1] == "pca_hash"


def test_interrupted_dedup_resumes_to_the_same_decisions(ray_local, settings, corpus):
    settings = settings.model_copy(update={"copy_weights": corpus["weights"]})
    spec = {"source": str(corpus["crawl"]), "until": "dedup", "ingest": {"shard_size": 7}}
    run_job(parse_job_spec({**spec, "job_id": "ref"}), settings, log=lambda _: None)
    run_job(
        parse_job_spec({**spec, "job_id": "cut", "until": "ingest"}), settings, log=lambda _: None
    )
    catalog = Catalog(settings.catalog_file, settings.data_root)
    # One ingest shard turns unreadable mid-stage (same size: a run's own integrity check,
    # existence and size, passes it): the features pass fails after other parts commit.
    victim = catalog.shard_paths("cut", "ingest")[-1]
    intact = victim.read_bytes()
    victim.write_bytes(bytes(len(intact)))
    with pytest.raises(Exception, match="part"):
        run_job(parse_job_spec({**spec, "job_id": "cut"}), settings, log=lambda _: None)
    parts = len(catalog.shard_paths("cut", "ingest"))
    assert len(catalog.committed_parts("cut", "dedup_features")) < parts
    victim.write_bytes(intact)
    run_job(parse_job_spec({**spec, "job_id": "cut"}), settings, log=lambda _: None)

    def decisions(job):
        tables = [pq.read_table(p) for p in catalog.shard_paths(job, "dedup")]
        rows = [r for t in tables for r in t.to_pylist()]
        return sorted(
            (r["image_id"], r["part"], r["item"], r["keep"], r["reason"], r["duplicate_of"])
            for r in rows
        )

    assert decisions("cut") == decisions("ref") and len(decisions("cut")) == 29


# -- the decisions, straight from feature shards (no Ray) ------------------------------------------

DIM = FEATURE_DIM


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def features_job(tmp_path_factory) -> dict:
    """400 distinct images with planted near duplicates (hash features), planted copies (copy
    descriptors) and repeats across ingest shards, as the features pass would leave them."""
    rng = np.random.default_rng(7)
    n = 400
    hash_features = _unit(rng.standard_normal((n, DIM)))
    descriptors = _unit(rng.standard_normal((n, 512)))
    # Near duplicates of images 0..29: same hash, same copy. 7 degrees from their original (13
    # with 0.02, when the hash was 64 bits at radius 5: a 128-bit code within 16 sees 7 surely).
    for target in range(300, 330):
        hash_features[target] = _unit(hash_features[target - 300] + 0.01 * rng.standard_normal(DIM))
        descriptors[target] = _unit(descriptors[target - 300] + 0.01 * rng.standard_normal(512))
    for target in range(330, 350):  # copies of images 40..59 the hash cannot see
        descriptors[target] = _unit(descriptors[target - 290] + 0.03 * rng.standard_normal(512))
    ids = [f"{i:064x}" for i in range(n)]
    # Source order: part p holds items 0..; images 5 and 77 occur again in a later part.
    rows = [(i, i // 40, i % 40) for i in range(n)] + [(5, 10, 0), (77, 10, 1)]
    return {
        "ids": ids,
        "rows": rows,
        "area": rng.integers(5_000, 50_000, n),
        "hash_features": hash_features.astype(np.float32),
        "descriptors": descriptors.astype(np.float16),
        "root": tmp_path_factory.mktemp("features"),
    }


def _write_job(job: dict, shards: int, name: str) -> tuple[list, list]:
    """The job's rows cut into `shards` feature shards (and ingest shards by part)."""
    root = job["root"] / name
    rows = job["rows"]
    feature_paths = []
    for k, chunk in enumerate(np.array_split(np.arange(len(rows)), shards)):
        picked = [rows[c] for c in chunk]
        image = [i for i, _, _ in picked]
        table = pa.table(
            {
                "image_id": [job["ids"][i] for i in image],
                "part": [p for _, p, _ in picked],
                "item": [t for _, _, t in picked],
                "area": job["area"][image],
                "hash_features": list_column([job["hash_features"][image]], pa.float32(), 0),
                "copy_descriptor": list_column([job["descriptors"][image]], pa.float16(), 0),
            },
            schema=DEDUP_FEATURES,
        )
        feature_paths.append(write_shard(table, root / "features" / shard_name(k)).path)
    ingest_paths = []
    for part in sorted({p for _, p, _ in rows}):
        ids = [job["ids"][i] for i, p, _ in rows if p == part]
        path = root / "ingest" / shard_name(part)
        ingest_paths.append(write_shard(pa.table({"image_id": ids}), path).path)
    return ingest_paths, feature_paths


def _decided(job: dict, shards: int, name: str, pca_sample: int = 150, **kwargs) -> Decisions:
    ingest, features = _write_job(job, shards, name)
    options = DedupOptions(pca_sample=pca_sample, copy_k=16)
    return decide(ingest, features, options, [], job["root"] / name / "dedup", **kwargs)


def _same_decisions(a: Decisions, b: Decisions) -> None:
    for name in ("image_ids", "first_part", "first_item", "occurrences", "reason", "group"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.duplicate_of, b.duplicate_of)
    np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-6)
    assert a.metrics == b.metrics


def test_decisions_stream_shard_by_shard_to_the_same_result(features_job, tmp_path):
    whole = _decided(features_job, 1, "one")
    assert whole.metrics["images"] == 400 and whole.metrics["removed"]["exact"] == 2
    assert whole.metrics["removed"]["pca_hash"] == 30
    assert whole.metrics["removed"]["copy"] == 20
    # Of each planted pair (i, i + 300) the smaller image goes, pointing at the larger one.
    hashed = np.flatnonzero(whole.reason == "pca_hash")
    np.testing.assert_array_equal(np.sort(hashed % 300), np.arange(30))
    np.testing.assert_array_equal(whole.group[hashed] % 300, hashed % 300)
    assert (features_job["area"][whole.group[hashed]] >= features_job["area"][hashed]).all()
    # Any cut of the same rows into shards, memory-mapped or not, decides the same; so does a
    # copy graph searched in slices elsewhere, out of order.
    _same_decisions(whole, _decided(features_job, 7, "seven"))

    def backwards(search, slices):
        return [search(start, stop) for start, stop in reversed(slices)]

    sliced = _decided(
        features_job, 3, "three", scratch=tmp_path, map_slices=backwards, slice_rows=50
    )
    _same_decisions(whole, sliced)


def test_the_stage_fans_the_copy_graph_and_hash_tables_out_as_ray_tasks(ray_local, features_job):
    from curate.stages.dedup.stage import _HashTablesOn, _SlicesOn
    from pipelines.executor import fan_out

    whole = _decided(features_job, 1, "in-process")
    fanned = _decided(
        features_job,
        2,
        "fanned",
        map_slices=_SlicesOn(fan_out),
        slice_rows=64,
        map_tables=_HashTablesOn(fan_out),
    )
    _same_decisions(whole, fanned)


def test_streamed_hash_codes_equal_a_fit_on_all_features(features_job):
    # A sample of 300 of the 400 images: enough for 128 axes (150 gets the DCT-sign basis).
    decisions = _decided(features_job, 5, "five", pca_sample=300)
    basis = PCAHasher.load(features_job["root"] / "five" / "dedup" / "pca_hash.npz")
    # The same basis as one fit on the whole feature matrix, sampled by the same seed.
    options = DedupOptions()
    reference = PCAHasher.fit(
        features_job["hash_features"], bits=options.hash_bits, sample_size=300, seed=0
    )
    for name in ("mean", "components", "rotation"):
        np.testing.assert_array_equal(getattr(basis, name), getattr(reference, name))
    assert decisions.metrics["hash_pairs"] == 30


def test_copy_background_raises_the_bar_for_images_near_a_dense_background(features_job):
    plain = _decided(features_job, 2, "plain")
    # Background images close to one copied pair: SSCD normalisation discounts that pair.
    original, copy = 41, 331
    pair = features_job["descriptors"][[original, copy]].astype(np.float32).sum(axis=0)
    noise = np.random.default_rng(3).standard_normal((3, 512))
    background = _unit(pair + 0.3 * np.linalg.norm(pair) * _unit(noise)).astype(np.float16)
    normalised = _decided(features_job, 2, "normalised", copy_background=background)
    assert plain.reason[copy] == "copy" or plain.reason[original] == "copy"
    assert normalised.reason[copy] is None and normalised.reason[original] is None
    others = np.setdiff1d(np.arange(400), [original, copy])
    np.testing.assert_array_equal(normalised.reason[others], plain.reason[others])


def test_mixed_feature_shards_are_refused(features_job):
    ingest, features = _write_job(features_job, 2, "mixed")
    table = pq.read_table(features[1])
    empty = pa.nulls(table.num_rows, pa.list_(pa.float16()))
    write_shard(table.set_column(5, "copy_descriptor", empty), features[1])
    with pytest.raises(ValueError, match="CURATE_COPY_WEIGHTS"):
        decide(ingest, features, DedupOptions(), [], features_job["root"] / "mixed" / "dedup")
