"""`curate run`: run or resume a curation job from flags, a recipe, a spec file, or several.

The job goes to `pipelines` (Ray), imported only once the flags have been checked, so that a bad
flag is reported without waiting for torch and Ray to load.
"""

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from curate.settings import Settings
from schemas.errors import CurateError
from schemas.job import STAGES, parse_job_spec
from services.cli.common import load_settings, open_catalog
from services.cli.errors import EXIT_FAILED, UsageError
from services.cli.jobs import print_report

# A job stopped by SIGTERM ends as shells report that signal.
EXIT_CANCELLED = 128 + signal.SIGTERM


def _given(**values: Any) -> dict[str, Any]:
    """The flags the user gave: the job spec's defaults stand for the others."""
    return {key: value for key, value in values.items() if value is not None}


def _spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    spec = _given(source=args.source, job_id=args.job, until=args.until)
    ingest = _given(
        shard_size=args.shard_size,
        url_column=args.url_column,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        max_side=args.max_side,
        max_pixels=args.max_pixels,
    )
    if ingest:
        spec["ingest"] = ingest
    if args.eval_sets:
        spec["eval_sets"] = _names(args.eval_sets)
    if args.seeds:
        spec["seeds"] = _names(args.seeds)
    dedup = _given(
        hash=args.hash,
        hamming_radius=args.hamming_radius,
        copy_threshold=args.copy_threshold,
        copy_background=args.copy_background,
    )
    if dedup:
        spec["dedup"] = dedup
    for group, values in {
        "embed": _given(arch=args.arch, batch_size=args.batch_size),
        "cluster": _given(n_clusters=args.n_clusters),
        "curated": _given(target_size=args.target_size),
    }.items():
        if values:
            spec[group] = values
    return spec


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _spec_file(path: str) -> dict[str, Any]:
    """A job spec from a JSON or YAML file (the service writes one per job)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"--spec-file {path}: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--spec-file {path} must hold a mapping of job-spec fields")
    return data


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    from pipelines.recipes import load_recipe, merge

    recipe = load_recipe(args.recipe) if args.recipe else {}
    if args.spec_file:
        recipe = merge(recipe, _spec_file(args.spec_file))
    fields = merge(recipe, _spec_from_args(args))
    if "source" not in fields:
        raise UsageError("--source is required (or a --spec-file that names one)")
    spec = parse_job_spec(fields)
    # Imported only now: the stages bring torch and Ray, seconds a bad flag need not wait.
    from pipelines.failures import JobCancelled, StageFailed
    from pipelines.job import run_job

    try:
        report = run_job(spec, settings, log=lambda m: print(m, file=sys.stderr))
    except StageFailed as error:
        # The job ran and a stage failed, whatever the kind of its cause: a failed run, not a
        # usage error (its report in the catalog says where).
        print(f"curate: job failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except JobCancelled as error:
        print(f"curate: job {spec.job_id or ''} {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except CurateError as error:
        if args.spec_file and spec.job_id:
            # The service recorded this job before starting its driver: say why it never ran.
            catalog = open_catalog(settings)
            if catalog.job_status(spec.job_id) in ("created", "running", "cancelling"):
                catalog.set_job_status(spec.job_id, "failed", str(error))
        raise
    print_report(report, sys.stdout)
    _print_next_steps(report, settings)
    return 0


def _print_next_steps(report: dict[str, Any], settings: Settings) -> None:
    job = report["job_id"]
    job_dir = settings.job_dir(job)
    print(f"\nshards:   {job_dir}")
    if any(s["stage"] == "curated" and s["status"] == "done" for s in report["stages"]):
        print(f"curated:  {job_dir / 'curated'}  (dataset card: {job_dir / 'README.md'})")
        print(
            f'browse:   curate sql \'SELECT seed_set, method, count(*) FROM "{job}".curated '
            "GROUP BY ALL'"
        )
        print(f"train:    curate train run --data {job} --out {job_dir / 'train'}")
        print(f"export:   curate export webdataset {job} {job_dir / 'webdataset'}")
    else:
        print(f"query:    curate sql 'SELECT reason, count(*) FROM \"{job}\".dedup GROUP BY 1'")


def add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run or resume a curation job")
    run.add_argument("--source", help="folder, glob, URL list, .tar or .parquet (required)")
    run.add_argument(
        "--spec-file", help="a whole job spec as JSON or YAML (flags given override its fields)"
    )
    run.add_argument("--job", help="job id; re-running an existing id resumes it")
    run.add_argument("--until", choices=STAGES, help="last stage to run (default: all)")
    run.add_argument("--shard-size", type=int, help="source items per shard (default 1000)")
    run.add_argument("--url-column", help="URL column of .csv/.tsv/.jsonl/.parquet lists")
    run.add_argument("--min-side", type=int, help="reject images with a shorter side (default 64)")
    run.add_argument("--max-aspect", type=float, help="reject longer/shorter > this (default 4)")
    run.add_argument("--max-side", type=int, help="downscale images whose longer side is larger")
    run.add_argument("--max-pixels", type=int, help="decompression-bomb cap (default 89478485)")
    run.add_argument("--eval-sets", help="registered eval sets to decontaminate against: a,b")
    run.add_argument("--hash", choices=["pca", "phash"], help="near-duplicate hash (default pca)")
    run.add_argument("--hamming-radius", type=int, help="near-duplicate Hamming radius")
    run.add_argument("--copy-threshold", type=float, help="copy cosine (default: the model's own)")
    run.add_argument(
        "--copy-background", help="registered image set to normalise copy scores against (SSCD)"
    )
    run.add_argument("--seeds", help="registered seed sets to retrieve for: a,b")
    run.add_argument("--recipe", help="a built-in recipe (demo, lvd) or a recipe .yaml file")
    run.add_argument("--arch", help="timm architecture of the embedder (default ViT-H/14)")
    run.add_argument("--batch-size", type=int, help="embedding batch size")
    run.add_argument("--n-clusters", type=int, help="k-means clusters (default: from the size)")
    run.add_argument("--target-size", type=int, help="sample the curated set down to this size")
    run.set_defaults(func=cmd_run)
