"""`curate eval-sets add|list` and `curate seeds add|list|show`: the image sets a job names.

Evaluation sets are what dedup decontaminates against; seed sets are what retrieval finds crawl
images for. Both are registered by name in the catalog.
"""

import argparse
import json
from typing import Any

from curate.settings import Settings
from schemas.job import parse_job_spec
from services.cli.common import load_settings, open_catalog
from services.cli.errors import UsageError

# -- evaluation sets ----------------------------------------------------------------------------


def cmd_eval_sets_add(args: argparse.Namespace) -> int:
    from curate.stages.ingest.sources import detect_source

    parse_job_spec({"source": args.location, "eval_sets": [args.name]})
    source = detect_source(args.location)
    catalog = open_catalog(load_settings())
    catalog.add_eval_set(args.name, args.location)
    print(f"eval set {args.name}: {source.description} at {args.location}")
    return 0


def cmd_eval_sets_list(args: argparse.Namespace) -> int:
    sets = open_catalog(load_settings()).eval_sets()
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
    from curate.stages.ingest.sources import detect_source
    from curate.stages.retrieve.seed_sets import registration

    location, policy, cap = registration(args.name, args.location, args.policy, args.cap)
    source = detect_source(location)
    catalog = open_catalog(load_settings())
    catalog.add_seed_set(args.name, location, policy, cap, replace=args.replace)
    capped = f", cap {cap:,}" if cap else ""
    print(f"seed set {args.name}: {source.description} at {location}, policy {policy}{capped}")
    return 0


def _seed_rows(settings: Settings) -> list[dict[str, Any]]:
    """Registered sets, then the presets nobody registered yet."""
    from curate.stages.retrieve.seed_sets import PRESETS

    registered = open_catalog(settings).seed_sets()
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
    rows = _seed_rows(load_settings())
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
    rows = {row["name"]: row for row in _seed_rows(load_settings())}
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


# -- parsers ------------------------------------------------------------------------------------


def add_seeds_parser(commands: argparse._SubParsersAction) -> None:
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


def add_eval_sets_parser(commands: argparse._SubParsersAction) -> None:
    eval_sets = commands.add_parser("eval-sets", help="evaluation sets for decontamination")
    eval_commands = eval_sets.add_subparsers(dest="eval_command", required=True, metavar="add|list")
    add = eval_commands.add_parser("add", help="register a set by name")
    add.add_argument("name")
    add.add_argument("location", help="folder, glob, URL list, .tar or .parquet")
    add.set_defaults(func=cmd_eval_sets_add)
    listing_sets = eval_commands.add_parser("list", help="registered sets")
    listing_sets.add_argument("--json", action="store_true")
    listing_sets.set_defaults(func=cmd_eval_sets_list)
