"""What every benchmark measures and records the same way: wall time, peak memory, a fresh
process per measurement, and which code was measured."""

import hashlib
import multiprocessing
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """fn(*args, **kwargs) and its wall time in seconds."""
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Lower this process's peak RSS (VmHWM) to its current RSS, so that the next reading is the
    peak of what runs in between. getrusage's ru_maxrss cannot be reset, and a spawned process
    even starts with its parent's peak (the kernel keeps it across fork and exec)."""
    Path("/proc/self/clear_refs").write_text("5")


def in_fresh_process(fn: Callable, *args):
    """fn(*args) in a new spawned process: memory freed by earlier measurements cannot be reused.

    Not multiprocessing.Pool: its daemonic workers cannot start processes of their own (data
    loader workers)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def code_version(measured: tuple[str, ...]) -> dict:
    """The commit, and the measured modules' SHA-256 with their uncommitted-change state."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    changed = set(git("diff", "--name-only", "HEAD", "--", *measured).split())
    untracked = set(git("ls-files", "--others", "--", *measured).split())
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "modules": {
            path: {
                "sha256": hashlib.sha256((REPO / path).read_bytes()).hexdigest()[:16],
                "uncommitted_changes": path in changed | untracked,
            }
            for path in measured
        },
    }


def code_line(code: dict) -> str:
    """`code_version`'s record as one line of a results file."""
    modules = ", ".join(
        f"{Path(path).name} {m['sha256']}" + (" (uncommitted changes)" * m["uncommitted_changes"])
        for path, m in code["modules"].items()
    )
    line = f"Code measured: commit {code['commit']}; sha256 {modules}."
    if code.get("changed_during_run"):
        line += " **A measured module changed during the run: sections may mix versions.**"
    return line
