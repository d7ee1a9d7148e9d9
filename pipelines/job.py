"""Run a curation job: every stage of its spec in order, resuming what a previous run left."""

import secrets
from datetime import datetime

from curate.catalog import Catalog
from curate.core.stage import JobRun, Stage
from curate.settings import Settings
from pipelines.executor import RayCompute, init_ray, run_stage
from pipelines.registry import job_stages
from schemas.errors import CurateError, ErrorKind
from schemas.job import JobSpec


def new_job_id() -> str:
    return f"job-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


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


def run_job(spec: JobSpec, settings: Settings, log=print) -> dict:
    """Run (or resume) the job; returns its catalog report. Raises a CurateError on unusable
    input before anything is recorded."""
    spec = spec.model_copy(update={"job_id": spec.job_id or new_job_id()})
    assert spec.job_id
    catalog = Catalog(settings.catalog_file, settings.data_root)
    job = JobRun(spec, settings, catalog, RayCompute(progress=settings.progress))
    stages = job_stages(spec)
    found = _check(job, stages)
    resumed = catalog.open_job(spec)
    log(f"{'resuming' if resumed else 'starting'} job {spec.job_id}: {'; '.join(found)}")
    catalog.set_job_status(spec.job_id, "running")
    try:
        init_ray(settings)
        for stage in stages:
            run_stage(stage, job)
    except BaseException as error:
        message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        catalog.set_job_status(spec.job_id, "failed", message)
        raise
    finally:
        catalog.refresh_views(spec.job_id)
    catalog.set_job_status(spec.job_id, "done")
    return catalog.job_report(spec.job_id)
