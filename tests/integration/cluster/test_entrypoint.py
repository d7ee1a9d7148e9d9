"""docker/entrypoint.sh refuses what it cannot run, before starting anything (the roles it runs
are exercised by the multi-node tests, which start every node through it)."""

import subprocess

from tests.cluster import ENTRYPOINT


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENTRYPOINT), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_an_unknown_role_is_a_usage_error():
    result = _run("leader")
    assert result.returncode == 2 and "usage: entrypoint.sh head|worker|api|curate" in result.stderr


def test_a_worker_without_its_head_says_which_setting_is_missing():
    result = _run("worker")
    assert result.returncode == 2 and "CURATE_HEAD_ADDRESS" in result.stderr
