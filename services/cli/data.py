"""`curate demo` and `curate export webdataset`: a corpus to try the pipeline on, and a curated
dataset out of it in the format training loaders read."""

import argparse
from pathlib import Path

from services.cli.common import load_settings, open_catalog
from services.cli.errors import UsageError


def cmd_export_webdataset(args: argparse.Namespace) -> int:
    settings = load_settings()
    catalog = open_catalog(settings)
    catalog.job_spec(args.job_id)  # an unknown job is reported before the flags
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


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="export a curated dataset").add_subparsers(
        dest="export_command", required=True, metavar="webdataset"
    )
    webdataset = export.add_parser("webdataset", help="WebDataset tars of the curated shards")
    webdataset.add_argument("job_id")
    webdataset.add_argument("out")
    webdataset.add_argument("--samples-per-tar", type=int, default=10_000)
    webdataset.set_defaults(func=cmd_export_webdataset)


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="generate the built-in demo corpus")
    demo.add_argument("dir")
    demo.add_argument("--count", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
