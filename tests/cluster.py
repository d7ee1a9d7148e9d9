"""A real multi-node Ray cluster on this machine, started the way a deployment starts its
containers: `docker/entrypoint.sh head` and `docker/entrypoint.sh worker`, each node a `ray start
--block` process of its own with its own resources and a custom resource naming it.

    def test_on_the_cluster(ray_cluster):
        run = curate_on(ray_cluster, "run", "--spec-file", spec, data_root=root)

The head offers no CPU, like a real head node, so every task runs on a worker node. Nodes share
the head's session folder (a private --temp-dir: a `ray.init()` elsewhere in the test session
never finds this cluster). Ray's token authentication is on: every process joining carries
RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN.

A node is stopped with SIGTERM to its `ray start --block` process (which stops its raylet and
workers), or killed whole with SIGKILL to its process group (`kill_node`): a lost machine.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.object_store import s3_env
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
WORKER_CPUS = 2
# Bounds on waiting for nodes to register: generous, they are not timings under test.
NODES_TIMEOUT_S = 180

_PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
label, stale, deadline = sys.argv[2], set(sys.argv[4:]), time.monotonic() + float(sys.argv[3])
while True:
    fresh = [n for n in ray.nodes() if n["Alive"] and label in n["Resources"]
             and n["NodeID"] not in stale]
    if fresh or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([n["NodeID"] for n in fresh]))
"""


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path
    node_id: str | None = None


@dataclass
class RayCluster:
    root: Path
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, Node] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # every node id that ever joined
    # The cluster's own secret, as a deployment passes it to every container: a machine
    # without ~/.ray/auth_token (CI) starts the same cluster.
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    # Ray's session folder, short: its socket paths must fit AF_UNIX's 107 bytes.
    session_root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # What every node's container would carry besides: the object store's address and keys.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """Where Ray's job submission API answers (the service's CURATE_RAY_ADDRESS)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process of the cluster and of its drivers."""
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_DEDUP_LOGS": "0",
            **self.extra_env,
        }

    def _start(self, name: str, role: str, env: dict[str, str], *flags: str) -> Node:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(ENTRYPOINT), role, *flags, "--dashboard-agent-listen-port", str(free_port())],
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the node's processes are one group: kill_node ends it
            )
        node = Node(name, process, log)
        self.nodes[name] = node
        return node

    def start_head(self) -> None:
        self._start(
            "head",
            "head",
            {
                "CURATE_NODE_CPUS": "0",
                "CURATE_RAY_PORT": str(self.port),
                "CURATE_DASHBOARD_PORT": str(self.dashboard_port),
                "CURATE_DASHBOARD_HOST": "127.0.0.1",
            },
            "--temp-dir",
            self.session_root,
        )
        self._registered("head", "node:__internal_head__")

    def add_worker(self, name: str, cpus: int = WORKER_CPUS) -> None:
        """A worker node offering `cpus` and the custom resource `name`; returns once it has
        joined. One at a time: nodes that join at the same moment can race on the session."""
        self._start(
            name,
            "worker",
            {
                "CURATE_NODE_CPUS": str(cpus),
                "CURATE_NODE_RESOURCES": json.dumps({name: 1}),
                "CURATE_HEAD_ADDRESS": self.address,
            },
        )
        self._registered(name, name)

    def _probe(self, node: Node, label: str) -> list[str]:
        """Ids of the live nodes offering `label` that were never seen before (a killed node may
        still read alive for a while), once there is one or after NODES_TIMEOUT_S; fails at
        once, with the node's log, if the node being waited for exits meanwhile."""
        probe = subprocess.Popen(
            [sys.executable, "-c", _PROBE, self.address, label, str(NODES_TIMEOUT_S), *self.seen],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while probe.poll() is None:
            if node.process.poll() is not None:
                probe.kill()
                probe.wait()
                log = node.log.read_text()[-3000:]
                raise AssertionError(f"{node.name} exited ({node.process.returncode}): {log}")
            time.sleep(0.5)
        out, err = probe.communicate()
        assert probe.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def _registered(self, name: str, label: str) -> None:
        node = self.nodes[name]
        fresh = self._probe(node, label)
        assert fresh, f"{name} did not join; its log: {node.log.read_text()[-3000:]}"
        node.node_id = fresh[0]
        self.seen.add(fresh[0])

    def node_of(self, node_id: str) -> str:
        return next(n.name for n in self.nodes.values() if n.node_id == node_id)

    def forget(self, name: str) -> None:
        """Drop a node that died by itself (its process group already gone)."""
        node = self.nodes.pop(name)
        with suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's whole process group: its raylet and workers vanish at once."""
        node = self.nodes.pop(name)
        with suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            node = self.nodes.pop(name)
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGTERM)
            try:
                node.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
        shutil.rmtree(self.session_root, ignore_errors=True)


def curate_on(
    cluster: RayCluster,
    *args: str,
    data_root: Path,
    script: str | None = None,
    check: bool = True,
    **env: str,
) -> subprocess.CompletedProcess:
    """The `curate` command as a driver of the cluster (CURATE_RAY_ADDRESS); `script`: a
    python -c driver script taking the same arguments instead."""
    command = ["-c", script] if script is not None else ["-m", "services.cli.main"]
    result = subprocess.run(
        [sys.executable, *command, *args],
        env={
            **cluster.env,
            "CURATE_RAY_ADDRESS": cluster.address,
            "CURATE_DATA_ROOT": str(data_root),
            "CURATE_PROGRESS": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, s3_server) -> Iterator[RayCluster]:
    """A head (no CPU) and two worker nodes of WORKER_CPUS each, `node_a` and `node_b`, every
    node with the S3-compatible server's variables (tests/object_store.py)."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray-cluster"), extra_env=s3_env(s3_server))
    try:
        cluster.start_head()
        cluster.add_worker("node_a")
        cluster.add_worker("node_b")
        yield cluster
    finally:
        cluster.stop()
