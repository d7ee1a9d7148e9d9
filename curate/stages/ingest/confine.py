"""Confinement: which local paths a job may read.

Two rules. A job submitted from outside (the REST service) names only locations under the
operator's roots (`CURATE_SOURCE_ROOTS`): `check_location` refuses the rest before anything is
read. And a folder or glob source never follows a symlink out of its boundary (the source folder,
or the roots when they are given): `sources.py` turns such a file into an `outside_root` error row
instead of reading it (`within`, `glob_base`). Without these, a symlink to /etc/passwd in a folder
source would be one image request away from whoever can submit a job.
"""

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from curate.stages.ingest.decode import Rejected
from schemas.errors import InputError
from schemas.reasons import Reason

NAME_MAX = 255  # bytes in one path component on Linux file systems


class LocationNotAllowed(InputError, ValueError):
    """A location outside the roots the operator allows, or one that tries to leave them."""

    code = "location_not_allowed"

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        # The request field at fault: the REST error body names it.
        self.field = field


def glob_base(pattern: str) -> str:
    """The folder a glob cannot leave: its leading components without wildcards ("." if none).

    `/data/crawl/**/*.jpg` -> `/data/crawl`; a plain path is its own base.
    """
    if not glob.has_magic(pattern):
        return pattern
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def real_roots(roots: Sequence[Path | str]) -> tuple[str, ...]:
    """The roots with every symlink resolved: what `within` compares against."""
    return tuple(os.path.realpath(root) for root in roots)


def within(real_path: str, real_bases: Sequence[str]) -> bool:
    """Whether a resolved path is one of the resolved bases or lies below one."""
    return any(
        real_path == base or real_path.startswith(base.rstrip(os.sep) + os.sep)
        for base in real_bases
    )


def check_location(location: str, roots: Sequence[Path | str], field: str = "source") -> str:
    """Refuse a local `location` (folder, glob, file) that is not under one of `roots`.

    Raises LocationNotAllowed naming `field`. No roots means no local path is allowed. `..`
    components are refused outright: in a glob (`a/**/../..`) they cannot be checked by looking
    at the text. The location's fixed part is resolved, symlinks included, before the check; the
    files a folder or glob lists are checked again at ingest (`sources.py`).
    """
    where = f"{field} {location!r}"
    if not roots:
        raise LocationNotAllowed(
            f"{where}: this service reads no local paths; the operator allows some with "
            "CURATE_SOURCE_ROOTS (folders separated by ':')",
            field=field,
        )
    if not location.strip():
        raise LocationNotAllowed(f"{field} is empty", field=field)
    if "\x00" in location:
        raise LocationNotAllowed(f"{field} holds a NUL character", field=field)
    path = Path(location)
    if any(len(part.encode()) > NAME_MAX for part in path.parts):
        raise LocationNotAllowed(
            f"{field} has a path component longer than {NAME_MAX} bytes", field=field
        )
    if not path.is_absolute():
        raise LocationNotAllowed(f"{where} must be an absolute path", field=field)
    if ".." in path.parts:
        raise LocationNotAllowed(f"{where} must not contain '..'", field=field)
    allowed = real_roots(roots)
    if not within(os.path.realpath(glob_base(location)), allowed):
        raise LocationNotAllowed(
            f"{where} lies outside the folders this service may read "
            f"({', '.join(str(r) for r in roots)})",
            field=field,
        )
    return location


def read_confined(path: str, boundary: Sequence[str]) -> bytes | Rejected:
    """A listed file's bytes, or an `outside_root` rejection when it resolves outside `boundary`
    (no check when `boundary` is empty).

    The resolved path is what is opened, with O_NOFOLLOW refusing a symlink swapped in since, so
    the file checked is the file read.
    """
    real = os.path.realpath(path)
    if boundary and not within(real, boundary):
        return Rejected(Reason.OUTSIDE_ROOT, "a symlink that leads outside the source's folder")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            return handle.read()
    except OSError as error:
        return Rejected(Reason.READ_ERROR, f"{type(error).__name__}: {error}")
