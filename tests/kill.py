"""Python processes that SIGKILL themselves at a fixed point: just before the catalog commit of the
(KILL_AFTER + 1)th part of stage KILL_STAGE, when that part's shard is already renamed into place
but not registered. That is the narrowest window for exactly-once (a file on disk the catalog does
not know), and a fixed point makes resume tests independent of how fast a loaded machine runs.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

# The head of every driver script: Catalog.commit_part wrapped so that the chosen commit never
# happens, the process dies instead.
KILL_HOOK = """
import os, signal, sys
from curate.catalog import Catalog

_stage, _after = os.environ["KILL_STAGE"], int(os.environ["KILL_AFTER"])
_commit = Catalog.commit_part
_done = []

def _commit_or_die(self, job_id, committing, result):
    if committing == _stage:
        if len(_done) == _after:
            os.kill(os.getpid(), signal.SIGKILL)
        _done.append(result.part)
    _commit(self, job_id, committing, result)

Catalog.commit_part = _commit_or_die
"""

# The `curate` CLI's own entry point under the hook.
CLI = KILL_HOOK + "from services.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"


def run_script_killed(script: str, argv: list[str], stage: str, after: int, **env: str) -> None:
    """python -c SCRIPT ARGV with the hook's stage and count; fails unless it dies at the hook."""
    driver = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        env={**os.environ, "KILL_STAGE": stage, "KILL_AFTER": str(after), **env},
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


def run_killed(args: list[str], data_root: Path, stage: str, after: int, **env: str) -> None:
    """`curate ARGS` on DATA_ROOT, SIGKILLed before its (after + 1)th commit in `stage`."""
    env = {
        "CURATE_DATA_ROOT": str(data_root),
        "CURATE_NUM_CPUS": "2",
        "CURATE_PROGRESS": "0",
        **env,
    }
    run_script_killed(CLI, args, stage, after, **env)
