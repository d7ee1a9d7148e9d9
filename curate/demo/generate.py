"""The built-in demo corpus: a synthetic, uncurated "crawl" with planted problems, and seed images.

Everything is drawn from numpy generators seeded per image, so the same (count, seed) gives
byte-identical files on every machine, with no download. The crawl holds labelled originals from
ten look-alike classes, exact and near duplicates of some of them, broken files with the reason
code ingest must give each, and valid images in unusual modes. `manifest.json`, written last,
says what every file is, so later stages can be scored against it.
"""

import hashlib
import io
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from curate.core.atomic import write_text
from curate.demo.classes import CLASSES, SEED_CLASSES, _rng, _Stream
from curate.demo.manifest import MANIFEST_NAME, DemoFile, DemoManifest, FileKind, load_manifest
from curate.demo.planted import (
    _EXIF_ORIENTATION,
    BROKEN_FILES,
    EDIT_KINDS,
    EXTENSIONS,
    MODE_SAMPLES,
    _near_duplicate_spec,
    _original_spec,
    make_broken,
    make_mode_sample,
    make_near_duplicate,
    make_original,
    make_seed_image,
)

CRAWL_DIR = "crawl"
SEED_DIR = "seeds/demo"
FILES_PER_FOLDER = 250
MIN_COUNT = 60
MIN_SEEDS = 20


# -- planning and writing -------------------------------------------------------------------------


def planted_counts(count: int) -> dict[FileKind, int]:
    """How many files of each kind a crawl of `count` files holds."""
    exact = max(1, round(0.02 * count))
    near = max(len(EDIT_KINDS), round(0.05 * count))
    fixed = len(BROKEN_FILES) + len(MODE_SAMPLES)
    return {
        FileKind.ORIGINAL: count - exact - near - fixed,
        FileKind.EXACT_DUPLICATE: exact,
        FileKind.NEAR_DUPLICATE: near,
        FileKind.BROKEN: len(BROKEN_FILES),
        FileKind.MODE_SAMPLE: len(MODE_SAMPLES),
        FileKind.SEED: max(MIN_SEEDS, round(0.025 * count)),
    }


@dataclass
class _Planned:
    """One file to write: what the manifest will say about it, and how to make its bytes."""

    entry: dict
    make: Callable[[], bytes]


def _crawl_path(slot: int, extension: str) -> str:
    return f"{CRAWL_DIR}/{slot // FILES_PER_FOLDER:03d}/{slot:05d}{extension}"


def _plan(seed: int, count: int, staging: Path) -> list[_Planned]:
    counts = planted_counts(count)
    specs = [_original_spec(seed, i)[0] for i in range(counts[FileKind.ORIGINAL])]
    # Names carry no hint of what a file is: kinds are shuffled over the slots.
    slots = iter(_rng(seed, _Stream.LAYOUT).permutation(count).tolist())
    plan: list[_Planned] = []
    original_paths: list[str] = []
    for spec in specs:
        path = _crawl_path(next(slots), EXTENSIONS[spec.fmt])
        original_paths.append(path)
        entry = {"path": path, "kind": FileKind.ORIGINAL, "label": spec.label}
        plan.append(_Planned(entry, lambda i=spec.index: make_original(seed, i)))

    def read(path: str) -> bytes:
        return (staging / path).read_bytes()

    pick = _rng(seed, _Stream.EXACT)
    for source in pick.choice(len(specs), counts[FileKind.EXACT_DUPLICATE], replace=False):
        spec = specs[source]
        entry = {
            "path": _crawl_path(next(slots), EXTENSIONS[spec.fmt]),
            "kind": FileKind.EXACT_DUPLICATE,
            "label": spec.label,
            "duplicate_of": original_paths[source],
        }
        plan.append(_Planned(entry, lambda p=original_paths[source]: read(p)))

    # Sources large enough that a 50% resize still clears ingest's 64-pixel minimum.
    roomy = [s.index for s in specs if min(s.size) >= 140] or [s.index for s in specs]
    pick = _rng(seed, _Stream.NEAR)
    sources = pick.choice(
        roomy, counts[FileKind.NEAR_DUPLICATE], replace=len(roomy) < counts[FileKind.NEAR_DUPLICATE]
    )
    for k, source in enumerate(sources.tolist()):
        spec = specs[source]
        rng = _rng(seed, _Stream.NEAR, k + 1)
        near = _near_duplicate_spec(rng, EDIT_KINDS[k % len(EDIT_KINDS)], spec.fmt)
        entry = {
            "path": _crawl_path(next(slots), EXTENSIONS[near.fmt]),
            "kind": FileKind.NEAR_DUPLICATE,
            "label": spec.label,
            "duplicate_of": original_paths[source],
            "edit": near.edit,
        }
        make = lambda p=original_paths[source], n=near, r=rng: make_near_duplicate(read(p), n, r)  # noqa: E731
        plan.append(_Planned(entry, make))

    for k, (name, extension, reason) in enumerate(BROKEN_FILES):
        entry = {
            "path": _crawl_path(next(slots), extension),
            "kind": FileKind.BROKEN,
            "expected_reason": reason,
            "variant": name,
        }
        rng = _rng(seed, _Stream.BROKEN, k)
        plan.append(_Planned(entry, lambda n=name, r=rng: make_broken(n, r)))

    for k, (variant, extension) in enumerate(MODE_SAMPLES):
        label = CLASSES[k % len(CLASSES)]
        entry = {
            "path": _crawl_path(next(slots), extension),
            "kind": FileKind.MODE_SAMPLE,
            "label": label,
            "variant": variant,
        }
        rng = _rng(seed, _Stream.MODE, k)
        plan.append(_Planned(entry, lambda v=variant, r=rng, c=label: make_mode_sample(v, r, c)))

    for k in range(counts[FileKind.SEED]):
        label = SEED_CLASSES[k % len(SEED_CLASSES)]
        entry = {"path": f"{SEED_DIR}/seed_{k:04d}.jpg", "kind": FileKind.SEED, "label": label}
        plan.append(_Planned(entry, lambda i=k: make_seed_image(seed, i)[1]))
    return plan


def _header_facts(data: bytes) -> dict:
    """Format, mode and upright size as read from the header (no pixels are decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION)
                if orientation in (5, 6, 7, 8):
                    w, h = h, w
                return {"format": img.format, "mode": img.mode, "width": w, "height": h}
    except Exception:  # not an image at all: nothing to say
        return {}


def _check_folder(out_dir: Path, count: int, seed: int) -> DemoManifest | None:
    """The finished corpus if it is already there; refuse folders holding anything else."""
    if (out_dir / MANIFEST_NAME).exists():
        manifest = load_manifest(out_dir)
        if (manifest.count, manifest.seed) == (count, seed):
            return manifest
        raise ValueError(
            f"{out_dir} already holds a demo corpus with count={manifest.count}, "
            f"seed={manifest.seed}; pick another folder for count={count}, seed={seed}"
        )
    for name in (CRAWL_DIR, SEED_DIR.split("/")[0]):
        if (out_dir / name).exists():
            raise ValueError(
                f"{out_dir / name} exists but {out_dir} has no {MANIFEST_NAME}; "
                "pick another folder (or empty this one)"
            )
    return None


def generate_demo(
    out_dir: Path, count: int = 2000, seed: int = 0, progress: bool = False
) -> DemoManifest:
    """Write the demo corpus to `out_dir` (crawl/, seeds/demo/, manifest.json) and return it.

    Idempotent: a finished corpus with the same count and seed is returned as it is.
    """
    if count < MIN_COUNT:
        raise ValueError(f"demo count must be at least {MIN_COUNT}, got {count}")
    if seed < 0:
        raise ValueError(f"demo seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    existing = _check_folder(out_dir, count, seed)
    if existing is not None:
        return existing

    # Files are written to a staging folder and moved in at the end, so an interrupted run
    # leaves nothing that looks like a corpus; the next run clears it and starts over.
    staging = out_dir / ".demo-partial"
    if staging.exists():
        shutil.rmtree(staging)
    plan = _plan(seed, count, staging)
    files = []
    for item in tqdm(plan, desc="demo corpus", unit="file", disable=not progress):
        data = item.make()
        target = staging / item.entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        files.append(DemoFile(**item.entry, sha256=sha, **_header_facts(data)))

    for name in (CRAWL_DIR, SEED_DIR.split("/")[0]):
        (staging / name).rename(out_dir / name)
    manifest = DemoManifest(seed=seed, count=count, files=tuple(files))
    write_text(out_dir / MANIFEST_NAME, manifest.to_json())
    staging.rmdir()
    return manifest
