"""The `curate` command as a user runs it: a real process, its real exit code and messages."""

import subprocess
import sys


def run_curate(
    *args: str, env: dict[str, str], code: int | None = 0, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `curate ARGS` with `env`; asserts the exit code is `code` (None: any)."""
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if code is not None:
        assert result.returncode == code, result.stderr[-4000:]
    return result
