"""A job on a real multi-node Ray cluster (tests/cluster.py: a head with no CPU and two worker
nodes, each its own `ray start` through docker/entrypoint.sh): every parallel stage runs parts
on both workers (the catalog records each part's node), the rows are those of a single-machine
run, a worker node killed mid-stage costs nothing, and the service submits its drivers through
Ray's job API."""

import json
import subprocess
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from curate.catalog import Catalog
from curate.settings import Settings
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.cluster import ENTRYPOINT, curate_on
from tests.integration.test_pipeline import TINY, write_corpus
from tests.ports import free_port
from tests.service import run_to_end, wait_for_api

POLICY = "as-is+knn:2+cluster:3+balanced:5"
PARALLEL = ("ingest", "dedup_features", "dedup", "embed", "cluster", "retrieve")
# What each stage's rows are compared by (the curated stage holds image bytes: ids suffice).
ROW_KEYS = {
    "ingest": ["image_id", "part", "item"],
    "dedup": ["image_id", "reason", "duplicate_of"],
    "embed": ["image_id", "embedding"],
    "cluster": ["image_id", "cluster_id"],
    "retrieve": ["image_id", "seed_set", "method", "seed_id"],
    "curated": ["image_id"],
}

# A driver whose chosen stage part kills its own node: the worker running it (or loading it,
# for a stage with a load step) SIGKILLs the process group of its raylet (the node's `ray
# start`, raylet and every worker), once: the marker file makes the retry on another node live.
NODE_KILLER = """
import os, signal, sys
from pathlib import Path

import ray
import pipelines.registry as registry
from services.cli.main import main

STAGE, PART = os.environ["NODE_KILL_STAGE"], int(os.environ["NODE_KILL_PART"])
MARKER = Path(os.environ["NODE_KILL_MARKER"])


def kill_this_node():
    try:
        with MARKER.open("x") as marker:
            marker.write(ray.get_runtime_context().get_node_id())
    except FileExistsError:
        return
    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)


def killing(stage):
    base = type(stage)

    def run_part(self, state, part):
        if not self.loads_parts and part.index == PART:
            kill_this_node()
        return base.run_part(self, state, part)

    def load_part(self, inputs, part):
        if part.index == PART:
            kill_this_node()
        return base.load_part(self, inputs, part)

    cls = type("Killing" + base.__name__, (base,), {"run_part": run_part, "load_part": load_part})
    clone = object.__new__(cls)
    clone.__dict__.update(vars(stage))
    return clone


load_stage = registry.load_stage
registry.load_stage = lambda name: killing(load_stage(name)) if name == STAGE else load_stage(name)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode-corpus")
    write_corpus(root, 30)
    return root


def _spec(corpus: Path, job_id: str) -> dict:
    return {"source": str(corpus / "crawl"), "job_id": job_id, "seeds": ["tiny"], **TINY}


def _spec_file(corpus: Path, job_id: str, folder: Path) -> Path:
    path = folder / f"{job_id}.yaml"
    path.write_text(yaml.safe_dump(_spec(corpus, job_id)))
    return path


@pytest.fixture(scope="module")
def local_rows(ray_local, corpus, tmp_path_factory) -> dict:
    """The rows of every stage of the job run on one machine (the test session's local Ray)."""
    root = tmp_path_factory.mktemp("multinode-local")
    settings = Settings(data_root=root, progress=False, allow_private_networks=True)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    catalog.add_seed_set("tiny", str(corpus / "seeds"), POLICY, None)
    report = run_job(parse_job_spec(_spec(corpus, "local")), settings, log=lambda _: None)
    assert report["status"] == "done"
    return _rows(catalog, "local")


def _rows(catalog: Catalog, job: str) -> dict[str, list[tuple]]:
    """Every stage's rows as sorted tuples: a row lost or written twice changes them."""
    out = {}
    for stage, keys in ROW_KEYS.items():
        rows = [
            tuple(json.dumps(v) if isinstance(v, list) else v for v in row.values())
            for path in catalog.shard_paths(job, stage)
            for row in pq.read_table(path, columns=keys).to_pylist()
        ]
        out[stage] = sorted(rows, key=repr)
    return out


def _nodes(catalog: Catalog, job: str) -> dict[str, set[str]]:
    with catalog._transaction() as con:
        rows = con.execute("SELECT stage, node FROM parts WHERE job_id = ?", [job]).fetchall()
    nodes: dict[str, set[str]] = {}
    for stage, node in rows:
        nodes.setdefault(stage, set()).add(node)
    return nodes


@pytest.fixture(scope="module")
def data_root(ray_cluster, corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode-data")
    curate_on(
        ray_cluster,
        "seeds",
        "add",
        "tiny",
        str(corpus / "seeds"),
        "--policy",
        POLICY,
        data_root=root,
    )
    return root


def test_every_parallel_stage_runs_on_every_worker_with_the_rows_of_one_machine(
    ray_cluster,
    corpus,
    data_root,
    local_rows,
):
    spec = _spec_file(corpus, "mn", data_root)
    curate_on(ray_cluster, "run", "--spec-file", str(spec), data_root=data_root)
    catalog = Catalog(data_root / "catalog.duckdb", data_root)
    workers = {ray_cluster.nodes[n].node_id for n in ("node_a", "node_b")}
    nodes = _nodes(catalog, "mn")
    for stage in PARALLEL:
        assert nodes[stage] == workers, (stage, nodes[stage], workers)
    assert _rows(catalog, "mn") == local_rows


@pytest.mark.parametrize(("stage", "part"), [("ingest", 2), ("embed", 3), ("retrieve", 1)])
def test_a_worker_node_killed_mid_stage_loses_nothing(
    ray_cluster,
    corpus,
    data_root,
    local_rows,
    stage,
    part,
):
    job = f"kill-{stage}"
    marker = data_root / f"{job}.killed"
    spec = _spec_file(corpus, job, data_root)
    run = curate_on(
        ray_cluster,
        "run",
        "--spec-file",
        str(spec),
        data_root=data_root,
        script=NODE_KILLER,
        NODE_KILL_STAGE=stage,
        NODE_KILL_PART=str(part),
        NODE_KILL_MARKER=str(marker),
    )
    assert marker.is_file(), run.stderr[-3000:]
    victim = ray_cluster.node_of(marker.read_text())
    assert ray_cluster.nodes[victim].process.wait(timeout=60) != 0  # the node is gone
    ray_cluster.forget(victim)
    try:
        catalog = Catalog(data_root / "catalog.duckdb", data_root)
        assert _rows(catalog, job) == local_rows
    finally:
        ray_cluster.add_worker(victim)  # the next test gets two workers again


def test_the_service_submits_jobs_to_the_cluster_through_ray_job_api(
    ray_cluster, corpus, object_store, tmp_path
):
    """`docker/entrypoint.sh api` as a deployment runs it, its CURATE_RAY_ADDRESS the head's
    job API, its data root an object store: the driver is a Ray job, the job's parts run on the
    worker nodes, and every shard they write is an object of the store."""
    catalog_file = tmp_path / "catalog.duckdb"
    port = free_port()
    env = {
        **ray_cluster.env,
        "CURATE_DATA_ROOT": object_store.uri("cluster"),
        "CURATE_CATALOG_PATH": str(catalog_file),
        "CURATE_CACHE_DIR": str(tmp_path / "api-mirror"),
        "CURATE_RAY_ADDRESS": ray_cluster.dashboard,
        "CURATE_SOURCE_ROOTS": str(corpus),
        "CURATE_API_HOST": "127.0.0.1",
        "CURATE_API_PORT": str(port),
        "CURATE_ALLOW_PRIVATE_NETWORKS": "1",
    }
    settings = Settings(
        data_root=object_store.uri("cluster"),
        catalog_path=catalog_file,
        cache_dir=tmp_path / "test-mirror",
        progress=False,
    )
    catalog = Catalog(settings.catalog_file, settings.root)
    catalog.add_seed_set("tiny", str(corpus / "seeds"), POLICY, None)
    with open(tmp_path / "api.log", "wb") as log:
        api = subprocess.Popen(
            [str(ENTRYPOINT), "api", "--no-auth"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_for_api(client, api, tmp_path / "api.log")
            created = client.post("/v1/jobs", json=_spec(corpus, "via-api"))
            assert created.status_code == 201, created.text
            events = run_to_end(client, "via-api")
            job = client.get("/v1/jobs/via-api").json()
            assert job["status"] == "done", (events[-1], client.get("/v1/jobs/via-api/log").text)
    finally:
        api.terminate()
        api.wait(timeout=60)
    driver = catalog.job_driver("via-api")
    assert driver["kind"] == "ray" and driver["ref"].startswith("curate-via-api-")
    workers = {ray_cluster.nodes[n].node_id for n in ("node_a", "node_b")}
    nodes = _nodes(catalog, "via-api")
    assert all(nodes[stage] == workers for stage in PARALLEL), nodes
    objects = object_store.objects("cluster")
    for shard in catalog.registered_shards("via-api"):
        assert objects.get(shard["path"]) == shard["bytes"], shard["path"]
