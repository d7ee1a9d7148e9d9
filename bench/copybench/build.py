"""The copy benchmark built from the packages' pictures (`sources`): originals chosen, split into
two disjoint halves (tune, held-out) and a training pool, and every chosen original's copies
written with ground truth.

Selection, in order, every step seeded:
  1. content: a picture whose content (pixels away from its border colour) spans under 40% of
     its width or height, or covers under 2% of it, is a speck on a canvas: its copies are
     canvas too (a half crop of it is blank), so it cannot be labelled fairly. Dropped.
  2. label noise: two files of one picture (the same clip art filed under two topics, a left
     and a right arrow that are each other's mirror image, one drawing in red and in green)
     would be unlabelled copies: copy detection counts a recolouring as a copy, as DISC21 does.
     Pictures whose 32x32 colour thumbnails differ by an RMS under 0.02 (of the full range), or
     whose mean-free grey thumbnails correlate at 0.98 or more, as they are or mirrored, are one
     group; one of each is kept. Look-alikes below that (two flags that differ by an emblem, a
     clock at two times, one playing card in two designs) stay: they are the hard negatives.
  3. each category's pictures are shuffled and dealt in turn to tune and held-out (and, for
     artwork, a training pool), so both splits hold same-category look-alikes of every edited
     original.

A split holds its originals (edited or not) and the edits of `edited` of them, 14 each. Files
are stored as a crawl holds them: photographs as JPEG (quality 90), artwork as PNG, codec edits
in their codec. manifest.json lists every file with its source, edit, family and category.
"""

import hashlib
import io
import json
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from copybench.sources import MAX_SIDE, Candidate, candidates, fetch
from PIL import Image

from curate.copy_model.edits import EDITS, Edit
from curate.core.atomic import write_bytes, write_json
from curate.stages.dedup.grouping import connected_components
from curate.stages.ingest.decode import load_rgb

BUILD_VERSION = 3  # bump when selection or edits change: a cached build is rebuilt
SPLITS = ("tune", "heldout")
_INK_LEVEL = 24  # grey levels from the border colour that count as content
_MIN_SPAN = 0.4
_MIN_INK = 0.02
_SAME_PICTURE_RMS = 0.02
_RECOLOURED_CORRELATION = 0.98


@dataclass(frozen=True)
class Plan:
    """How many originals each split holds, per kind, and how many of them are edited."""

    photos: int = 300
    art: int = 300
    edited_photos: int = 100
    edited_art: int = 100
    seed: int = 0

    def fingerprint(self) -> str:
        text = json.dumps({**self.__dict__, "version": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _stored(img: Image.Image, kind: str) -> tuple[bytes, str]:
    out = io.BytesIO()
    if kind == "photo":
        img.save(out, "JPEG", quality=90)
        return out.getvalue(), "jpg"
    img.save(out, "PNG")
    return out.getvalue(), "png"


def _edited_file(img: Image.Image, edit: Edit, kind: str) -> tuple[bytes, str]:
    """The edited file: a codec edit is the original saved once with that codec."""
    if edit.codec is None:
        return _stored(edit.apply(img), kind)
    fmt, options = edit.codec
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue(), {"JPEG": "jpg", "WEBP": "webp"}[fmt]


def _normalised(candidate: Candidate) -> Image.Image:
    img = load_rgb(candidate.data)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img


def _has_content(img: Image.Image) -> bool:
    small = img.copy()
    small.thumbnail((256, 256))
    pixels = np.asarray(small, np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    ink = np.abs(pixels - np.median(border, axis=0)).max(axis=-1) > _INK_LEVEL
    if not ink.any():
        return False
    rows, cols = np.nonzero(ink)
    span_x = (cols.max() - cols.min() + 1) / ink.shape[1]
    span_y = (rows.max() - rows.min() + 1) / ink.shape[0]
    return min(span_x, span_y) >= _MIN_SPAN and ink.mean() >= _MIN_INK


def _thumbnail(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((32, 32), Image.Resampling.BOX), np.float32) / 255.0


def _unit_grey(thumbs: np.ndarray) -> np.ndarray:
    grey = (thumbs @ np.array([0.299, 0.587, 0.114], np.float32)).reshape(len(thumbs), -1)
    grey -= grey.mean(axis=1, keepdims=True)
    return grey / np.maximum(np.linalg.norm(grey, axis=1, keepdims=True), 1e-6)


def _one_per_picture(thumbs: np.ndarray) -> np.ndarray:
    """Indices of one member of each group of same-picture files (see the module docstring)."""
    n = len(thumbs)
    flat = thumbs.reshape(n, -1)
    squares = (flat * flat).sum(axis=1)
    grey = _unit_grey(thumbs)
    left, right = [], []
    for mirrored in (thumbs, thumbs[:, :, ::-1]):
        other = mirrored.reshape(n, -1)
        distance = squares[:, None] + squares[None, :] - 2.0 * flat @ other.T
        rms = np.sqrt(np.maximum(distance, 0.0) / flat.shape[1])
        recoloured = grey @ _unit_grey(mirrored).T >= _RECOLOURED_CORRELATION
        i, j = np.nonzero(np.triu((rms < _SAME_PICTURE_RMS) | recoloured, k=1))
        left.append(i)
        right.append(j)
    labels = connected_components(n, np.concatenate(left), np.concatenate(right))
    _, first = np.unique(labels, return_index=True)
    return np.sort(first)


def select(found: list[Candidate], plan: Plan) -> tuple[dict[str, list], list[Image.Image]]:
    """The originals of each split and of the training pool, as indices into `images`."""
    images, kept = [], []
    for candidate in found:
        img = _normalised(candidate)
        if _has_content(img):
            images.append(img)
            kept.append(candidate)
    unique = _one_per_picture(np.stack([_thumbnail(img) for img in images]))
    kept = [kept[i] for i in unique]
    images = [images[i] for i in unique]
    rng = np.random.default_rng(plan.seed)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, candidate in enumerate(kept):
        by_category[candidate.category].append(i)
    dealt: dict[str, dict[str, list[int]]] = {kind: defaultdict(list) for kind in ("photo", "art")}
    for category in sorted(by_category):
        members = by_category[category]
        rng.shuffle(members)
        for position, i in enumerate(members):
            # Photographs are scarce: all of them go to the two splits; artwork to a pool too.
            turns = SPLITS if kept[i].kind == "photo" else (*SPLITS, "pool")
            dealt[kept[i].kind][turns[position % len(turns)]].append(i)
    chosen: dict[str, list] = {"pool": []}
    for split in SPLITS:
        photos = _take(dealt["photo"][split], plan.photos, rng)
        art = _take(dealt["art"][split], plan.art, rng)
        # Unused photographs train the copy model; the pool is mostly artwork otherwise.
        chosen["pool"] += [i for i in dealt["photo"][split] if i not in set(photos)]
        edited = photos[: plan.edited_photos] + art[: plan.edited_art]
        chosen[split] = [(i, i in set(edited)) for i in sorted(photos + art)]
    chosen["pool"] += dealt["photo"]["pool"] + dealt["art"]["pool"]
    for split in SPLITS:
        chosen["pool"] += [i for i in dealt["art"][split] if i not in {j for j, _ in chosen[split]}]
    return {"candidates": kept, **chosen}, images


def _take(members: list[int], count: int, rng: np.random.Generator) -> list[int]:
    picked = list(members)
    rng.shuffle(picked)
    return picked[:count]


def _write_split(out: Path, name: str, originals: list, kept: list, images: list) -> list[dict]:
    rows = []
    for number, (i, edited) in enumerate(originals):
        candidate, img = kept[i], images[i]
        source = f"{name}-{number:04d}"
        data, ext = _stored(img, candidate.kind)
        write_bytes(out / f"{source}.{ext}", data)
        base = {
            "source": source,
            "category": candidate.category,
            "kind": candidate.kind,
            "origin": candidate.key,
        }
        rows.append({"file": f"{source}.{ext}", "edit": "", "family": "", **base})
        if not edited:
            continue
        for k, edit in enumerate(EDITS):
            data, ext = _edited_file(img, edit, candidate.kind)
            write_bytes(out / f"{source}-e{k:02d}.{ext}", data)
            rows.append(
                {
                    "file": f"{source}-e{k:02d}.{ext}",
                    "edit": edit.name,
                    "family": edit.family,
                    **base,
                }
            )
    return rows


def build(work: Path, plan: Plan = Plan(), log=print) -> Path:
    """Fetch, select and write the benchmark under work/<fingerprint>/; reuse a finished one."""
    out = work / f"build-{plan.fingerprint()}"
    if (out / "manifest.json").exists():
        return out
    root = fetch(work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        found = candidates(root)
        log(f"[copybench] {len(found)} candidate pictures; selecting")
        chosen, images = select(found, plan)
    kept = chosen["candidates"]
    manifest = {"plan": plan.__dict__, "version": BUILD_VERSION, "splits": {}}
    for split in SPLITS:
        rows = _write_split(out / split, split, chosen[split], kept, images)
        manifest["splits"][split] = rows
        log(f"[copybench] {split}: {len(chosen[split])} originals, {len(rows)} files")
    pool = []
    for number, i in enumerate(sorted(chosen["pool"])):
        data, ext = _stored(images[i], kept[i].kind)
        write_bytes(out / "pool" / f"pool-{number:05d}.{ext}", data)
        pool.append(
            {
                "file": f"pool-{number:05d}.{ext}",
                "category": kept[i].category,
                "kind": kept[i].kind,
                "origin": kept[i].key,
            }
        )
    manifest["pool"] = pool
    log(f"[copybench] training pool: {len(pool)} pictures")
    write_json(out / "manifest.json", manifest)
    return out
