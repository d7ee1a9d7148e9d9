"""The copy model's training images: a folder, a glob, or a job's ingest shards, unlabelled,
decoded once and held small in memory for the run, with a fingerprint of their content.

A seeded share of the images is kept out of training for the model's self-calibration
(`calibrate`), so a model always comes with an operating point measured on images it never saw.
"""

import glob
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from tqdm import tqdm

from curate.settings import Settings
from curate.stages.ingest.decode import to_rgb
from curate.stages.ingest.sources import IMAGE_EXTENSIONS
from schemas.errors import DataError, NotFoundError
from schemas.job import StageName

_GLOB_CHARS = set("*?[")


class CorpusError(DataError, ValueError):
    """Training images that cannot be used: too few of them, or none decodable."""

    code = "copy_corpus_invalid"


class CorpusNotFound(NotFoundError, CorpusError):
    """A source that names no images: no such folder, no glob match, no such job."""

    code = "copy_corpus_not_found"


@dataclass
class Corpus:
    """Decoded training images (short side about `side`) and held-out images for calibration."""

    train: list[Image.Image]
    held_out: list[Image.Image]
    fingerprint: str  # SHA-256 over the images' content: same bytes, same fingerprint
    source: str
    skipped: int  # files that did not decode


def _image_files(source: str) -> list[Path] | None:
    """Image files named by a folder (recursive) or a glob; None when `source` is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise CorpusNotFound(f"{source}: folder holds no image files")
        return sorted(files)
    if _GLOB_CHARS & set(source):
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise CorpusNotFound(f"{source}: glob matches no image files")
        return sorted(files)
    return None


def _job_images(job_id: str, settings: Settings) -> list[tuple[str, bytes]]:
    """(image_id, bytes) of every distinct image a job ingested."""
    from curate.catalog import Catalog

    if not settings.catalog_file.exists():
        raise CorpusNotFound(
            f"{job_id!r} is not a folder or glob, and there is no catalog at "
            f"{settings.catalog_file} to look it up as a job id"
        )
    paths = Catalog(settings.catalog_file, settings.root).shard_paths(job_id, StageName.INGEST)
    if not paths:
        raise CorpusNotFound(f"{job_id!r} is not a folder, a glob, nor a job with ingest shards")
    found: dict[str, bytes] = {}
    for path in paths:
        table = pq.read_table(path, columns=["image_id", "image"])
        for image_id, image in zip(
            table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            # Repeats within a shard are stored without bytes: the first copy has them.
            if image["bytes"] is not None:
                found.setdefault(image_id, image["bytes"])
    return sorted(found.items())


def _small(data: bytes, side: int) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            if img.format == "JPEG":
                img.draft("RGB", (side, side))  # decoded at a reduced DCT scale: much faster
            # As `load_rgb` decodes for every stage: first frame, upright, RGB.
            img = to_rgb(ImageOps.exif_transpose(img)).copy()
    except Exception:  # an undecodable file is skipped and counted, never fatal
        return None
    scale = side / min(img.size)
    if scale < 1:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=2.0,
        )
    return img


def load_corpus(
    source: str,
    *,
    side: int,
    max_images: int,
    held_out_share: float = 0.1,
    max_held_out: int = 100,
    min_images: int = 8,
    seed: int = 0,
    settings: Settings | None = None,
    progress: bool = True,
) -> Corpus:
    """Decode the images `source` names (a folder, a glob or a job id), at most `max_images` of
    them (a seeded sample), each downscaled to a short side of `side` pixels."""
    files = _image_files(source)
    items = (
        files if files is not None else [d for _, d in _job_images(source, settings or Settings())]
    )
    return decode_corpus(
        items,
        source,
        side=side,
        max_images=max_images,
        held_out_share=held_out_share,
        max_held_out=max_held_out,
        min_images=min_images,
        seed=seed,
        progress=progress,
    )


def decode_corpus(
    items: list[Path | bytes],
    source: str,
    *,
    side: int,
    max_images: int,
    held_out_share: float = 0.1,
    max_held_out: int = 100,
    min_images: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Corpus:
    """`load_corpus` of image files or encoded images given one by one."""
    named = list(enumerate(items))
    rng = np.random.default_rng(seed)
    if len(named) > max_images:
        named = [named[i] for i in np.sort(rng.choice(len(named), max_images, replace=False))]
    images, digests, skipped = [], [], 0
    for _, item in tqdm(named, desc="copy model: images", unit="img", disable=not progress):
        data = item.read_bytes() if isinstance(item, Path) else item
        img = _small(data, side)
        if img is None:
            skipped += 1
            continue
        images.append(img)
        digests.append(hashlib.sha256(data).digest())
    if len(images) < min_images:
        raise CorpusError(
            f"{source}: {len(images)} decodable images ({skipped} skipped); "
            f"training needs at least {min_images}"
        )
    fingerprint = hashlib.sha256(b"".join(sorted(digests))).hexdigest()
    count = min(max_held_out, int(len(images) * held_out_share))
    held = set(rng.choice(len(images), count, replace=False).tolist()) if count >= 2 else set()
    return Corpus(
        train=[img for i, img in enumerate(images) if i not in held],
        held_out=[images[i] for i in sorted(held)],
        fingerprint=fingerprint,
        source=source,
        skipped=skipped,
    )
