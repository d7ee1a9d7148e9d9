"""`curate train ...`: run or resume training, export the backbone, k-NN evaluation, demo data.

Registered on the main CLI by `add_train_parser`; also runnable alone as
`python -m services.cli.train train ...`, which is what torchrun launches:
    torchrun --nproc_per_node=2 -m services.cli.train train run --data SRC --out DIR
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.cli.common import load_settings
from services.cli.errors import EXIT_FAILED, UsageError, run_command


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "knn_every": args.knn_every,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    if args.arch is not None:
        overrides["model"] = {"arch": args.arch}
    return overrides


def _run_config(args: argparse.Namespace):
    from curate.train.checkpoint import CHECKPOINTS, checkpoint_config, latest_checkpoint
    from schemas.train import deep_merge, load_train_config

    overrides = _overrides(args)
    if args.resume and args.config is None and args.preset is None:
        # Resuming: the run's own configuration, with only the flags given changed.
        latest = latest_checkpoint(Path(args.out) / CHECKPOINTS)
        if latest is None:
            raise UsageError(f"--resume: {args.out} holds no checkpoint to resume from")
        saved = checkpoint_config(latest).model_dump(mode="json")
        return load_train_config(overrides=deep_merge(saved, overrides))
    return load_train_config(args.config, args.preset, overrides)


def cmd_train_run(args: argparse.Namespace) -> int:
    """Train or resume; exit 1 when the run stops on a non-finite loss."""
    from curate.train.knn_eval import labelled_folder
    from curate.train.loop import train
    from curate.train.shards import resolve_shards
    from curate.train.step import NonFiniteLossError

    settings = load_settings()
    config = _run_config(args)
    files = resolve_shards(args.data, settings)
    knn_folder = Path(args.knn_folder) if args.knn_folder else None
    if knn_folder is not None:
        labelled_folder(knn_folder)  # checked before the run, not at its first evaluation
        if config.knn_every is None:
            config = config.model_copy(update={"knn_every": config.steps})
    try:
        result = train(
            config,
            files,
            Path(args.out),
            resume=args.resume,
            stop_after=args.stop_after,
            time_limit_s=None if args.time_limit is None else args.time_limit * 60,
            knn_folder=knn_folder,
            progress=settings.progress,
        )
    except NonFiniteLossError as error:
        # The run's outcome rather than an error of the command: said as such, exit 1.
        print(f"training stopped: {error}", file=sys.stderr)
        return EXIT_FAILED
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.metrics[-1] if result.metrics else {}
        print(f"trained to step {result.steps_done}; checkpoint {result.checkpoint}")
        if "loss" in last:
            print(f"last loss {last['loss']:.4f}")
        for line in result.knn:
            print(f"k-NN accuracy at step {line['step']}: {line['knn_accuracy']:.4f}")
        if result.export:
            print(f"teacher backbone: {result.export}")
    return 0


def cmd_train_export(args: argparse.Namespace) -> int:
    """Export a checkpoint's (or a run folder's latest) teacher backbone to safetensors."""
    from curate.train.checkpoint import CHECKPOINTS, latest_checkpoint
    from curate.train.export import export_checkpoint

    source = Path(args.checkpoint)
    if not source.is_dir():
        raise UsageError(f"{source}: checkpoint folder not found")
    if (source / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(source / CHECKPOINTS)
        if latest is None:
            raise UsageError(f"{source}: no complete checkpoint in {source / CHECKPOINTS}")
        source = latest
    out = export_checkpoint(source, Path(args.out))
    print(f"teacher backbone of {source} -> {out}")
    return 0


def cmd_train_knn(args: argparse.Namespace) -> int:
    """k-NN accuracy of an exported backbone (or of its architecture at random init)."""
    import timm

    from curate.stages.embed.model import ModelSpec, load_backbone
    from curate.train.export import read_metadata
    from curate.train.knn_eval import evaluate_knn, labelled_folder

    metadata = read_metadata(Path(args.weights))
    data = labelled_folder(Path(args.folder))
    img_size = int(metadata["img_size"])
    if args.random_init:
        backbone = timm.create_model(
            metadata["arch"], pretrained=False, num_classes=0, img_size=img_size
        )
    else:
        # The embedder's own loader: what k-NN measures is what the embed stage would run.
        backbone = load_backbone(ModelSpec(metadata["arch"], Path(args.weights), img_size=img_size))
    result = evaluate_knn(
        backbone, data, Path(args.folder), img_size, k=args.k, temperature=args.temperature
    )
    body = {"weights": "random init" if args.random_init else args.weights, **result.__dict__}
    print(json.dumps(body) if args.json else f"k-NN top-1 {result.accuracy:.4f} ({body})")
    return 0


def write_demo_training_data(demo_dir: Path, out_dir: Path, shard_size: int = 250) -> dict:
    """Curated-schema shards of a demo corpus's labelled originals, and a class-folder copy.

    out_dir/shards/part-NNNNNN.parquet is what the trainer reads (labels not used);
    out_dir/knn/<class>/ is the labelled folder of the k-NN evaluation.
    """
    import pyarrow as pa

    from curate.core.shards import shard_name, write_shard
    from curate.demo import FileKind, load_manifest
    from schemas.shards import CURATED

    manifest = load_manifest(demo_dir)
    originals = [f for f in manifest.by_kind(FileKind.ORIGINAL) if f.label is not None]
    # Curated shards are shuffled; a fixed seed keeps the folder reproducible.
    random.Random(0).shuffle(originals)
    shards = out_dir / "shards"
    knn = out_dir / "knn"
    shutil.rmtree(shards, ignore_errors=True)
    shutil.rmtree(knn, ignore_errors=True)
    for start in range(0, len(originals), shard_size):
        rows = []
        for entry in originals[start : start + shard_size]:
            data = (demo_dir / entry.path).read_bytes()
            rows.append(
                {
                    "image": {"bytes": data, "path": entry.path},
                    "image_id": hashlib.sha256(data).hexdigest(),
                    "uri": str(demo_dir / entry.path),
                    "seed_set": None,
                    "seed_id": None,
                    "similarity": None,
                    "method": "as-is",
                    "cluster_id": None,
                    "matches": 1,
                    "width": entry.width,
                    "height": entry.height,
                }
            )
        table = pa.Table.from_pylist(rows, schema=CURATED)
        write_shard(table, shards / shard_name(start // shard_size))
    for entry in originals:
        target = knn / entry.label / Path(entry.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo_dir / entry.path, target)
    return {"images": len(originals), "shards": str(shards), "knn": str(knn)}


def cmd_train_demo_data(args: argparse.Namespace) -> int:
    """Write the demo corpus's originals as curated shards plus a labelled k-NN folder."""
    try:
        summary = write_demo_training_data(Path(args.demo_dir), Path(args.out), args.shard_size)
    except (FileNotFoundError, ValueError) as error:  # no demo corpus there, or a damaged one
        raise UsageError(str(error)) from None
    print(
        f"{summary['images']} images: curated shards in {summary['shards']}, "
        f"labelled k-NN folder {summary['knn']}"
    )
    return 0


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Register `train` and its sub-commands on the CLI's sub-parsers."""
    train = commands.add_parser("train", help="self-supervised training on curated shards")
    sub = train.add_subparsers(dest="train_command", required=True)

    run = sub.add_parser("run", help="train (or --resume) DINO + iBOT + KoLeo")
    run.add_argument("--data", required=True, help="curated shards: folder, glob, file or job id")
    run.add_argument("--out", required=True, help="run folder: checkpoints, metrics, export")
    run.add_argument("--config", type=Path, help="YAML training config (over the preset)")
    run.add_argument("--preset", choices=("tiny", "small"), help="a built-in small config")
    run.add_argument("--arch", help="timm ViT architecture (over the config's model.arch)")
    run.add_argument("--steps", type=int, help="schedule length in iterations")
    run.add_argument("--stop-after", type=int, help="stop (and checkpoint) at this step")
    run.add_argument(
        "--time-limit", type=float, help="minutes; stop (checkpoint, k-NN, export) once exceeded"
    )
    run.add_argument("--batch-size", type=int, help="images per rank per step")
    run.add_argument("--workers", type=int, help="data loader processes per rank")
    run.add_argument("--seed", type=int)
    run.add_argument("--checkpoint-every", type=int)
    run.add_argument("--knn-folder", help="labelled image folder (one sub-folder per class)")
    run.add_argument("--knn-every", type=int, help="steps between k-NN evaluations")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    run.set_defaults(func=cmd_train_run)

    export = sub.add_parser("export", help="teacher backbone -> safetensors (timm keys)")
    export.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest)")
    export.add_argument("out", help="output .safetensors file")
    export.set_defaults(func=cmd_train_export)

    knn = sub.add_parser("knn", help="k-NN accuracy of an exported backbone")
    knn.add_argument("weights", help="exported .safetensors backbone")
    knn.add_argument("folder", help="labelled image folder (one sub-folder per class)")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--random-init", action="store_true", help="same network, random weights")
    knn.add_argument("--json", action="store_true")
    knn.set_defaults(func=cmd_train_knn)

    demo = sub.add_parser("demo-data", help="demo corpus -> curated shards + k-NN folder")
    demo.add_argument("demo_dir", help="a folder written by `curate demo`")
    demo.add_argument("out", help="output folder")
    demo.add_argument("--shard-size", type=int, default=250)
    demo.set_defaults(func=cmd_train_demo_data)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.cli.train train ...`: the train commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="curate")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
