"""The `curate` command line.

The one module of `curate` that reaches up the layers: `run` hands the job to `pipelines` (Ray),
imported late so that `curate jobs` and `curate demo` start fast and need no Ray.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from curate.catalog import Catalog, CatalogError
from curate.settings import Settings
from schemas.errors import InputError
from schemas.job import STAGES, SpecError, describe_validation_error, parse_job_spec
from services.cli.train import add_train_parser

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(InputError):
    """Bad input from the user: printed without a traceback, exit status 2."""

    code = "usage"


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise UsageError(f"bad CURATE_* setting: {describe_validation_error(error)}") from None


def _catalog(settings: Settings) -> Catalog:
    return Catalog(settings.catalog_file, settings.data_root)


# -- run ----------------------------------------------------------------------------------------


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


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings()
    from pipelines.recipes import RecipeError, load_recipe, merge

    try:
        recipe = load_recipe(args.recipe) if args.recipe else {}
        spec = parse_job_spec(merge(recipe, _spec_from_args(args)))
    except (SpecError, RecipeError) as error:
        raise UsageError(str(error)) from None
    # Imported only now: the stages bring torch and Ray, seconds a bad flag need not wait.
    from curate.stages.dedup.copy_detection import CopyWeightsError
    from curate.stages.dedup.eval_sets import EvalSetError
    from curate.stages.embed.model import WeightsError
    from curate.stages.ingest.sources import SourceError
    from curate.stages.retrieve.seed_sets import SeedSetError
    from pipelines.job import run_job
    from pipelines.runner import StageFailed

    try:
        report = run_job(spec, settings, log=lambda m: print(m, file=sys.stderr))
    except (
        SourceError,
        CatalogError,
        EvalSetError,
        CopyWeightsError,
        SeedSetError,
        WeightsError,
    ) as error:
        raise UsageError(str(error)) from None
    except StageFailed as error:
        print(f"curate: job failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    _print_report(report, sys.stdout)
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


# -- jobs ---------------------------------------------------------------------------------------


def _print_report(report: dict[str, Any], out) -> None:
    print(f"job {report['job_id']}  status: {report['status']}", file=out)
    print(f"  source:  {report['spec']['source']}", file=out)
    print(f"  created: {report['created_at']}  updated: {report['updated_at']}", file=out)
    if report.get("message"):
        print(f"  message: {report['message']}", file=out)
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


def cmd_jobs_list(args: argparse.Namespace) -> int:
    jobs = _catalog(_settings()).list_jobs()
    if args.json:
        print(json.dumps(jobs, default=str, indent=2))
        return 0
    if not jobs:
        print("no jobs yet: start one with `curate run --source SRC`")
        return 0
    print(f"{'job':<32}{'status':<9}{'images':>9}{'errors':>8}  source")
    for job in jobs:
        print(
            f"{job['job_id']:<32}{job['status']:<9}{job['rows_out']:>9}{job['errors']:>8}  "
            f"{job['source']}"
        )
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    try:
        report = _catalog(_settings()).job_report(args.job_id)
    except CatalogError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report, sys.stdout)
    return 0


# -- evaluation sets ----------------------------------------------------------------------------


def cmd_eval_sets_add(args: argparse.Namespace) -> int:
    from curate.stages.ingest.sources import SourceError, detect_source

    try:
        parse_job_spec({"source": args.location, "eval_sets": [args.name]})
        source = detect_source(args.location)
        _catalog(_settings()).add_eval_set(args.name, args.location)
    except (SpecError, SourceError, CatalogError) as error:
        raise UsageError(str(error)) from None
    print(f"eval set {args.name}: {source.description} at {args.location}")
    return 0


def cmd_eval_sets_list(args: argparse.Namespace) -> int:
    sets = _catalog(_settings()).eval_sets()
    if args.json:
        print(json.dumps(sets, indent=2))
    elif not sets:
        print("no eval sets yet: register one with `curate eval-sets add NAME LOCATION`")
    else:
        for name, location in sets.items():
            print(f"{name:<24}{location}")
    return 0


# -- seed sets ----------------------------------------------------------------------------------


def cmd_seeds_add(args: argparse.Namespace) -> int:
    from curate.stages.ingest.sources import SourceError, detect_source
    from curate.stages.retrieve.seed_sets import SeedSetError, registration

    try:
        location, policy, cap = registration(args.name, args.location, args.policy, args.cap)
        source = detect_source(location)
        _catalog(_settings()).add_seed_set(args.name, location, policy, cap, replace=args.replace)
    except (SeedSetError, SourceError, CatalogError) as error:
        raise UsageError(str(error)) from None
    capped = f", cap {cap:,}" if cap else ""
    print(f"seed set {args.name}: {source.description} at {location}, policy {policy}{capped}")
    return 0


def _seed_rows(settings: Settings) -> list[dict[str, Any]]:
    """Registered sets, then the presets nobody registered yet."""
    from curate.stages.retrieve.seed_sets import PRESETS

    registered = _catalog(settings).seed_sets()
    rows = [{"name": n, **e, "preset": n in PRESETS} for n, e in registered.items()]
    for name, preset in PRESETS.items():
        if name not in registered:
            rows.append(
                {
                    "name": name,
                    "location": None,
                    "policy": preset.policy,
                    "cap": preset.cap,
                    "preset": True,
                    "description": preset.description,
                }
            )
    return rows


def cmd_seeds_list(args: argparse.Namespace) -> int:
    rows = _seed_rows(_settings())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'seed set':<16}{'policy':<22}{'cap':>10}  location")
    for row in rows:
        cap = f"{row['cap']:,}" if row["cap"] else "-"
        where = row["location"] or "(preset; register: curate seeds add NAME PATH)"
        print(f"{row['name']:<16}{row['policy']:<22}{cap:>10}  {where}")
    return 0


def cmd_seeds_show(args: argparse.Namespace) -> int:
    rows = {row["name"]: row for row in _seed_rows(_settings())}
    if args.name not in rows:
        raise UsageError(
            f"unknown seed set {args.name!r}; register it with: curate seeds add {args.name} "
            "LOCATION --policy POLICY"
        )
    row = rows[args.name]
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        for key, value in row.items():
            print(f"{key:<12}{value}")
    return 0


# -- export -------------------------------------------------------------------------------------


def cmd_export_webdataset(args: argparse.Namespace) -> int:
    settings = _settings()
    catalog = _catalog(settings)
    try:
        catalog.job_spec(args.job_id)
    except CatalogError as error:
        raise UsageError(str(error)) from None
    if args.samples_per_tar < 1:
        raise UsageError(f"--samples-per-tar must be at least 1, got {args.samples_per_tar}")
    curated = catalog.shard_paths(args.job_id, "curated")
    if not curated:
        raise UsageError(
            f"job {args.job_id!r} has no curated shards yet: run it to the end with --seeds"
        )
    from curate.stages.curated.webdataset import export_webdataset

    tars = export_webdataset(
        curated, Path(args.out), samples_per_tar=args.samples_per_tar, progress=settings.progress
    )
    print(
        f"{len(tars)} WebDataset tars in {args.out}: {args.out}/{{000000..{len(tars) - 1:06d}}}.tar"
    )
    return 0


# -- demo and sql -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from curate.demo import generate_demo

    try:
        manifest = generate_demo(Path(args.dir), count=args.count, seed=args.seed, progress=True)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(
        f"demo corpus in {args.dir}: {len(manifest.crawl_files)} crawl files in {args.dir}/crawl, "
        f"{len(manifest.seed_files)} seed images in {args.dir}/seeds/demo"
    )
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    catalog = _catalog(_settings())
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


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description="LVD-style curation of image crawls (see README.md)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run or resume a curation job")
    run.add_argument("--source", required=True, help="folder, glob, URL list, .tar or .parquet")
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
    run.add_argument("--copy-threshold", type=float, help="copy cosine threshold (default 0.6)")
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

    seeds = commands.add_parser("seeds", help="seed sets to retrieve crawl images for")
    seed_commands = seeds.add_subparsers(
        dest="seeds_command", required=True, metavar="add|list|show"
    )
    seeds_add = seed_commands.add_parser("add", help="register a set (or a preset's location)")
    seeds_add.add_argument("name")
    seeds_add.add_argument("location", help="folder, glob, URL list, .tar or .parquet")
    seeds_add.add_argument("--policy", help="as-is, knn:K, cluster:M, balanced:N joined by +")
    seeds_add.add_argument("--cap", type=int, help="most crawl images each policy step may pull")
    seeds_add.add_argument("--replace", action="store_true", help="change a registered set")
    seeds_add.set_defaults(func=cmd_seeds_add)
    seeds_list = seed_commands.add_parser("list", help="registered sets and presets")
    seeds_list.add_argument("--json", action="store_true")
    seeds_list.set_defaults(func=cmd_seeds_list)
    seeds_show = seed_commands.add_parser("show", help="one set")
    seeds_show.add_argument("name")
    seeds_show.add_argument("--json", action="store_true")
    seeds_show.set_defaults(func=cmd_seeds_show)

    export = commands.add_parser("export", help="export a curated dataset").add_subparsers(
        dest="export_command", required=True, metavar="webdataset"
    )
    webdataset = export.add_parser("webdataset", help="WebDataset tars of the curated shards")
    webdataset.add_argument("job_id")
    webdataset.add_argument("out")
    webdataset.add_argument("--samples-per-tar", type=int, default=10_000)
    webdataset.set_defaults(func=cmd_export_webdataset)

    eval_sets = commands.add_parser("eval-sets", help="evaluation sets for decontamination")
    eval_commands = eval_sets.add_subparsers(dest="eval_command", required=True, metavar="add|list")
    add = eval_commands.add_parser("add", help="register a set by name")
    add.add_argument("name")
    add.add_argument("location", help="folder, glob, URL list, .tar or .parquet")
    add.set_defaults(func=cmd_eval_sets_add)
    listing_sets = eval_commands.add_parser("list", help="registered sets")
    listing_sets.add_argument("--json", action="store_true")
    listing_sets.set_defaults(func=cmd_eval_sets_list)

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

    demo = commands.add_parser("demo", help="generate the built-in demo corpus")
    demo.add_argument("dir")
    demo.add_argument("--count", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    add_train_parser(commands)

    sql = commands.add_parser("sql", help="SQL over the catalog and each job's stage views")
    sql.add_argument("query", help="e.g. 'SELECT count(*) FROM \"demo\".ingest'")
    sql.add_argument("--json", action="store_true")
    sql.set_defaults(func=cmd_sql)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:
        print(f"curate: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("curate: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
