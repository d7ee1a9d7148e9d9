"""Run a curation job: every stage of its spec in order, resuming what a previous run left."""

import secrets
from datetime import datetime

from curate.catalog import Catalog
from curate.settings import Settings
from curate.stages.dedup.eval_sets import check_eval_sets
from curate.stages.embed.model import check_spec
from curate.stages.ingest.sources import detect_source
from curate.stages.retrieve.seed_cache import check_seed_sets
from pipelines.runner import init_ray
from pipelines.stages import STAGE_RUNNERS, JobContext, copy_model_of, embed_model_of
from schemas.job import JobSpec


def new_job_id() -> str:
    return f"job-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def run_job(spec: JobSpec, settings: Settings, log=print) -> dict:
    """Run (or resume) the job; returns its catalog report. Raises on an unusable source."""
    spec = spec.model_copy(update={"job_id": spec.job_id or new_job_id()})
    assert spec.job_id
    # The source is checked before the job is recorded: an unreadable source starts nothing.
    source = detect_source(spec.source, spec.ingest.url_column)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    if "dedup" in spec.stages():
        background = [spec.dedup.copy_background] if spec.dedup.copy_background else []
        check_eval_sets(spec.eval_sets + background, catalog, copy_model_of(settings))
    if "retrieve" in spec.stages():
        check_seed_sets(spec.seeds, catalog)
    if "embed" in spec.stages():
        check_spec(embed_model_of(settings, spec))
    resumed = catalog.open_job(spec)
    log(f"{'resuming' if resumed else 'starting'} job {spec.job_id}: {source.description}")
    catalog.set_job_status(spec.job_id, "running")
    ctx = JobContext(spec=spec, settings=settings, catalog=catalog, source=source)
    try:
        init_ray(settings)
        for stage in spec.stages():
            STAGE_RUNNERS[stage](ctx)
    except BaseException as error:
        message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        catalog.set_job_status(spec.job_id, "failed", message)
        raise
    finally:
        catalog.refresh_views(spec.job_id)
    catalog.set_job_status(spec.job_id, "done")
    return catalog.job_report(spec.job_id)
