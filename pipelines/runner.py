"""Run one stage: a Ray task per part, each finished part committed to the catalog.

Ray tasks rather than Ray Data: a part is the unit of exactly-once (its shards and error counts
are registered in one catalog transaction once its files are in place), so the driver must see
each part finish by itself and commit it before it counts as done. Ray Data's streaming executor
hides that boundary behind its own block scheduling and has no per-input commit hook; plain tasks
with a bounded window of parts in flight give the same streaming with memory bounded by the window.
"""

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import ray
from tqdm import tqdm

from curate.catalog import Catalog
from curate.core.shards import PartResult
from curate.settings import Settings


class StageFailed(RuntimeError):
    pass


class Part(Protocol):
    index: int


def init_ray(settings: Settings) -> None:
    """Join CURATE_RAY_ADDRESS's cluster, or start a local one; once per process."""
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level="WARNING")
    else:
        ray.init(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            include_dashboard=False,
            logging_level="WARNING",
        )


class PartProgress:
    """A stage's progress bar in parts, with the rows and error rows of the parts committed."""

    def __init__(self, label: str, total: int | None, initial: int, enabled: bool) -> None:
        self.rows_out = self.errors = 0
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=label,
            unit="part",
            disable=not enabled,
            dynamic_ncols=True,
        )

    def committed(self, result: PartResult) -> None:
        self.rows_out += result.rows_out
        self.errors += result.errors
        self._bar.update(1)
        self._bar.set_postfix(rows=self.rows_out, errors=self.errors, refresh=False)

    def close(self) -> None:
        self._bar.close()


def run_parts(
    catalog: Catalog,
    job_id: str,
    stage: str,
    parts: Iterable[Part],
    work: Callable[..., PartResult],
    work_args: tuple[Any, ...],
    *,
    parts_total: int | None,
    progress: bool,
    describe: Callable[[Any], str] = str,
    num_cpus: float = 1,
) -> None:
    """Run `work(part, *work_args)` on Ray for every part not yet committed, committing each."""
    map_parts(
        parts,
        work,
        work_args,
        done=catalog.committed_parts(job_id, stage),
        commit=lambda result: catalog.commit_part(job_id, stage, result),
        label=stage,
        parts_total=parts_total,
        progress=progress,
        describe=describe,
        num_cpus=num_cpus,
    )


def map_parts(
    parts: Iterable[Part],
    work: Callable[..., PartResult],
    work_args: tuple[Any, ...],
    *,
    done: set[int],
    commit: Callable[[PartResult], None],
    label: str,
    parts_total: int | None,
    progress: bool,
    describe: Callable[[Any], str] = str,
    num_cpus: float = 1,
) -> None:
    """Run `work(part, *work_args)` on Ray for every part not in `done`; `commit` each result
    in the driver as it arrives. A failed part raises StageFailed naming it."""
    # Ray re-runs a part whose worker died (OOM, lost node); an exception raised by our own code
    # is a bug or an unreadable source and stops the stage instead.
    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(work)
    # Two parts per slot keep every worker busy while the driver commits; the window bounds the
    # driver's memory whatever the number of parts.
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
    window = 2 * slots
    shared_args = [ray.put(arg) for arg in work_args]
    todo = (part for part in parts if part.index not in done)
    pending: dict[ray.ObjectRef, Part] = {}
    bar = PartProgress(label, parts_total, len(done), progress)

    def fill() -> None:
        while len(pending) < window and (part := next(todo, None)) is not None:
            pending[remote.remote(part, *shared_args)] = part

    try:
        fill()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(ref)
            try:
                result: PartResult = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                cause = error.cause if error.cause is not None else error
                raise StageFailed(
                    f"{label} failed on {describe(part)}: {type(cause).__name__}: {cause}"
                ) from None
            commit(result)
            bar.committed(result)
            fill()
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()


def run_task(
    label: str,
    work: Callable[..., Any],
    *args: Any,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> Any:
    """Run `work(*args, **kwargs)` as one Ray task; its failure is a StageFailed naming `label`."""
    try:
        return ray.get(ray.remote(**(resources or {"num_cpus": 1}))(work).remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        raise StageFailed(f"{label} failed: {type(cause).__name__}: {cause}") from None
