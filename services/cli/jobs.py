"""`curate jobs list|show` and `curate sql`: reading the catalog and each job's stage views."""

import argparse
import json
import sys
from typing import Any, TextIO

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


def cmd_sql(args: argparse.Namespace) -> int:
    catalog = open_catalog(load_settings())
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
    jobs = commands.add_parser("jobs", help="list jobs or show one").add_subparsers(
        dest="jobs_command", required=True, metavar="list|show"
    )
    listing = jobs.add_parser("list", help="every job in the catalog")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_jobs_list)
    show = jobs.add_parser("show", help="one job: stages, counts, errors by reason")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_jobs_show)


def add_sql_parser(commands: argparse._SubParsersAction) -> None:
    sql = commands.add_parser("sql", help="SQL over the catalog and each job's stage views")
    sql.add_argument("query", help="e.g. 'SELECT count(*) FROM \"demo\".ingest'")
    sql.add_argument("--json", action="store_true")
    sql.set_defaults(func=cmd_sql)
