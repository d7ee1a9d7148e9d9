"""`curate copy-model train`: an SSCD-style copy descriptor trained on the user's own unlabelled
images (a folder, a glob or a job's ingest shards), for the dedup stage's copy pass.

    curate copy-model train data/crawl --out data/copy-models --minutes 30
    CURATE_COPY_WEIGHTS=<the printed file> curate run --source data/crawl ...

Re-running the same command resumes an interrupted run and reuses a finished one (the run folder
under --out is named by the images' content and the settings).
"""

import argparse
import shutil
import sys
from pathlib import Path

from services.cli.common import load_settings
from services.cli.errors import UsageError


def _config(args: argparse.Namespace):
    from curate.copy_model.config import AugmentConfig, CopyConfigError, CopyTrainConfig

    try:
        return CopyTrainConfig(
            arch=args.arch,
            batch_size=args.batch_size,
            lr=args.lr,
            steps=args.steps,
            minutes=args.minutes,
            seed=args.seed,
            flip_invariant=not args.no_flip_invariant,
            augment=AugmentConfig(size=args.size),
        )
    except CopyConfigError as error:
        raise UsageError(f"copy-model train: {error}") from None


def _same_file(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def cmd_copy_model_train(args: argparse.Namespace) -> int:
    settings = load_settings()
    config = _config(args)  # bad flags are reported before torch loads
    if args.max_images < 8:
        raise UsageError(f"--max-images must be at least 8, got {args.max_images}")
    if args.export is not None and Path(args.export).suffix != ".safetensors":
        raise UsageError(f"--export must name a .safetensors file, got {args.export}")
    from curate.copy_model.corpus import load_corpus
    from curate.copy_model.train import train_copy_model
    from curate.core.atomic import atomic_path

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    corpus = load_corpus(
        args.source,
        side=2 * config.augment.size,
        max_images=args.max_images,
        seed=config.seed,
        settings=settings,
        progress=settings.progress,
    )
    log(
        f"copy model: {len(corpus.train)} training images, {len(corpus.held_out)} held out for "
        f"calibration, {corpus.skipped} undecodable skipped"
    )
    trained = train_copy_model(
        corpus,
        Path(args.out),
        config,
        stop_after=args.stop_after,
        progress=settings.progress,
        log=log,
    )
    if not trained.card.made:
        print(f"stopped early; re-run the same command to resume {trained.run_dir}")
        return 0
    weights = trained.weights
    if args.export is not None:
        export = Path(args.export)
        # Left alone when it already holds these weights: its modification time names the copy
        # model in caches (eval-set descriptors), so an unchanged model keeps its caches.
        if not (export.is_file() and _same_file(export, weights)):
            with atomic_path(export) as tmp:
                shutil.copyfile(weights, tmp)
        weights = export
    calibration = trained.card.calibration or {}
    print(f"weights:  {weights}")
    print(f"model:    {trained.card.summary()}")
    if calibration:
        at = calibration["at_copy_threshold"]
        print(
            f"calibrated on {calibration['set']}: copies above cosine "
            f"{calibration['copy_threshold']:.2f} (pair precision {at['pair_precision']:.3f}, "
            f"easy-edit recall {at['easy_recall']:.3f}, hard-geometric recall "
            f"{at['hard_geometric_recall']:.3f}), eval-set copies above "
            f"{calibration['eval_threshold']:.2f}"
        )
    print(f"use:      CURATE_COPY_WEIGHTS={weights} curate run --source ...")
    return 0


# Edits of the demo's stand-in evaluation set: ones the hash pass cannot see, so that the eval
# pass has copies to find in the demo crawl.
_DEMO_EVAL_EDITS = ("crop 70% + resize", "mirror", "rotate 10°", "crop 50%")


def cmd_copy_model_demo_eval(args: argparse.Namespace) -> int:
    from curate.copy_model.edits import write_copies
    from curate.demo.manifest import FileKind, load_manifest

    try:
        manifest = load_manifest(Path(args.demo_dir))
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}")
    originals = sorted(f.path for f in manifest.by_kind(FileKind.ORIGINAL))[: args.count]
    sources = [Path(args.demo_dir) / path for path in originals]
    written = write_copies(sources, Path(args.out), _DEMO_EVAL_EDITS)
    print(f"{len(written)} edited copies of demo crawl originals in {args.out}")
    return 0


def add_copy_model_parser(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("copy-model", help="train an SSCD-style copy descriptor")
    sub = group.add_subparsers(
        dest="copy_model_command", required=True, metavar="{train,demo-eval}"
    )
    train = sub.add_parser("train", help="train (or resume, or reuse) a copy model on images")
    train.add_argument("source", help="image folder, glob, or a job id (its ingest shards)")
    train.add_argument("--out", required=True, help="folder of runs (one per images + settings)")
    train.add_argument("--minutes", type=float, help="training time budget (default: --steps)")
    train.add_argument("--steps", type=int, default=50_000, help="steps at most (default 50000)")
    train.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    train.add_argument("--size", type=int, default=128, help="training and inference side (128)")
    train.add_argument("--arch", default="resnet18", help="trunk: resnet18 (default) or resnet50")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    train.add_argument("--max-images", type=int, default=8000, help="images used at most (8000)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--stop-after", type=int, help="end this session after N steps (resumable)")
    train.add_argument("--export", help="also copy the weights to this .safetensors file")
    train.add_argument(
        "--no-flip-invariant", action="store_true", help="do not average f(x) and f(mirror(x))"
    )
    train.set_defaults(func=cmd_copy_model_train)

    demo = sub.add_parser(
        "demo-eval", help="an evaluation set for the demo: edited copies of crawl originals"
    )
    demo.add_argument("demo_dir", help="a folder written by `curate demo`")
    demo.add_argument("out", help="folder for the copies (register it with `curate eval-sets add`)")
    demo.add_argument("--count", type=int, default=12, help="originals copied (default 12)")
    demo.set_defaults(func=cmd_copy_model_demo_eval)
