"""The REST service under load: 32 concurrent clients against a real `curate serve` (uvicorn) on
127.0.0.1, browsing a finished job of 100,000 images (bench/service_job.py: synthetic embeddings,
real JPEG bytes).

Measured, each for at most REQUESTS requests or SECONDS seconds: the cluster list (pages of 50,
by size or seed coverage), a cluster page (100 members, at any page of 20 clusters), a seed's
neighbours, cold thumbnails (never made: each image once), warm thumbnails (made already), and
the job status. Then all of it again while another process commits a part to the same catalog
every COMMIT_EVERY_S seconds (a job at work: a shard written, a catalog transaction). Reported:
p50/p95/p99 latency, throughput and errors (any status but 200, or no answer), and the server
process's CPU time a request with the machine's load average (on a shared machine, latency says
as much about the other processes as about the service; CPU a request far less). Targets:
cluster list and cluster page p95 <= 100 ms, warm thumbnails >= 500/s, cold >= 100/s, zero
errors.

The job's browse index (curate/browse) is built once: by the service in the background when it
starts and finds the job ended (services/api/warm.py), before the phases are measured. Reported
apart, not in the percentiles: how long after the start it was ready and what the first requests
then took (`index_warm`), and what the first requests take when they build it themselves, with
warming off (`index_build_s`: the lazy path, a server of its own).

Writes bench/results/service.json and bench/results/service.md.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from measuring import code_line, code_version, met
from service_job import JOB, SEED_SET, build_job

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "service"
RESULTS = BENCH / "results"
CLIENTS = 32
REQUESTS = 3000
SECONDS = 30.0
COLD = 2000  # distinct images per cold-thumbnail run
COMMIT_EVERY_S = 0.2
TARGETS = {"list_p95_ms": 100, "page_p95_ms": 100, "warm_per_s": 500, "cold_per_s": 100}
MEASURED = (
    "curate/browse/store.py",
    "curate/browse/queries.py",
    "curate/browse/pages.py",
    "curate/browse/thumbs.py",
    "services/api/results.py",
    "services/api/images.py",
    "services/api/auth.py",
    "services/api/jobs.py",
    "services/api/manager.py",
    "services/api/warm.py",
    "curate/catalog_cache.py",
)


def _env(data_root: Path) -> dict[str, str]:
    return {**os.environ, "CURATE_DATA_ROOT": str(data_root), "CURATE_PROGRESS": "0"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    data_root: Path, port: int, auth: bool = True, warm: bool = True
) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "serve", "--port", str(port)]
        + ([] if auth else ["--no-auth"]),
        cwd=REPO,
        env={
            **_env(data_root),
            "CURATE_HOST": "127.0.0.1",
            "CURATE_THUMB_DIR": str(WORK / "thumbs"),
            "CURATE_WARM_INDEXES": "true" if warm else "false",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
        if server.poll() is not None:
            raise RuntimeError(f"curate serve exited: {server.stderr.read()[-2000:]}")
    server.kill()
    raise RuntimeError("curate serve did not answer within 60 s")


# -- a job committing parts -------------------------------------------------------------------


def commit_parts(data_root: Path, every_s: float) -> None:
    """Another job at work: an ingest part (100 real JPEGs) written and committed to the catalog
    every `every_s` seconds, until killed."""
    import hashlib

    import pyarrow as pa
    from service_job import photo, tagged

    from curate.catalog import Catalog
    from curate.core.shards import PartResult, shard_name, write_shard
    from schemas.job import parse_job_spec
    from schemas.shards import INGEST

    catalog = Catalog(data_root / "catalog.duckdb", data_root)
    job = f"writer-{os.getpid()}"
    catalog.open_job(parse_job_spec({"job_id": job, "source": "/bench/writer"}))
    catalog.set_job_status(job, "running")
    catalog.start_stage(job, "ingest", None)
    base = photo(12345)
    part = 0
    while True:
        started = time.monotonic()
        blobs = [tagged(base, f"writer {part} {i}") for i in range(100)]
        rows = [
            {
                "image_id": hashlib.sha256(b).hexdigest(),
                "uri": f"/bench/writer/{part}/{i}.jpg",
                "image": {"bytes": b, "path": f"{i}.jpg"},
                "width": 512,
                "height": 384,
                "format": "JPEG",
                "mode": "RGB",
                "resized": False,
                "part": part,
                "item": i,
                "metadata": "{}",
            }
            for i, b in enumerate(blobs)
        ]
        table = pa.Table.from_pylist(rows, schema=INGEST)
        info = write_shard(table, data_root / "jobs" / job / "ingest" / shard_name(part))
        catalog.commit_part(job, "ingest", PartResult(part, 100, 100, {"data": info}))
        part += 1
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))


def _forget_writers(catalog, data_root: Path) -> None:
    """The committing jobs of a run, gone from the catalog and the disk."""
    for job in catalog.list_jobs():
        job_id = job["job_id"]
        if job_id.startswith("writer-"):
            catalog.set_job_status(job_id, "cancelled")
            catalog.delete_job(job_id)
            shutil.rmtree(data_root / "jobs" / job_id, ignore_errors=True)


# -- load --------------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: what a request costs the server,
    which other work on the machine changes far less than it changes latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: subprocess.Popen, base: str, token: str, urls: list[str]) -> dict:
    """One row: `_load`, with the server's CPU a request and the machine's load average (1 min)
    at its end (other processes on the machine show there)."""
    before = _cpu_s(server.pid)
    row = asyncio.run(_load(base, token, urls, SECONDS))
    row["server_cpu_ms"] = round((_cpu_s(server.pid) - before) / row["requests"] * 1000, 2)
    row["load_1min"] = round(os.getloadavg()[0], 1)
    return row


async def _load(base: str, token: str, urls: list[str], seconds: float) -> dict:
    """Send `urls` from CLIENTS concurrent clients; stop early after `seconds`.

    Each client has its own connection (an AsyncClient of its own): one pool shared by 32
    clients costs ~3.6 ms of client CPU a request here, which would measure httpx, not the
    service."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue = list(reversed(urls))
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
            while queue and time.monotonic() < deadline:
                url = queue.pop()
                sent = time.perf_counter()
                try:
                    response = await http.get(url)
                    if response.status_code != 200:
                        key = f"HTTP {response.status_code}"
                        errors[key] = errors.get(key, 0) + 1
                except httpx.HTTPError as error:
                    errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def _pages(http: httpx.Client, url: str, **params) -> list[str]:
    """Every page URL of a listing, walked with its cursors."""
    urls, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page_url = str(httpx.URL(url, params=query))
        urls.append(page_url)
        response = http.get(page_url)
        response.raise_for_status()
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return urls


def scenarios(http: httpx.Client, facts: dict, cold: list[str], rng: random.Random) -> dict:
    """The URL list of every measured kind of request."""
    jobs = f"/v1/jobs/{JOB}"
    lists = [
        url
        for sort in ("size", "seed_coverage")
        for url in _pages(http, f"{jobs}/clusters", sort=sort, limit=50)
    ]
    clusters = rng.sample(range(facts["clusters"]), 20)
    pages = [u for c in clusters for u in _pages(http, f"{jobs}/clusters/{c}/members", limit=100)]
    seeds = [f"{jobs}/seeds/{SEED_SET}/{s}/neighbours" for s in facts["seed_ids"]]
    warm = [f"/v1/images/{i}/thumb" for i in cold]
    return {
        "cluster list": [rng.choice(lists) for _ in range(REQUESTS)],
        "cluster page": [rng.choice(pages) for _ in range(REQUESTS)],
        "seed neighbours": [rng.choice(seeds) for _ in range(REQUESTS)],
        "cold thumbnails": [f"/v1/images/{i}/thumb" for i in cold],
        "warm thumbnails": [rng.choice(warm) for _ in range(2 * REQUESTS)],
        "job status": [jobs] * REQUESTS,
    }


# -- the browse index: built by the first requests, or ahead of them --------------------------


def _first_requests(http: httpx.Client, image_id: str) -> dict:
    """Seconds the first results request and the first image request take."""
    first = {}
    for kind, url in (
        ("results", f"/v1/jobs/{JOB}/clusters"),
        ("locations", f"/v1/images/{image_id}"),
    ):
        sent = time.perf_counter()
        http.get(url).raise_for_status()
        first[kind] = round(time.perf_counter() - sent, 2)
    return first


def _lazy_build(data_root: Path, token: str, image_id: str) -> dict:
    """The first requests on a server with warming off: they build the index themselves."""
    shutil.rmtree(data_root / "jobs" / JOB / "browse", ignore_errors=True)
    port = _free_port()
    server = start_server(data_root, port, warm=False)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=600,
        ) as http:
            return _first_requests(http, image_id)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_warm(data_root: Path, parts: int, started: float) -> float:
    """Seconds from `started` until the service has published the job's results index and a
    location index per ingest part (it warms them in the background when it starts)."""
    browse = data_root / "jobs" / JOB / "browse"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(browse.glob("results-*/meta.json")) and (
            len(list(browse.glob("locations/crawl-*.parquet"))) >= parts
        ):
            return round(time.perf_counter() - started, 2)
        time.sleep(0.05)
    raise RuntimeError("the service did not build the browse index within 600 s")


def run(images: int) -> dict:
    data_root = WORK / "data"
    started = time.perf_counter()
    facts = build_job(data_root, images=images)
    build_s = time.perf_counter() - started
    from curate.catalog import Catalog

    catalog = Catalog(data_root / "catalog.duckdb", data_root)
    token = catalog.create_token("read", "bench")[1]
    _forget_writers(catalog, data_root)
    parts = len(catalog.shard_paths(JOB, "ingest"))
    shutil.rmtree(WORK / "thumbs", ignore_errors=True)
    rng = random.Random(0)
    cold_ids = rng.sample(facts["image_ids"], 2 * COLD)
    result: dict = {"job": {k: facts[k] for k in ("images", "kept", "clusters", "seeds")}}
    result["job"]["build_s"] = round(build_s, 1)
    result["index_build_s"] = _lazy_build(data_root, token, facts["image_ids"][0])
    shutil.rmtree(WORK / "thumbs", ignore_errors=True)
    shutil.rmtree(data_root / "jobs" / JOB / "browse", ignore_errors=True)
    port = _free_port()
    started = time.perf_counter()
    server = start_server(data_root, port)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600
        ) as http:
            ready = _wait_warm(data_root, parts, started)
            result["index_warm"] = {
                "ready_after_start_s": ready,
                **_first_requests(http, facts["image_ids"][1]),
            }
            for phase, cold in (("idle", cold_ids[:COLD]), ("committing", cold_ids[COLD:])):
                writer = None
                if phase == "committing":
                    writer = subprocess.Popen(
                        [sys.executable, __file__, "--commit-parts", str(data_root)],
                        cwd=REPO,
                        env=_env(data_root),
                    )
                try:
                    urls = scenarios(http, facts, cold, rng)
                    result[phase] = {}
                    for name, batch in urls.items():
                        result[phase][name] = measure(server, base, token, batch)
                        print(phase, name, result[phase][name], flush=True)
                finally:
                    if writer is not None:
                        writer.kill()
                        writer.wait()
                        _forget_writers(catalog, data_root)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result["committing, no tokens"] = _without_tokens(data_root, facts, rng)
    return result


def _without_tokens(data_root: Path, facts: dict, rng: random.Random) -> dict:
    """A diagnosis, not a target: the committing phase again for the three targeted requests
    with `curate serve --no-auth`, which shows what token checks cost while the catalog changes
    (the service's token cache is keyed by a tokens stamp that only creating or revoking a token
    changes, so a committing job should cost the token check nothing)."""
    port = _free_port()
    server = start_server(data_root, port, auth=False)
    base = f"http://127.0.0.1:{port}"
    writer = subprocess.Popen(
        [sys.executable, __file__, "--commit-parts", str(data_root)], cwd=REPO, env=_env(data_root)
    )
    rows = {}
    try:
        made = [path.stem for path in sorted((WORK / "thumbs").rglob("*.jpg"))]
        with httpx.Client(base_url=base, timeout=600) as http:
            urls = scenarios(http, facts, made, rng)  # thumbnails made already: warm
        for name in ("cluster list", "cluster page", "warm thumbnails"):
            rows[name] = measure(server, base, "", urls[name])
            print("committing, no tokens", name, rows[name], flush=True)
    finally:
        writer.kill()
        writer.wait()
        server.terminate()
        server.wait(timeout=30)
        from curate.catalog import Catalog

        _forget_writers(Catalog(data_root / "catalog.duckdb", data_root), data_root)
    return rows


def report(result: dict) -> list[str]:
    lines = [
        "# Service benchmark",
        "",
        f"`python bench/service.py`: {CLIENTS} concurrent clients (httpx async, one process, a "
        "connection each) "
        "against `curate serve` (uvicorn, one process, tokens on) on 127.0.0.1, browsing a "
        "finished job of "
        f"{result['job']['images']:,} images ({result['job']['kept']:,} kept, "
        f"{result['job']['clusters']} clusters, {result['job']['seeds']:,} seed images) built as "
        "registered shards by bench/service_job.py: synthetic embeddings; real 512x384 JPEG bytes "
        "(1,000 distinct photos, each image one of them with its own JPEG comment, so its own "
        "bytes and id). Each row: at most "
        f"{REQUESTS:,} requests ({COLD:,} distinct images for cold thumbnails, "
        f"{2 * REQUESTS:,} for warm) or {SECONDS:.0f} s. `committing`: another process commits "
        f"a part to the same catalog every {COMMIT_EVERY_S} s meanwhile. "
        f"Machine: {result['machine']}.",
        "",
        f"The job's browse index, built by the service in the background when it started "
        f"(services/api/warm.py): ready {result['index_warm']['ready_after_start_s']} s after "
        f"the server process was started; the first results request then took "
        f"{result['index_warm']['results']} s and the first image "
        f"{result['index_warm']['locations']} s. With warming off "
        f"(CURATE_WARM_INDEXES=false, a server of its own) the first requests build it: "
        f"results {result['index_build_s']['results']} s, image locations "
        f"{result['index_build_s']['locations']} s. None of these is in the rows below.",
        "",
        "`server CPU ms`: the server process's CPU time per request, which other work on "
        "the machine disturbs far less than latency; `load`: the machine's 1-minute load "
        "average at the row's end (2 cores: above ~3, other processes compete with the "
        "bench and its server).",
        "",
        "| phase | request | requests | per s | p50 ms | p95 ms | p99 ms | errors "
        "| server CPU ms | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in ("idle", "committing", "committing, no tokens"):
        for name, row in result[phase].items():
            lines.append(
                f"| {phase} | {name} | {row['requests']:,} | {row['per_s']:,} | {row['p50_ms']} | "
                f"{row['p95_ms']} | {row['p99_ms']} | {row['errors']} | "
                f"{row.get('server_cpu_ms', '')} | {row.get('load_1min', '')} |"
            )
    lines += [
        "",
        "`committing, no tokens` is a diagnosis, not a target: the same server with "
        "`--no-auth`, to see what token checks cost while a job commits. The token cache "
        "(services/api/auth.py) is keyed by a tokens stamp that only creating or revoking a "
        "token changes: parts committed by a job do not empty it.",
        "",
        "| target | idle | committing |",
        "|---|---|---|",
    ]
    for label, check in result["targets"].items():
        lines.append(f"| {label} | {met(check['idle'])} | {met(check['committing'])} |")
    lines += ["", code_line(result["code"])]
    return lines


def targets(result: dict) -> dict:
    checks = {
        "cluster list p95 <= 100 ms": lambda p: (
            p["cluster list"]["p95_ms"] <= TARGETS["list_p95_ms"]
        ),
        "cluster page p95 <= 100 ms": lambda p: (
            p["cluster page"]["p95_ms"] <= TARGETS["page_p95_ms"]
        ),
        "warm thumbnails >= 500/s": lambda p: (
            p["warm thumbnails"]["per_s"] >= TARGETS["warm_per_s"]
        ),
        "cold thumbnails >= 100/s": lambda p: (
            p["cold thumbnails"]["per_s"] >= TARGETS["cold_per_s"]
        ),
        "zero errors": lambda p: all(row["errors"] == 0 for row in p.values()),
    }
    return {
        label: {phase: check(result[phase]) for phase in ("idle", "committing")}
        for label, check in checks.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--commit-parts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.commit_parts:
        commit_parts(args.commit_parts, COMMIT_EVERY_S)
        return
    code = code_version(MEASURED)
    result = run(args.images)
    cpu = platform.processor() or platform.machine()
    result["machine"] = f"{os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()}"
    result["code"] = code
    result["targets"] = targets(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "service.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "service.md").write_text("\n".join(report(result)) + "\n")
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
