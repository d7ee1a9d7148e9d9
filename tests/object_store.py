"""A real S3-compatible server on 127.0.0.1 for the object-store tests: moto's server mode, in
a process of its own, one bucket per test (a bucket's URI names its test's store)."""

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyarrow import fs

from tests.ports import free_port


def s3_env(endpoint: str) -> dict[str, str]:
    """The usual AWS variables, as a deployment sets them on every node and driver."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "lvd-test",
        "AWS_SECRET_ACCESS_KEY": "lvd-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@dataclass
class ObjectStore:
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    @property
    def fs(self) -> fs.S3FileSystem:
        return fs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key="lvd-test",
            secret_key="lvd-test-secret",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def objects(self, prefix: str) -> dict[str, int]:
        """key (relative to the prefix) -> size of every object under `prefix`."""
        base = f"{self.bucket}/{prefix}"
        infos = self.fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        return {
            info.path[len(base) + 1 :]: info.size for info in infos if info.type == fs.FileType.File
        }


def _wait_for(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"moto server not listening on {port}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """The endpoint of a moto server (S3 API) on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def object_store(s3_server, monkeypatch) -> ObjectStore:
    """A fresh bucket, with this process's AWS variables pointing at the server."""
    store = ObjectStore(s3_server, f"lvd-{uuid.uuid4().hex[:12]}")
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    store.fs.create_dir(store.bucket)
    return store
