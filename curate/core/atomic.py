"""Files that appear whole or not at all: every write a later reader must trust goes through here.

A crash leaves at most a dot-prefixed temporary file beside the target, never a torn one. The
temporary name is unique, so a worker left over from a killed run cannot collide with its re-run.
"""

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curate.core import storage


def temporary_name(path: Path) -> Path:
    """A unique hidden name beside `path`: same folder (so the rename is atomic), ignored by
    readers that skip dot files."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def publish(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk and rename it onto `path`; on an object store root, upload it too."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    storage.upload(path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it becomes `path`, on an error it goes.

    For writers that want a file name (numpy, faiss, safetensors, Parquet); the plain cases have
    `write_bytes`, `write_text` and `write_json` below.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> int:
    """Delete the temporary files killed writers left under `folder`; returns how many.

    Only for a folder no writer can be using: a stage's folder when its one driver starts it.
    """
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, value: Any) -> None:
    """Indented, key-sorted JSON (so equal values give equal files)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
