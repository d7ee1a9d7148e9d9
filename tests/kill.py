"""A `curate` CLI process that SIGKILLs itself at a fixed point: just before the catalog commit of
the (after + 1)th part of a chosen stage, when that part's shard is already renamed into place but
not registered. That is the narrowest window for exactly-once (a file on disk the catalog does not
know), and a fixed point makes resume tests independent of how fast a loaded machine runs parts.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

# The CLI's own entry point, with Catalog.commit_part wrapped: the (KILL_AFTER + 1)th commit of
# KILL_STAGE in this run never happens, the process dies instead.
DRIVER = """
import os, signal, sys
from curate.catalog import Catalog
from curate.cli import main

stage, after = os.environ["KILL_STAGE"], int(os.environ["KILL_AFTER"])
commit = Catalog.commit_part
done = []

def commit_or_die(self, job_id, committing, result):
    if committing == stage:
        if len(done) == after:
            os.kill(os.getpid(), signal.SIGKILL)
        done.append(result.part)
    commit(self, job_id, committing, result)

Catalog.commit_part = commit_or_die
sys.exit(main(sys.argv[1:]))
"""


def run_killed(args: list[str], data_root: Path, stage: str, after: int, **env: str) -> None:
    """`curate ARGS`, SIGKILLed before its (after + 1)th commit in `stage`; fails if it is not."""
    environment = {
        **os.environ,
        "CURATE_DATA_ROOT": str(data_root),
        "CURATE_NUM_CPUS": "2",
        "CURATE_PROGRESS": "0",
        "KILL_STAGE": stage,
        "KILL_AFTER": str(after),
        **env,
    }
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        env=environment,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = driver.communicate(timeout=240)
    finally:
        # The killed driver's local Ray (raylet, workers) shares its session: end it too.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert driver.returncode == -signal.SIGKILL, (
        f"the driver should die at its kill point in {stage}, exited {driver.returncode}: "
        f"{stderr.decode()[-2000:]}"
    )
