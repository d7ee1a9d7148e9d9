"""Shard integrity: a job's registered shards checked against the catalog (the file is there,
its size, its sha256), and the parts whose shards are missing or damaged forgotten so that the
next run redoes them, with every later stage of the job.

Two depths. `curate jobs verify` reads every byte (`check_job(full=True)`, streaming sha256,
files hashed in parallel threads). A run of a job checks existence and size only
(`redo_damaged`, called by pipelines/job.py before its stages): one stat per shard, where
hashing would re-read the whole job, terabytes for a full crawl, on every resume. A shard
damaged in place without a change of size is therefore found by `verify`, and
`verify --repair` forgets its part the same way a run does.

What is redone: each bad part of the earliest stage with one (its stage re-runs exactly the
parts no longer committed), and every later stage of the job entirely (their outputs depend on
what is redone): their catalog rows go and so does their folder, whose whole-stage results
(centroids, the retrieval index, the pinned seed sets) a re-run would otherwise reuse.
"""

import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from curate.catalog import Catalog
from curate.core import storage
from schemas.errors import DataError
from schemas.job import StageName

OK, MISSING, DAMAGED = "ok", "missing", "damaged"
SHA_DIFFERS = "sha256 differs from the registered one"
_ORDER = {stage.value: rank for rank, stage in enumerate(StageName)}
# Bad shards a stage's message names; the log names every one.
_NAMED = 3


class ShardsDamaged(DataError):
    """Registered shards of a job are missing or damaged (`curate jobs verify`)."""

    code = "shards_damaged"


@dataclass(frozen=True)
class ShardCheck:
    """One registered shard and what its check found."""

    stage: str
    kind: str  # data | errors
    part: int
    path: str  # as registered: relative to the data root
    state: str  # ok | missing | damaged
    detail: str = ""  # how it is damaged

    @property
    def seen_by_run(self) -> bool:
        """Whether a run's own check (existence and size) finds this shard bad."""
        return self.state == MISSING or (self.state == DAMAGED and self.detail != SHA_DIFFERS)

    def describe(self) -> str:
        """e.g. `ingest part 3: shard missing (jobs/x/ingest/part-000003.parquet)`."""
        shard = "shard" if self.kind == "data" else f"{self.kind} shard"
        detail = f"; {self.detail}" if self.detail else ""
        return f"{self.stage} part {self.part}: {shard} {self.state} ({self.path}{detail})"


def check_shard(path: Path, size: int, checksum: str | None = None) -> tuple[str, str]:
    """(state, detail) of one shard: missing, damaged (its size, or its sha256 when
    `checksum` is given, differs from the catalog's) or ok."""
    actual = storage.size(path)  # of the store's object on an object store root
    if actual is None:
        return MISSING, ""
    if actual != size:
        return DAMAGED, f"{actual} bytes, registered {size}"
    if checksum is not None and storage.sha256(path) != checksum:
        return DAMAGED, SHA_DIFFERS
    return OK, ""


def check_job(
    catalog: Catalog,
    job_id: str,
    *,
    full: bool,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ShardCheck]:
    """Every registered shard of the job, checked, in pipeline order. `full` hashes each file
    (the sha256 against the catalog's); otherwise existence and size only. `progress` is
    called with each shard's registered size as it is done."""
    shards = sorted(
        catalog.registered_shards(job_id),
        key=lambda s: (_ORDER.get(s["stage"], len(_ORDER)), s["part"], s["kind"]),
    )

    def check(shard: dict) -> ShardCheck:
        state, detail = check_shard(
            catalog.absolute(shard["path"]), shard["bytes"], shard["checksum"] if full else None
        )
        if progress is not None:
            progress(shard["bytes"])
        return ShardCheck(
            shard["stage"], shard["kind"], shard["part"], shard["path"], state, detail
        )

    if not full and not storage.is_remote(catalog.data_root):
        return [check(shard) for shard in shards]
    # hashlib gives up the GIL over large buffers, and a store's requests wait on the network:
    # threads read and hash files (or ask an object store for sizes) side by side.
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(check, shards))


def stage_counts(checks: Iterable[ShardCheck]) -> dict[str, Counter]:
    """Per stage, in pipeline order: how many shards are ok, missing, damaged."""
    counts: dict[str, Counter] = {}
    for check in checks:
        counts.setdefault(check.stage, Counter({OK: 0, MISSING: 0, DAMAGED: 0}))[check.state] += 1
    return counts


@dataclass(frozen=True)
class Redo:
    """What bad shards cost: the parts to redo per stage and the later stages reset whole."""

    parts: dict[str, list[int]]
    reset: list[str]


def plan_redo(bad: Iterable[ShardCheck]) -> Redo:
    """The earliest stage with a bad shard redoes those parts; every later stage is reset."""
    bad = [check for check in bad if check.state != OK]
    if not bad:
        return Redo({}, [])
    first = min(_ORDER[check.stage] for check in bad)
    stage = list(StageName)[first].value
    parts = sorted({check.part for check in bad if check.stage == stage})
    return Redo({stage: parts}, [s.value for s in list(StageName)[first + 1 :]])


def forget_bad_parts(
    catalog: Catalog, job_id: str, job_dir: Path, bad: list[ShardCheck]
) -> list[str]:
    """Forget the bad shards' parts (plan_redo) so that the next run redoes them; returns what
    was done, a line each, for the log. The later stages' folders go first: a crash before the
    catalog's transaction leaves their shards registered and missing, which the next run finds
    and forgets again."""
    redo = plan_redo(bad)
    if not redo.parts:
        return []
    ((stage, parts),) = redo.parts.items()
    reset = redo.reset
    lines = []
    for check in sorted(bad, key=lambda c: (_ORDER[c.stage], c.part, c.kind)):
        if check.stage == stage:
            after = " and the stages after" if reset else ""
            lines.append(f"{check.describe()}; redoing it{after}")
        else:
            lines.append(f"{check.describe()}; redoing its stage whole")
    for name in reset:
        storage.remove_tree(job_dir / name)
    found = [check.describe() for check in bad if check.stage == stage]
    more = f" (and {len(found) - _NAMED} more)" if len(found) > _NAMED else ""
    catalog.invalidate_parts(
        job_id,
        {stage: parts},
        reset,
        message=f"{'; '.join(found[:_NAMED])}{more}; run the job again to redo "
        + ("it" if len(parts) == 1 else "them"),
    )
    if reset:
        lines.append(f"reset, as they read what is redone: {', '.join(reset)}")
    return lines


def redo_damaged(catalog: Catalog, job_id: str, job_dir: Path) -> list[str]:
    """A run's check before its stages: every registered shard's existence and size (no
    hashing, see the module's docstring); the parts of any that is missing or damaged are
    forgotten (forget_bad_parts). Returns the lines for the log, none when all is well."""
    bad = [check for check in check_job(catalog, job_id, full=False) if check.state != OK]
    return forget_bad_parts(catalog, job_id, job_dir, bad)
