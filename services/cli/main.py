"""The `curate` command line: the parser of every command group, and `main`.

Each command group lives in its own module: run, sets (seeds, eval-sets), jobs (jobs, sql), data
(demo, export), train, serve (the REST service) and tokens (its API tokens); errors end every
command the same way (errors). The command line reaches up the layers: `curate run` hands the
job to `pipelines` (Ray), imported late so that `curate jobs` and `curate demo` start fast and
need no Ray.
"""

import argparse
import sys
from collections.abc import Sequence

from services.cli.copy_model import add_copy_model_parser
from services.cli.data import add_demo_parser, add_export_parser
from services.cli.errors import run_command
from services.cli.jobs import add_jobs_parser, add_sql_parser
from services.cli.run import add_run_parser
from services.cli.serve import add_serve_parser
from services.cli.sets import add_eval_sets_parser, add_seeds_parser
from services.cli.tokens import add_tokens_parser
from services.cli.train import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description="LVD-style curation of image crawls (see README.md)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In this order in `curate --help`.
    add_run_parser(commands)
    add_seeds_parser(commands)
    add_export_parser(commands)
    add_eval_sets_parser(commands)
    add_jobs_parser(commands)
    add_demo_parser(commands)
    add_train_parser(commands)
    add_copy_model_parser(commands)
    add_sql_parser(commands)
    add_serve_parser(commands)
    add_tokens_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
