"""The service's test harness, shared by the API and UI tests (tests/integration/conftest.py
registers its fixtures once): a real uvicorn on 127.0.0.1
serving `create_app` over a real DuckDB catalog in one data root per session, tokens, an httpx
client, and one finished demo job run by a real driver process (local Ray) through the API.

    def test_clusters(client, demo_job):
        page = client.get(f"/v1/jobs/{demo_job['job_id']}/clusters").json()

`api_server.sources` is the folder HTTP jobs may read (CURATE_SOURCE_ROOTS); `serve(...)` starts
another server (other settings, another data root) for a test of its own.
"""

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from curate.demo import generate_demo
from curate.settings import CrawlSettings, Settings
from services.api.app import create_app
from services.api.settings import ServiceSettings
from tests.cli import run_curate

DEMO_COUNT = 120
DEMO_POLICY = "as-is+knn:4+cluster:25+balanced:200"
DEMO_JOB = "demo"


@dataclass
class ApiServer:
    url: str
    settings: Settings
    service: ServiceSettings
    app: Any
    sources: Path | None = None
    demo_events: list["Event"] = field(default_factory=list)

    @property
    def catalog(self):
        return self.app.state.catalog

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@contextmanager
def serve(settings: Settings, service: ServiceSettings) -> Iterator[ApiServer]:
    """create_app under a real uvicorn in a thread, on a free port of 127.0.0.1."""
    app = create_app(settings, service)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield ApiServer(f"http://127.0.0.1:{port}", settings, service, app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        _kill_drivers(app)


def _kill_drivers(app: Any) -> None:
    """Drivers the tests left running (a failed test) die with the session, Ray and all."""
    for driver in app.state.catalog.active_drivers():
        if driver["kind"] == "process" and driver["ref"]:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(int(driver["ref"].split(":")[0]), signal.SIGKILL)


def curate_cli(*args: str, data_root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The `curate` command on the tests' data root."""
    env = {**os.environ, "CURATE_DATA_ROOT": str(data_root), "CURATE_PROGRESS": "0"}
    return run_curate(*args, env=env, code=0 if check else None, timeout=120)


def wait_for_api(client: httpx.Client, server: subprocess.Popen, log: Path | None = None) -> None:
    """Until a service started as a process answers (a bounded wait for it to start, not a
    timing under test); fails at once, with its log, if it exits."""

    def said() -> str:
        return log.read_text()[-3000:] if log is not None else "(no log)"

    for _ in range(240):
        assert server.poll() is None, f"the service exited: {said()}"
        try:
            if client.get("/v1/jobs").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the service did not start: {said()}")


# -- server-sent events ---------------------------------------------------------------------------


@dataclass
class Event:
    event: str
    id: int | None
    data: Any


def follow_events(
    client: httpx.Client, job_id: str, last_event_id: int | None = None
) -> Iterator[Event]:
    """The job's event stream, parsed; ends with the stream (after `end`)."""
    import json

    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    timeout = httpx.Timeout(30, read=300)
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if "event" in fields:
                    ident = int(fields["id"]) if "id" in fields else None
                    yield Event(fields["event"], ident, json.loads(fields.get("data", "null")))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value


def run_to_end(client: httpx.Client, job_id: str) -> list[Event]:
    """Every event of the job until its end."""
    events = list(follow_events(client, job_id))
    assert events and events[-1].event == "end", [e.event for e in events]
    return events


def driver_log(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/v1/jobs/{job_id}/log").text[-4000:]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def api_server(tmp_path_factory) -> Iterator[ApiServer]:
    base = tmp_path_factory.mktemp("service")
    sources = base / "sources"
    sources.mkdir()
    settings = Settings(
        data_root=base / "data",
        num_cpus=2,
        progress=False,
        allow_private_networks=True,
        # URL sources in these tests answer when the test says so, never by a timeout.
        crawl=CrawlSettings(timeout_s=600, connect_timeout_s=60, retries=0),
    )
    service = ServiceSettings(port=0, source_roots=[sources], heartbeat_s=1.0, cancel_grace_s=120)
    with serve(settings, service) as server:
        server.sources = sources
        yield server


@pytest.fixture(scope="session")
def write_token(api_server) -> str:
    return api_server.catalog.create_token("write", "tests")[1]


@pytest.fixture(scope="session")
def read_token(api_server) -> str:
    return api_server.catalog.create_token("read", "tests (read)")[1]


@pytest.fixture(scope="session")
def client(api_server, write_token) -> Iterator[httpx.Client]:
    with api_server.client(write_token) as session:
        yield session


@pytest.fixture(scope="session")
def demo_corpus(api_server) -> Path:
    """The demo corpus (DEMO_COUNT files) under the sources root, its seed set registered."""
    corpus = api_server.sources / "demo"
    generate_demo(corpus, count=DEMO_COUNT)
    curate_cli(
        "seeds",
        "add",
        "demo",
        str(corpus / "seeds" / "demo"),
        "--policy",
        DEMO_POLICY,
        data_root=api_server.settings.data_root,
    )
    return corpus


@pytest.fixture(scope="session")
def demo_job(api_server, client, demo_corpus) -> dict[str, Any]:
    """The demo job submitted over HTTP and followed to its end: its final JobDetail.
    Its events are in api_server.demo_events."""
    body = {
        "job_id": DEMO_JOB,
        "source": str(demo_corpus / "crawl"),
        "seeds": ["demo"],
        "recipe": "demo",
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    api_server.demo_events = run_to_end(client, DEMO_JOB)
    final = api_server.demo_events[-1].data
    assert final["status"] == "done", driver_log(client, DEMO_JOB)
    return final
