"""`curate jobs list|show|verify` and `curate sql`: reading the catalog, each job's stage views and
checking its shards."""

import argparse
import json
import sys
from typing import Any, TextIO

from curate.catalog import JobNotFound
from curate.core import storage
from services.cli.common import load_settings, open_catalog
from services.cli.errors import UsageError


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """A job report (Catalog.job_report or job_detail, which adds the counts) as the table
    `curate jobs show` and `curate run` print."""
    print(f"job {report['job_id']}  status: {report['status']}", file=out)
    print(f"  source:  {report['spec']['source']}", file=out)
    print(f"  created: {report['created_at']}  updated: {report['updated_at']}", file=out)
    if report.get("message"):
        print(f"  message: {report['message']}", file=out)
    if report.get("counts"):
        counts = ", ".join(f"{_count(report['counts'][k])} {t}" for k, t in _COUNTS.items())
        print(f"  images:  {counts}", file=out)
    header = f"  {'stage':<16}{'status':<9}{'parts':>11}{'rows in':>10}{'rows out':>10}"
    print(header + f"{'errors':>8}{'seconds':>9}", file=out)
    for stage in report["stages"]:
        total = stage["parts_total"] if stage["parts_total"] is not None else "?"
        parts = f"{stage['parts_done']}/{total}"
        print(
            f"  {stage['stage']:<16}{stage['status']:<9}{parts:>11}{stage['rows_in']:>10}"
            f"{stage['rows_out']:>10}{stage['errors']:>8}{stage['seconds']:>9.1f}",
            file=out,
        )
        for key, value in stage["metrics"].items():
            print(f"      {key}: {value}", file=out)
        if stage["errors_by_reason"]:
            reasons = ", ".join(f"{r} {n}" for r, n in stage["errors_by_reason"].items())
            print(f"      errors by reason: {reasons}", file=out)
        if stage["message"]:
            print(f"      message: {stage['message']}", file=out)


# The job summary's counts (Catalog.job_counts) as `curate jobs list` titles them.
_COUNTS = {
    "items_read": "read",
    "images_kept": "kept",
    "images_embedded": "embedded",
    "curated_images": "curated",
    "errors": "errors",
}


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    jobs = open_catalog(load_settings()).list_jobs()
    if args.json:
        print(json.dumps(jobs, default=str, indent=2))
        return 0
    if not jobs:
        print("no jobs yet: start one with `curate run --source SRC`")
        return 0
    columns = "".join(f"{title:>9}" for title in _COUNTS.values())
    print(f"{'job':<32}{'status':<11}{columns}  source")
    for job in jobs:
        counts = "".join(f"{_count(job['counts'][key]):>9}" for key in _COUNTS)
        print(f"{job['job_id']:<32}{job['status']:<11}{counts}  {job['source']}")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    report = open_catalog(load_settings()).job_detail(args.job_id)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, sys.stdout)
    return 0


def cmd_jobs_verify(args: argparse.Namespace) -> int:
    """Every registered shard of the job re-read: there, of its size, of its sha256. Exit 0
    when all are, 1 (a data error) when any is not; --repair also forgets the bad parts, so
    that the next run redoes them (a run by itself only sees missing shards and wrong sizes)."""
    from tqdm import tqdm

    from curate.catalog_service import ACTIVE, JobBusy
    from curate.integrity import OK, ShardsDamaged, check_job, forget_bad_parts, stage_counts

    settings = load_settings()
    catalog = open_catalog(settings)
    status = catalog.job_status(args.job_id)
    if status is None:
        raise JobNotFound(f"no job {args.job_id!r} in {catalog.path}")
    if args.repair and status in ACTIVE:
        raise JobBusy(
            f"job {args.job_id!r} is {status}: --repair forgets parts, which only a stopped job "
            "may (a run checks its shards' sizes itself when it starts)"
        )
    total = sum(shard["bytes"] for shard in catalog.registered_shards(args.job_id))
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="verify",
        disable=not (settings.progress and sys.stderr.isatty()),
        file=sys.stderr,
    ) as bar:
        checks = check_job(catalog, args.job_id, full=True, progress=bar.update)
    counts = stage_counts(checks)
    bad = [check for check in checks if check.state != OK]
    repaired = []
    if args.repair and bad:
        repaired = forget_bad_parts(catalog, args.job_id, settings.job_dir(args.job_id), bad)
    if args.json:
        verified = {
            "job_id": args.job_id,
            "stages": {stage: dict(count) for stage, count in counts.items()},
            "bad": [vars(check) for check in bad],
            "repaired": repaired,
        }
        print(json.dumps(verified, indent=2))
    else:
        print(f"job {args.job_id}: {len(checks)} shards")
        print(f"  {'stage':<16}{'ok':>8}{'missing':>9}{'damaged':>9}")
        for stage, count in counts.items():
            print(f"  {stage:<16}{count['ok']:>8}{count['missing']:>9}{count['damaged']:>9}")
        for check in bad:
            print(f"  {check.describe()}")
        for line in repaired:
            print(f"  repaired: {line}")
    if repaired:
        catalog.refresh_views(args.job_id)  # the SQL views no longer name the forgotten shards
    if bad:
        # A run finds missing shards and wrong sizes itself; only a hash tells the others.
        if repaired or all(check.seen_by_run for check in bad):
            then = "run the job again to redo them"
        else:
            then = f"`curate jobs verify {args.job_id} --repair`, then a run, redoes them"
        raise ShardsDamaged(
            f"{len(bad)} of {len(checks)} shards of job {args.job_id} are missing or "
            f"damaged; {then}"
        )
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    catalog = open_catalog(load_settings())
    if storage.is_remote(catalog.data_root):
        # A job's views read its shard files: on an object store root, the mirror's copies,
        # fetched here for the jobs the query names.
        for job in catalog.list_jobs():
            if job["job_id"] in args.query:
                shards = catalog.registered_shards(job["job_id"])
                storage.fetch_all(catalog.absolute(shard["path"]) for shard in shards)
                catalog.refresh_views(job["job_id"], fetched=True)
    try:
        names, rows = catalog.query(args.query)
    except Exception as error:  # DuckDB's own message says what is wrong with the query
        raise UsageError(f"query failed: {error}") from None
    if args.json:
        print(json.dumps([dict(zip(names, r, strict=True)) for r in rows], default=str, indent=2))
        return 0
    if names:
        print("\t".join(names))
        for row in rows:
            print("\t".join("" if v is None else str(v) for v in row))
    return 0


def add_jobs_parser(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser(
        "jobs", help="list jobs, show one or verify its shards"
    ).add_subparsers(dest="jobs_command", required=True, metavar="list|show|verify")
    listing = jobs.add_parser("list", help="every job in the catalog")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_jobs_list)
    show = jobs.add_parser("show", help="one job: stages, counts, errors by reason")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_jobs_show)
    verify = jobs.add_parser(
        "verify", help="re-read every shard of a job: there, its size, its sha256"
    )
    verify.add_argument("job_id")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="also forget the bad shards' parts and the later stages: the next run redoes them",
    )
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_jobs_verify)


def add_sql_parser(commands: argparse._SubParsersAction) -> None:
    sql = commands.add_parser("sql", help="SQL over the catalog and each job's stage views")
    sql.add_argument("query", help="e.g. 'SELECT count(*) FROM \"demo\".ingest'")
    sql.add_argument("--json", action="store_true")
    sql.set_defaults(func=cmd_sql)
