"""Shards on an object store: a whole job with CURATE_DATA_ROOT=s3://... against a real
S3-compatible server on 127.0.0.1 (moto), then read back with no local copy left anywhere: the
integrity check, a run that redoes a shard deleted from the store, and the service's results,
originals and thumbnails."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from PIL import Image

from curate.catalog import Catalog
from curate.core import storage
from curate.settings import Settings
from tests.cli import run_curate
from tests.integration.test_pipeline import TINY, write_corpus
from tests.object_store import ObjectStore
from tests.ports import free_port
from tests.service import wait_for_api

PREFIX = "lvd"


def curated_ids(catalog: Catalog, job: str) -> list[str]:
    table = storage.read_table(catalog.shard_paths(job, "curated"), ["image_id"])
    return sorted(table.column("image_id").to_pylist())


def test_a_job_lives_in_the_object_store(object_store: ObjectStore, tmp_path: Path):
    write_corpus(tmp_path, 18)
    base = {
        **os.environ,
        **object_store.env,
        "CURATE_DATA_ROOT": object_store.uri(PREFIX),
        "CURATE_CATALOG_PATH": str(tmp_path / "catalog.duckdb"),
        "CURATE_PROGRESS": "0",
    }

    def on_node(mirror: str) -> dict[str, str]:
        """A process with a mirror of its own: nothing local is shared between them."""
        return {**base, "CURATE_CACHE_DIR": str(tmp_path / mirror)}

    policy = "as-is+knn:2+cluster:3+balanced:5"
    run_curate(
        "seeds", "add", "tiny", str(tmp_path / "seeds"), "--policy", policy, env=on_node("a")
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"source": str(tmp_path / "crawl"), "job_id": "s3", "seeds": ["tiny"], **TINY}
        )
    )
    run_curate("run", "--spec-file", str(spec), env=on_node("a"))

    settings = Settings(
        data_root=object_store.uri(PREFIX),
        catalog_path=tmp_path / "catalog.duckdb",
        cache_dir=tmp_path / "test",
        progress=False,
    )
    catalog = Catalog(settings.catalog_file, settings.root)
    assert catalog.job_report("s3")["status"] == "done"
    # Every registered shard is an object of its registered size; the catalog, not a listing,
    # says what exists, and no temporary object was ever left behind.
    objects = object_store.objects(PREFIX)
    shards = catalog.registered_shards("s3")
    assert {s["stage"] for s in shards} >= {"ingest", "dedup", "embed", "retrieve", "curated"}
    for shard in shards:
        assert objects.get(shard["path"]) == shard["bytes"], shard["path"]
    assert not [key for key in objects if key.endswith(".tmp")]
    written_whole = {"README.md", "stats.json", "cluster/centroids.npy"}
    written_whole |= {"retrieve/index/crawl_index.json", "retrieve/index/crawl-00000.index"}
    assert {f"jobs/s3/{name}" for name in written_whole} <= set(objects)
    assert any(key.startswith("seed_sets/tiny/") for key in objects)
    first = curated_ids(catalog, "s3")
    assert len(first) >= 6

    # The mirror that wrote everything is gone: from here on every read comes from the store.
    shutil.rmtree(tmp_path / "a")
    run_curate("jobs", "verify", "s3", env=on_node("b"))  # every byte re-read from the store
    embed = next(s for s in shards if s["stage"] == "embed" and s["kind"] == "data")
    object_store.fs.delete_file(f"{object_store.bucket}/{PREFIX}/{embed['path']}")
    damaged = run_curate("jobs", "verify", "s3", env=on_node("b"), code=1)
    assert embed["path"] in damaged.stdout + damaged.stderr
    run_curate("run", "--spec-file", str(spec), env=on_node("c"))
    assert catalog.job_report("s3")["status"] == "done"
    assert object_store.objects(PREFIX).get(embed["path"]) == embed["bytes"]
    assert curated_ids(catalog, "s3") == first
    # SQL over the job's views: its shards come into this node's mirror first.
    counted = run_curate(
        "sql", 'SELECT count(*) AS n FROM "s3".curated', "--json", env=on_node("e")
    )
    assert json.loads(counted.stdout) == [{"n": len(first)}]

    # The service, on a node with an empty mirror: results, originals and thumbnails.
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "serve", "--port", str(port), "--no-auth"],
        env=on_node("d"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_for_api(client, server)
            assert client.get("/v1/jobs/s3").json()["status"] == "done"
            clusters = client.get("/v1/jobs/s3/clusters")
            assert clusters.status_code == 200 and clusters.json()["items"]
            image_id = first[0]
            original = client.get(f"/v1/images/{image_id}")
            assert original.status_code == 200
            assert hashlib.sha256(original.content).hexdigest() == image_id
            thumb = client.get(f"/v1/images/{image_id}/thumb")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
            assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    finally:
        server.terminate()
        server.wait(timeout=30)
    # Thumbnails are the serving node's cache, never objects of the store.
    assert list((tmp_path / "d").rglob(f"{image_id}.jpg"))
    assert not [key for key in object_store.objects(PREFIX) if "thumbs" in key]
