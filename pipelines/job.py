"""Run a curation job: every stage of its spec in order, resuming what a previous run left."""

import signal
import threading
from typing import Any

from curate.catalog import Catalog
from curate.core.stage import JobRun, Stage
from curate.integrity import redo_damaged
from curate.settings import Settings
from pipelines.executor import RayCompute, init_ray, run_stage, stop_ray
from pipelines.failures import STOP_REQUESTED, JobCancelled, is_cancel
from pipelines.registry import job_stages
from schemas.errors import CurateError, ErrorKind
from schemas.job import JobSpec, new_job_id

# What a user named wrongly is reported before what the machine lacks: fixing a model path first
# only to learn that the seed set was misspelt wastes a round.
_CHECK_ORDER = [ErrorKind.INPUT, ErrorKind.NOT_FOUND, ErrorKind.CONFLICT, ErrorKind.MODEL]


def _check(job: JobRun, stages: list[Stage]) -> list[str]:
    """Every stage checks its input before the job is recorded: a bad source, an unregistered
    seed set or a missing model starts nothing. Returns what the checks found, for the log."""
    found, refused = [], []
    for stage in stages:
        try:
            if note := stage.check(job):
                found.append(note)
        except CurateError as error:
            refused.append(error)
    if refused:
        rank = {kind: i for i, kind in enumerate(_CHECK_ORDER)}
        raise min(refused, key=lambda error: rank.get(error.kind, len(rank)))
    return found


def _cancel_on_sigterm() -> Any:
    """SIGTERM (the service's cancel, or `kill`) becomes a clean stop in the main thread that
    records `cancelled` (see executor.STOP_REQUESTED). Returns the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def cancel(signum: int, frame: Any) -> None:
        # One clean stop: a second SIGTERM would interrupt the recording of the first.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        STOP_REQUESTED.set()
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, cancel)


def run_job(spec: JobSpec, settings: Settings, log=print) -> dict:
    """Run (or resume) the job; returns its catalog report. Raises a CurateError on unusable
    input before anything is recorded, JobCancelled once stopped by SIGTERM. A resumed job's
    shards are checked first (existence and size): the parts of missing or damaged ones are
    redone, with every later stage."""
    spec = spec.model_copy(update={"job_id": spec.job_id or new_job_id()})
    assert spec.job_id
    catalog = Catalog(settings.catalog_file, settings.root)
    job = JobRun(spec, settings, catalog, RayCompute(progress=settings.progress))
    stages = job_stages(spec)
    found = _check(job, stages)
    resumed = catalog.open_job(spec)
    log(f"{'resuming' if resumed else 'starting'} job {spec.job_id}: {'; '.join(found)}")
    if resumed:
        # A registered shard gone or of the wrong size is redone, never read (curate/integrity).
        for line in redo_damaged(catalog, spec.job_id, job.job_dir):
            log(line)
    catalog.set_job_status(spec.job_id, "running")
    STOP_REQUESTED.clear()
    previous = _cancel_on_sigterm()
    started_ray = False
    try:
        started_ray = init_ray(settings)
        _cancel_on_sigterm()  # again: ray.init installs a SIGTERM handler of its own (sys.exit)
        for stage in stages:
            run_stage(stage, job)
    except BaseException as error:
        message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        stopped = is_cancel(error)
        # A job asked to stop is cancelled however its driver stops.
        if stopped or catalog.job_status(spec.job_id) == "cancelling":
            message = "cancelled; the committed parts stay: run the job again to resume"
            catalog.set_job_status(spec.job_id, "cancelled", message)
        else:
            catalog.set_job_status(spec.job_id, "failed", message)
        if stopped:
            raise JobCancelled(message) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        catalog.refresh_views(spec.job_id)
        if started_ray:  # a Ray of this call's own (the tests share one across jobs)
            stop_ray()
    catalog.set_job_status(spec.job_id, "done")
    return catalog.job_report(spec.job_id)
