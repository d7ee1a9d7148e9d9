"""The whole job, crawl to curated dataset, on a small generated corpus with a tiny random ViT;
and exactly-once through a SIGKILL inside the embed stage (at a fixed point, see tests/kill.py)."""

import hashlib
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from curate.catalog import Catalog
from pipelines.failures import StageFailed
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.images import encode, photo
from tests.kill import run_killed

TINY = {
    "ingest": {"shard_size": 4},
    "embed": {
        "arch": "vit_tiny_patch16_224",
        "image_size": 32,
        "batch_size": 16,
        "random_weights": True,
    },
    "cluster": {"n_clusters": 4, "niter": 10, "balanced_levels": [4, 2]},
    "curated": {"rows_per_shard": 10},
}


def write_corpus(root: Path, count: int) -> None:
    """`count` distinct crawl photos, one exact copy, and a seed folder of resized crawl images."""
    crawl = root / "crawl"
    crawl.mkdir(parents=True)
    for i in range(count):
        (crawl / f"{i:03d}.jpg").write_bytes(encode(photo(96, 80, seed=i), "JPEG", quality=90))
    (crawl / "copy.jpg").write_bytes((crawl / "003.jpg").read_bytes())
    seeds = root / "seeds"
    seeds.mkdir()
    for i in range(0, count, count // 6):
        img = photo(96, 80, seed=i).resize((120, 100))
        (seeds / f"seed{i:03d}.png").write_bytes(encode(img, "PNG"))


def rows(catalog: Catalog, job: str, stage: str, columns: list[str]) -> list[dict]:
    paths = catalog.shard_paths(job, stage)
    return [r for p in paths for r in pq.read_table(p, columns=columns).to_pylist()]


def test_crawl_to_curated_dataset(ray_local, settings, tmp_path):
    write_corpus(tmp_path, 30)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    catalog.add_seed_set("tiny", str(tmp_path / "seeds"), "as-is+knn:2+cluster:3+balanced:5", None)
    spec = parse_job_spec(
        {"source": str(tmp_path / "crawl"), "job_id": "p", "seeds": ["tiny"], **TINY}
    )
    report = run_job(spec, settings, log=lambda _: None)

    assert report["status"] == "done"
    stages = {s["stage"]: s for s in report["stages"]}
    assert all(s["status"] == "done" for s in stages.values())
    assert set(stages) >= {"ingest", "dedup", "embed", "cluster", "retrieve", "curated"}

    kept = {r["image_id"] for r in rows(catalog, "p", "dedup", ["image_id", "keep"]) if r["keep"]}
    embedded = rows(catalog, "p", "embed", ["image_id", "embedding"])
    assert sorted(r["image_id"] for r in embedded) == sorted(kept)  # each kept image once
    assert len(kept) == 30  # the exact copy went at dedup
    clustered = rows(catalog, "p", "cluster", ["image_id", "cluster_id"])
    assert sorted(r["image_id"] for r in clustered) == sorted(kept)
    assert {r["cluster_id"] for r in clustered} <= set(range(4))

    retrieved = rows(catalog, "p", "retrieve", ["seed_set", "seed_id", "image_id", "method"])
    by_method: dict[str, list[dict]] = {}
    for r in retrieved:
        by_method.setdefault(r["method"], []).append(r)
    seeds = len(list((tmp_path / "seeds").iterdir()))
    assert len(by_method["as-is"]) == seeds
    assert len(by_method["knn"]) == seeds * 2
    assert {r["image_id"] for r in by_method["knn"]} <= kept
    assert 0 < len({r["image_id"] for r in by_method["balanced"]}) <= 5
    assert {r["image_id"] for r in by_method.get("cluster", [])} <= kept

    curated_paths = catalog.shard_paths("p", "curated")
    table = pq.read_table(curated_paths)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len({r["image_id"] for r in retrieved})
    for image, image_id in zip(table.column("image").to_pylist(), ids, strict=True):
        assert hashlib.sha256(image["bytes"]).hexdigest() == image_id
    assert pc.sum(table.column("matches")).as_py() == len(retrieved)

    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in curated_paths], split="train"
    )
    assert loaded[0]["image"].size[0] > 0 and len(loaded) == len(ids)
    job_dir = settings.job_dir("p")
    assert (job_dir / "README.md").exists() and (job_dir / "stats.json").exists()

    # Re-running a finished job does nothing and changes nothing.
    again = run_job(spec, settings, log=lambda _: None)
    assert [s["parts_done"] for s in again["stages"]] == [s["parts_done"] for s in report["stages"]]


def test_sigkill_inside_embed_then_resume_embeds_each_image_once(ray_local, settings, tmp_path):
    write_corpus(tmp_path, 48)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "ingest": {"shard_size": 2}}))
    args = ["run", "--source", str(tmp_path / "crawl"), "--job", "k", "--recipe", str(recipe)]
    run_killed([*args, "--until", "embed"], settings.data_root, "embed", after=5)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    done_at_kill = len(catalog.committed_parts("k", "embed"))
    assert done_at_kill == 5
    # The sixth shard (and any other part in flight) is in place, unregistered, at the kill.
    assert len(list((settings.job_dir("k") / "embed").glob("part-*.parquet"))) > 5

    spec = parse_job_spec(
        {
            "source": str(tmp_path / "crawl"),
            "job_id": "k",
            "until": "embed",
            **TINY,
            "ingest": {"shard_size": 2},
        }
    )
    report = run_job(spec, settings, log=lambda _: None)
    assert report["status"] == "done"
    kept = sorted(
        r["image_id"] for r in rows(catalog, "k", "dedup", ["image_id", "keep"]) if r["keep"]
    )
    embedded = sorted(r["image_id"] for r in rows(catalog, "k", "embed", ["image_id"]))
    assert embedded == kept and len(kept) == 48
    stage = next(s for s in report["stages"] if s["stage"] == "embed")
    assert stage["parts_done"] == stage["parts_total"] == 25


def test_a_crawl_with_nothing_to_cluster_fails_with_a_message(ray_local, settings, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"<html>")
    spec = parse_job_spec(
        {"source": str(tmp_path / "src"), "job_id": "e", "until": "cluster", **TINY}
    )
    with pytest.raises(StageFailed, match="cluster failed: .*no embeddings"):
        run_job(spec, settings, log=lambda _: None)
    report = Catalog(settings.catalog_file, settings.data_root).job_report("e")
    assert report["status"] == "failed"
    assert next(s for s in report["stages"] if s["stage"] == "embed")["status"] == "done"
