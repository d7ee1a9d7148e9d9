"""Near-duplicate and copy detection, measured on the library functions directly (no pipeline).

  1. quality: the PCA hash (hash_features_batch, PCAHasher.fit, near_duplicate_pairs at the
     module's default radius, connected_components) against imagededup's PHash at its default
     threshold, on demo originals and 15 known edits of a subset of them;
  2. speed: hash + group wall time on 20,000 synthetic images, ours against PHash, same images;
  3. grouping: near_duplicate_pairs + connected_components on 1M and 10M random 64-bit codes;
  4. copy graph: copy_edges (IVF-PQ above 200k rows) on 1M random 512-d float16 descriptors
     with planted copies, its edge recall against exact search.

Sections 3 and 4 run each scale in a fresh process and read its peak RSS around the call.
Writes bench/results/dedup.json and bench/results/dedup.md. `--sections` runs a subset: the
others are carried over from the previous results file, marked with the code they measured,
and a re-run quality section is compared with the previous one.
"""

import argparse
import io
import json
import multiprocessing
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
from measuring import (
    code_line,
    code_version,
    in_fresh_process,
    met,
    reset_peak_rss,
    status_mib,
    timed,
)
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from curate.demo import FileKind, generate_demo, planted_counts
from curate.stages.dedup.grouping import connected_components
from curate.stages.dedup.knn_graph import EXACT_BELOW, copy_edges
from curate.stages.dedup.pca_hash.basis import PCAHasher
from curate.stages.dedup.pca_hash.features import hash_features_batch
from curate.stages.dedup.pca_hash.search import (
    HAMMING_RADIUS,
    PHASH_RADIUS,
    near_duplicate_pairs,
    search_radii,
)
from curate.stages.ingest.decode import load_rgb
from schemas.job import DedupOptions

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"

TARGETS = {
    "photometric recall": 0.95,
    "pair precision": 0.98,
    "speedup vs PHash": 5.0,
    "10x codes time growth": 15.0,
    "IVF edge recall": 0.95,
}
COPY_THRESHOLD = 0.6  # copy_edges' default
# The hash as the dedup stage runs it by default (128-bit codes, candidates word by word).
STAGE_OPTIONS = DedupOptions()
COPY_COSINE = (0.75, 0.9)  # planted copies' cosine to their source
# The library code under test; its hashes are recorded, as the working tree may differ from HEAD.
MEASURED = (
    "curate/stages/dedup/pca_hash/features.py",
    "curate/stages/dedup/pca_hash/basis.py",
    "curate/stages/dedup/pca_hash/codes.py",
    "curate/stages/dedup/pca_hash/tables.py",
    "curate/stages/dedup/pca_hash/search.py",
    "curate/stages/dedup/grouping.py",
    "curate/stages/dedup/knn_graph.py",
)
RSS_NOTE = (
    "Memory: peak RSS during the call (VmHWM of /proc/self/status, reset with "
    "/proc/self/clear_refs just before it; not getrusage, whose ru_maxrss a spawned process "
    "inherits from its parent, nor tracemalloc, which misses faiss's and scipy's C++ "
    "allocations), and in brackets the RSS just before the call, inputs built."
)


# -- small helpers ---------------------------------------------------------------------------------


def _pair_count(keys: np.ndarray) -> int:
    """Unordered pairs of items that share a key."""
    sizes = np.unique(keys, return_counts=True)[1].astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def _pair_keys(left: np.ndarray, right: np.ndarray, n: int) -> np.ndarray:
    """One int64 per unordered pair, for set membership tests."""
    left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
    return np.minimum(left, right) * n + np.maximum(left, right)


# -- the two methods under test --------------------------------------------------------------------


class Grouped(NamedTuple):
    labels: np.ndarray  # group label per image
    left: np.ndarray  # the raw pairs the groups were built from
    right: np.ndarray
    seconds: dict  # per step, and "total"


# The images the forked hashing processes read: inherited at fork, never pickled.
_POOL_IMAGES: list[Image.Image] = []


def _our_features(bounds: tuple[int, int]) -> np.ndarray:
    return hash_features_batch(_POOL_IMAGES[bounds[0] : bounds[1]])


def _phash_hashes(bounds: tuple[int, int]) -> list[str]:
    from imagededup.methods import PHash  # lazy: it pulls in torch (see `machine`)

    hasher = PHash(verbose=False)
    images = _POOL_IMAGES[bounds[0] : bounds[1]]
    return [hasher.encode_image(image_array=np.asarray(img)) for img in images]


def in_processes(fn: Callable, images: list[Image.Image], workers: int) -> list:
    """fn over contiguous slices of `images` in `workers` forked processes, results in order.

    Both methods hash this way: one single-threaded process per core is how the dedup stage
    runs (a Ray task per part), and threads only slow these many short calls down (GIL).
    """
    global _POOL_IMAGES
    _POOL_IMAGES = images
    step = max(1, -(-len(images) // (8 * workers)))
    slices = [(i, min(i + step, len(images))) for i in range(0, len(images), step)]
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(fn, slices)
    finally:
        _POOL_IMAGES = []


def pca_hash_features(images: list[Image.Image], workers: int) -> np.ndarray:
    return np.concatenate(in_processes(_our_features, images, workers))


def pca_hash_groups(images: list[Image.Image], workers: int) -> Grouped:
    """Our path, step by step."""
    seconds = {}
    features, seconds["features"] = timed(pca_hash_features, images, workers)
    hasher, seconds["fit"] = timed(PCAHasher.fit, features, bits=STAGE_OPTIONS.hash_bits)
    codes, seconds["codes"] = timed(hasher.codes, features)
    radius, word = search_radii(STAGE_OPTIONS)
    (left, right, _), seconds["pairs"] = timed(
        near_duplicate_pairs, codes, radius, word_radius=word
    )
    labels, seconds["components"] = timed(connected_components, len(images), left, right)
    seconds["total"] = sum(seconds.values())
    return Grouped(labels, left, right, seconds)


def phash_encode(images: list[Image.Image], workers: int) -> list[str]:
    """imagededup's PHash of each image, from the decoded pixels, in the same processes as ours.

    imagededup has no in-memory batch call (encode_images wants a folder).
    """
    return [h for part in in_processes(_phash_hashes, images, workers) for h in part]


def phash_search(hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """imagededup's find_duplicates at its default threshold, as (left, right) index pairs."""
    from imagededup.methods import PHash

    found = PHash(verbose=False).find_duplicates(
        encoding_map={str(i): h for i, h in enumerate(hashes)},
        max_distance_threshold=PHASH_RADIUS,  # imagededup's default, 10
    )
    left = [int(a) for a, dups in found.items() for _ in dups]
    right = [int(b) for dups in found.values() for b in dups]
    return np.asarray(left, np.int64), np.asarray(right, np.int64)


def phash_groups(images: list[Image.Image], workers: int) -> Grouped:
    seconds = {}
    hashes, seconds["encode"] = timed(phash_encode, images, workers)
    (left, right), seconds["find_duplicates"] = timed(phash_search, hashes)
    labels, seconds["components"] = timed(connected_components, len(images), left, right)
    seconds["total"] = sum(seconds.values())
    return Grouped(labels, left, right, seconds)


# -- 1. quality on known edits ---------------------------------------------------------------------


def _reencoded(img: Image.Image, fmt: str, **options) -> Image.Image:
    """Saved and decoded again, as the pipeline would see the edited file."""
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return load_rgb(out.getvalue())


def _brightness(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: ImageEnhance.Brightness(img).enhance(factor)


def _contrast(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: ImageEnhance.Contrast(img).enhance(factor)


def _central_crop(keep: float) -> Callable[[Image.Image], Image.Image]:
    """The centred box of `keep` times the width and the height."""

    def crop(img: Image.Image) -> Image.Image:
        w, h = img.size
        cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.crop((left, top, left + cw, top + ch))

    return crop


def _text_overlay(img: Image.Image) -> Image.Image:
    """A white caption with a dark outline across the lower third, about 1/8 of the height."""
    out = img.copy()
    font = ImageFont.load_default(size=max(10, img.height // 8))
    ImageDraw.Draw(out).text(
        (img.width * 0.05, img.height * 0.62),
        "(c) lvd-curate 2024",
        font=font,
        fill=(255, 255, 255),
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return out


def _padded(img: Image.Image) -> Image.Image:
    """Black border of 5% of the side on every edge: 10% wider and taller."""
    dx, dy = round(img.width * 0.05), round(img.height * 0.05)
    return ImageOps.expand(img, border=(dx, dy, dx, dy), fill=(0, 0, 0))


PHOTOMETRIC = {
    "resize 50%": lambda img: img.resize(
        (max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS
    ),
    "JPEG q30": lambda img: _reencoded(img, "JPEG", quality=30),
    "WebP q80": lambda img: _reencoded(img, "WEBP", quality=80),
    "brightness +30%": _brightness(1.3),
    "brightness -30%": _brightness(0.7),
    "contrast +30%": _contrast(1.3),
    "contrast -30%": _contrast(0.7),
    "Gaussian blur r2": lambda img: img.filter(ImageFilter.GaussianBlur(2)),
    "greyscale": lambda img: ImageOps.grayscale(img).convert("RGB"),
}
GEOMETRIC = {
    "crop 10%": _central_crop(0.9),
    "text overlay": _text_overlay,
    "horizontal flip": ImageOps.mirror,
    "crop 50%": _central_crop(0.5),
    "rotate 10°": lambda img: img.rotate(10, resample=Image.Resampling.BICUBIC),
    "pad 10%": _padded,
}
EDITS = {**PHOTOMETRIC, **GEOMETRIC}


def demo_originals(count: int) -> list[Image.Image]:
    """The first `count` originals of the smallest demo corpus that has that many."""
    kind = FileKind.ORIGINAL
    total = next(n for n in range(count, 2 * count + 100) if planted_counts(n)[kind] >= count)
    folder = WORK / "demo-dedup" / f"count-{total}"
    manifest = generate_demo(folder, count=total)
    files = sorted(manifest.by_kind(kind), key=lambda f: f.path)[:count]
    return [load_rgb((folder / f.path).read_bytes()) for f in files]


def copy_set(
    originals: list[Image.Image], edited: int, seed: int
) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """Originals, then every edit of `edited` of them: (images, source index, edit name or "")."""
    chosen = np.sort(np.random.default_rng(seed).choice(len(originals), edited, replace=False))
    images = list(originals)
    source = list(range(len(originals)))
    edit = [""] * len(originals)
    for s in chosen.tolist():
        for name, apply in EDITS.items():
            images.append(apply(originals[s]))
            source.append(s)
            edit.append(name)
    return images, np.asarray(source), np.asarray(edit)


def _false_raw_pairs(grouped: Grouped, source: np.ndarray, edit: np.ndarray) -> dict[str, int]:
    """Raw pairs joining two different originals, counted by the edits at their two ends: what
    merged unrelated groups."""
    wrong = source[grouped.left] != source[grouped.right]
    ends = np.sort(np.stack([edit[grouped.left[wrong]], edit[grouped.right[wrong]]]), axis=0)
    kinds = Counter(f"{a or 'original'} x {b or 'original'}" for a, b in ends.T.tolist())
    return dict(kinds.most_common())


def group_scores(grouped: Grouped, source: np.ndarray, edit: np.ndarray) -> dict:
    """Pairs inside predicted groups against pairs of one source (originals come first, so an
    edit of source s is found when it shares its group with row s)."""
    labels = grouped.labels
    both = labels.astype(np.int64) * (int(source.max()) + 1) + source
    true_pairs, predicted, correct = _pair_count(both), _pair_count(labels), _pair_count(source)
    per_edit = {}
    for name in EDITS:
        rows = np.flatnonzero(edit == name)
        if rows.size:
            per_edit[name] = float(np.mean(labels[rows] == labels[source[rows]]))
    photometric = np.isin(edit, list(PHOTOMETRIC))
    geometric = np.isin(edit, list(GEOMETRIC))
    # np.mean of an empty selection (the photometric-only set has no geometric edits) is NaN.
    return {
        "predicted_pairs": predicted,
        "true_pairs_found": true_pairs,
        "ground_truth_pairs": correct,
        "pair_precision": true_pairs / predicted if predicted else 1.0,
        "pair_recall": true_pairs / correct if correct else 1.0,
        "photometric_recall": float(np.mean(labels[photometric] == labels[source[photometric]])),
        "geometric_recall": float(np.mean(labels[geometric] == labels[source[geometric]]))
        if geometric.any()
        else None,
        "per_edit_recall": per_edit,
        "false_raw_pairs": _false_raw_pairs(grouped, source, edit),
        "seconds": grouped.seconds,
    }


def quality(args: argparse.Namespace) -> dict:
    """Both methods on two sets: originals + photometric edits, where the targets apply, and
    originals + all edits. The PCA basis is fitted on whichever set is hashed."""
    originals, generate_s = timed(demo_originals, args.originals)
    images, source, edit = copy_set(originals, args.edited, args.seed)
    radius, word = search_radii(STAGE_OPTIONS)
    out = {
        "originals": len(originals),
        "edited_originals": args.edited,
        "demo_generation_s": generate_s,
        "bits": STAGE_OPTIONS.hash_bits,
        "radius": radius,
        "word_radius": word,
    }
    photometric = np.flatnonzero(~np.isin(edit, list(GEOMETRIC)))
    for name, rows in (("photometric", photometric), ("all", np.arange(len(images)))):
        subset = [images[i] for i in rows]
        out[name] = {"images": len(rows)}
        for method, run in (("pca_hash", pca_hash_groups), ("phash", phash_groups)):
            out[name][method] = group_scores(run(subset, args.workers), source[rows], edit[rows])
    return out


# -- 0. real images: copybench ---------------------------------------------------------------------


def real(args: argparse.Namespace) -> dict:
    """Our hash pass against imagededup's PHash and DHash on copybench's two splits (real
    photographs and clip art, bench/copybench), as the dedup stage runs it by default."""
    from copybench.build import Plan, build
    from copybench.methods import compare_hashes
    from copybench.score import load_split

    folder = build(WORK / "copybench", Plan())
    out = {"build": folder.name}
    for name in ("tune", "heldout"):
        split = load_split(folder, name)
        scores = compare_hashes(split, STAGE_OPTIONS)
        scores.pop("_pairs")
        out[name] = {"files": len(split), **scores}
    return out


def real_lines(r: dict) -> list[str]:
    from copybench.report import _edits_table, _methods_table

    ours = r["heldout"]["pca_hash"]
    lines = [
        "## 0. Quality on real images: copybench (photographs and clip art from Debian's image "
        "packages)",
        "",
        f"Build `{r['build']}` (bench/copybench/build.py): {r['tune']['files']} files in the tune "
        f"split, where the defaults were chosen, and {r['heldout']['files']} in the held-out "
        "split, which confirms them; 14 edits per edited original and same-topic look-alikes "
        "as hard negatives (bench/results/copybench.md has the copy model too). Our hash pass "
        f"as the dedup stage runs it: {ours['bits']}-bit codes, pairs within Hamming "
        f"{ours['radius']}, candidates within {ours['word_radius']} on either 64-bit word.",
    ]
    for split in ("heldout", "tune"):
        lines += ["", f"### {split}", "", *_methods_table(r[split]), "", *_edits_table(r[split])]
    return lines


# -- 2. speed on 20k images ------------------------------------------------------------------------


def _synthetic_image(seed: int, index: int) -> Image.Image:
    """A distinct smooth random picture, 128-256 px a side: a random coarse grid, upscaled."""
    rng = np.random.default_rng((seed, index))
    w, h = (int(v) for v in rng.integers(128, 257, size=2))
    cell = int(rng.integers(10, 24))
    coarse = rng.integers(0, 256, size=(h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)


PLANTED_EDITS = (
    lambda img: _reencoded(img, "JPEG", quality=50),
    _brightness(1.2),
    lambda img: img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.LANCZOS),
    _contrast(0.8),
)


def synthetic_corpus(count: int, share: float, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """`count` images: distinct ones, then `share` of the count as photometric edits of them."""
    planted = round(count * share)
    distinct = count - planted
    images = [_synthetic_image(seed, i) for i in range(distinct)]
    sources = np.random.default_rng(seed).choice(distinct, planted, replace=False)
    for k, s in enumerate(sources.tolist()):
        images.append(PLANTED_EDITS[k % len(PLANTED_EDITS)](images[s]))
    return images, np.concatenate([np.arange(distinct), sources])


def _planted_scores(labels: np.ndarray, source: np.ndarray) -> dict:
    copies = np.flatnonzero(source != np.arange(len(source)))
    return {
        "planted_recall": float(np.mean(labels[copies] == labels[source[copies]])),
        "pair_precision": _pair_count(labels.astype(np.int64) * len(source) + source)
        / max(1, _pair_count(labels)),
    }


def _quadratic_fit(measured: dict[int, float]) -> tuple[float, float]:
    """a + b N^2 through the two largest measured sizes (start-up cost + all-pairs search)."""
    if len(measured) < 2:  # a set too small for two probes: pure N^2 through what there is
        n, t = max(measured.items(), default=(1, 0.0))
        return 0.0, t / n**2
    (n1, t1), (n2, t2) = sorted(measured.items())[-2:]
    b = max((t2 - t1) / (n2**2 - n1**2), 0.0)
    return max(t1 - b * n1**2, 0.0), b


def phash_search_timed(hashes: list[str], args: argparse.Namespace) -> dict:
    """find_duplicates on every hash if small probes predict it fits `phash_budget`; otherwise
    at `phash_sizes` only, extrapolated to the full count with the same fit."""
    n = len(hashes)
    probes = {k: timed(phash_search, hashes[:k])[1] for k in args.phash_probes if k < n}
    a, b = _quadratic_fit(probes)
    out = {"probes_s": probes, "predicted_full_s": a + b * n**2}
    if out["predicted_full_s"] <= args.phash_budget:
        out["pairs"], out["full_s"] = timed(phash_search, hashes)
        out["extrapolated"] = False
        return out
    out["measured_s"] = {k: timed(phash_search, hashes[:k])[1] for k in args.phash_sizes}
    a, b = _quadratic_fit(out["measured_s"])
    out["full_s"], out["extrapolated"], out["fit"] = a + b * n**2, True, {"a": a, "b": b}
    return out


def speed(args: argparse.Namespace) -> dict:
    (images, source), generate_s = timed(
        synthetic_corpus, args.speed_count, args.planted_share, args.seed
    )
    ours = pca_hash_groups(images, args.workers)
    hashes, encode_s = timed(phash_encode, images, args.workers)
    search = phash_search_timed(hashes, args)
    phash = {"encode_s": encode_s, "find_duplicates_s": search["full_s"], "search": search}
    if not search["extrapolated"]:
        labels, phash["components_s"] = timed(
            connected_components, len(images), *search.pop("pairs")
        )
        phash.update(_planted_scores(labels, source))
    phash["total_s"] = encode_s + search["full_s"] + phash.get("components_s", 0.0)
    return {
        "images": len(images),
        "planted": int(np.sum(source != np.arange(len(source)))),
        "generation_s": generate_s,
        "workers": args.workers,
        "pca_hash": {"seconds": ours.seconds, **_planted_scores(ours.labels, source)},
        "phash": phash,
        "speedup": phash["total_s"] / ours.seconds["total"],
    }


# -- 3. grouping alone on random codes -------------------------------------------------------------


def planted_codes(n: int, share: float, radius: int, seed: int) -> tuple[np.ndarray, ...]:
    """n random 64-bit codes; `share` of them copies of another with 1..radius bits flipped."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    m = round(n * share)
    rows = rng.choice(n, 2 * m, replace=False)
    sources, copies = rows[:m], rows[m:]
    flips = rng.integers(1, radius + 1, size=m)
    for start in range(0, m, 1 << 16):  # bounded memory: 64 bits x 65k rows at a time
        stop = min(start + (1 << 16), m)
        order = np.argsort(rng.random((stop - start, 64)), axis=1).astype(np.uint64)
        chosen = np.arange(64)[None, :] < flips[start:stop, None]
        masks = np.bitwise_or.reduce(np.where(chosen, np.uint64(1) << order, 0), axis=1)
        words[copies[start:stop]] = words[sources[start:stop]] ^ masks.astype(np.uint64)
    return words.view(np.uint8).reshape(n, 8), sources, copies


def grouping_run(n: int, share: float, seed: int) -> dict:
    """One scale, meant for a fresh process (see `in_fresh_process`)."""
    codes, sources, copies = planted_codes(n, share, HAMMING_RADIUS, seed)
    rss_before = status_mib("VmRSS")
    reset_peak_rss()
    (left, right, _), pairs_s = timed(near_duplicate_pairs, codes, HAMMING_RADIUS)
    labels, components_s = timed(connected_components, n, left, right)
    peak = status_mib("VmHWM")
    found = np.isin(_pair_keys(sources, copies, n), _pair_keys(left, right, n))
    return {
        "codes": n,
        "planted_pairs": int(len(sources)),
        "pairs_found": int(len(left)),
        "pairs_s": pairs_s,
        "components_s": components_s,
        "total_s": pairs_s + components_s,
        "planted_pair_recall": float(found.mean()),
        "planted_group_recall": float(np.mean(labels[sources] == labels[copies])),
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
    }


def grouping(args: argparse.Namespace) -> dict:
    runs = [in_fresh_process(grouping_run, n, 0.01, args.seed) for n in args.grouping_sizes]
    small, large = runs[0], runs[-1]
    return {
        "radius": HAMMING_RADIUS,
        "runs": runs,
        "size_factor": large["codes"] / small["codes"],
        "time_factor": large["total_s"] / small["total_s"],
    }


# -- 4. kNN copy graph -----------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_descriptors(n: int, dim: int, share: float, seed: int) -> tuple[np.ndarray, ...]:
    """n random unit float16 rows; `share` of them replaced by a copy of another row at a cosine
    drawn from COPY_COSINE (source plus orthogonal noise)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float16)
    for start in range(0, n, 1 << 16):
        block = rng.standard_normal((min(1 << 16, n - start), dim), dtype=np.float32)
        x[start : start + len(block)] = _unit_rows(block)
    m = round(n * share)
    rows = rng.choice(n, 2 * m, replace=False)
    sources, copies = rows[:m], rows[m:]
    cosine = rng.uniform(*COPY_COSINE, size=m).astype(np.float32)[:, None]
    base = x[sources].astype(np.float32)
    noise = rng.standard_normal((m, dim), dtype=np.float32)
    noise = _unit_rows(noise - np.sum(noise * base, axis=1, keepdims=True) * base)
    x[copies] = _unit_rows(cosine * base + np.sqrt(1 - cosine**2) * noise)
    return x, sources, copies


def exact_edges(x: np.ndarray, queries: np.ndarray, threshold: float) -> np.ndarray:
    """Pair keys of every (query, row) with exact cosine > threshold, the query itself excluded:
    brute force of the query rows against all rows, one block of rows at a time."""
    q = x[queries].astype(np.float32)
    keys = []
    for start in range(0, len(x), 1 << 16):
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[start : start + (1 << 16)].astype(np.float32))
        lims, _, found = index.range_search(q, threshold)
        left = np.repeat(queries, np.diff(lims).astype(np.int64))
        right = found.astype(np.int64) + start
        keys.append(_pair_keys(left[left != right], right[left != right], len(x)))
    return np.unique(np.concatenate(keys))


def knn_run(n: int, dim: int, share: float, exact_queries: int, seed: int) -> dict:
    """One copy_edges run, meant for a fresh process (see `in_fresh_process`)."""
    x, sources, copies = planted_descriptors(n, dim, share, seed)
    rss_before = status_mib("VmRSS")
    reset_peak_rss()
    (left, right, _), edges_s = timed(copy_edges, x, threshold=COPY_THRESHOLD)
    peak = status_mib("VmHWM")
    found = _pair_keys(left, right, n)
    planted = _pair_keys(sources, copies, n)
    cosine = np.sum(x[sources].astype(np.float32) * x[copies].astype(np.float32), axis=1)
    hit = np.isin(planted, found)
    bins = np.linspace(*COPY_COSINE, 4)
    by_cosine = {
        f"{lo:.2f}-{hi:.2f}": float(hit[(cosine >= lo) & (cosine < hi)].mean())
        for lo, hi in zip(bins[:-1], bins[1:], strict=True)
    }
    # Exact search of a random query subset against every row: are there true edges besides the
    # planted ones, and does the IVF-PQ graph hold them?
    queries = np.sort(np.random.default_rng(seed + 1).choice(n, exact_queries, replace=False))
    truth, exact_s = timed(exact_edges, x, queries, COPY_THRESHOLD)
    touching = np.isin(found // n, queries) | np.isin(found % n, queries)
    return {
        "descriptors": n,
        "dim": dim,
        "index": "flat (exact)" if n < EXACT_BELOW else "IVF-PQ",
        "planted_pairs": int(len(planted)),
        "planted_cosine_range": [float(cosine.min()), float(cosine.max())],
        "edges_found": int(len(found)),
        "copy_edges_s": edges_s,
        "planted_recall": float(hit.mean()),
        "planted_recall_by_cosine": by_cosine,
        "exact_queries": int(exact_queries),
        "exact_search_s": exact_s,
        "exact_edges_of_queries": int(len(truth)),
        "exact_edges_not_planted": int(np.sum(~np.isin(truth, planted))),
        "query_edge_recall": float(np.isin(truth, found).mean()) if len(truth) else 1.0,
        "query_edges_not_exact": int(np.sum(~np.isin(found[touching], truth))),
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
    }


def knn(args: argparse.Namespace) -> dict:
    return in_fresh_process(knn_run, args.knn_size, 512, 0.01, args.exact_queries, args.seed)


# -- report ----------------------------------------------------------------------------------------


def _quality_row(label: str, values: list[float | None], target: str, met: str) -> str:
    cells = " | ".join("" if v is None else f"{v:.3f}" for v in values)
    return f"| {label} | {cells} | {target} | {met} |"


def _false_pairs_text(scores: dict) -> str:
    top = list(scores["false_raw_pairs"].items())[:3]
    return ", ".join(f"{kind}: {count}" for kind, count in top) or "none"


def quality_lines(q: dict) -> list[str]:
    photo, every = q["photometric"], q["all"]
    # Column order: PCA hash and PHash on the photometric set, then on the set with every edit.
    columns = [(photo, "pca_hash"), (photo, "phash"), (every, "pca_hash"), (every, "phash")]

    def values(key: str) -> list[float | None]:
        return [part[method][key] for part, method in columns]

    ours, theirs = photo["pca_hash"], photo["phash"]
    precision_ok = ours["pair_precision"] >= TARGETS["pair precision"]
    recall_ok = ours["photometric_recall"] >= TARGETS["photometric recall"]
    lines = [
        f"## 1. Quality: {q['originals']} demo originals, {q['edited_originals']} of them edited",
        "",
        "Ground truth: two images are duplicates when they come from the same original (an edit "
        "and its original, and two edits of one original); the unedited originals are distinct "
        "distractors. Both methods are scored on **pairs inside predicted groups** (connected "
        "components of their raw pairs, which is what dedup acts on). Per-edit recall: the edit "
        "shares a group with its original. Two sets, each hashed on its own (the PCA basis is "
        f"fitted on the set): the originals plus the {len(PHOTOMETRIC)} photometric / "
        f"re-encoding edits ({photo['images']} images; the targets apply here), and the "
        f"originals plus all {len(EDITS)} edits ({every['images']} images).",
        "",
        f"PCA hash as the dedup stage runs it by default: {q.get('bits', 64)}-bit codes within "
        f"Hamming {q.get('radius', HAMMING_RADIUS)}"
        + (
            f" (candidates within {q['word_radius']} on either 64-bit word)"
            if q.get("word_radius")
            else ""
        )
        + f"; PHash at its default threshold {PHASH_RADIUS}.",
        "",
        "| metric | PCA hash, photometric set | PHash, photometric set | PCA hash, all edits "
        "| PHash, all edits | target (photometric set) | met |",
        "|---|---:|---:|---:|---:|---|---|",
        _quality_row(
            "pair precision",
            values("pair_precision"),
            f"≥ {TARGETS['pair precision']}, > PHash",
            met(precision_ok and ours["pair_precision"] > theirs["pair_precision"]),
        ),
        _quality_row("pair recall, all pairs", values("pair_recall"), "", ""),
        _quality_row(
            "recall, photometric + re-encoding edits",
            values("photometric_recall"),
            f"≥ {TARGETS['photometric recall']}, > PHash",
            met(recall_ok and ours["photometric_recall"] > theirs["photometric_recall"]),
        ),
        _quality_row("recall, geometric edits", values("geometric_recall"), "", ""),
    ]
    for group, edits in (("photometric", PHOTOMETRIC), ("geometric", GEOMETRIC)):
        for name in edits:
            recall = [part[method]["per_edit_recall"].get(name) for part, method in columns]
            lines.append(_quality_row(f"recall: {name} ({group})", recall, "", ""))
    pairs = " | ".join(
        f"{part[method]['predicted_pairs']} ({part[method]['true_pairs_found']})"
        for part, method in columns
    )
    truth = f"{photo['pca_hash']['ground_truth_pairs']} / {every['pca_hash']['ground_truth_pairs']}"
    seconds = " | ".join(f"{part[method]['seconds']['total']:.2f}" for part, method in columns)
    lines += [
        f"| predicted pairs (true) | {pairs} | true pairs: {truth} | |",
        f"| seconds, hash + group | {seconds} | | |",
        "",
        "Raw pairs joining two different originals, by the edits at their ends (top 3):",
        "",
    ]
    for part_name, part in (("photometric set", photo), ("all edits", every)):
        for method, label in (("pca_hash", "PCA hash"), ("phash", "PHash")):
            lines.append(f"- {label}, {part_name}: {_false_pairs_text(part[method])}")
    return lines


def speed_lines(s: dict) -> list[str]:
    ours, theirs = s["pca_hash"], s["phash"]
    ours_s, search = ours["seconds"], theirs["search"]
    hash_s = ours_s["features"] + ours_s["fit"] + ours_s["codes"]
    group_s = ours_s["pairs"] + ours_s["components"]
    their_group = theirs["find_duplicates_s"] + theirs.get("components_s", 0.0)
    recall = f"{theirs['planted_recall']:.3f}" if "planted_recall" in theirs else "n/a"
    precision = f"{theirs['pair_precision']:.3f}" if "pair_precision" in theirs else "n/a"
    lines = [
        f"## 2. Speed: hash + group {s['images']} images ({s['planted']} planted near "
        f"duplicates), {s['workers']} processes each",
        "",
        "Same decoded PIL images (128-256 px) in memory for both; decoding is not timed. Ours: "
        "hash_features_batch over slices of the images in forked single-threaded processes (as "
        "the dedup stage runs one task per core), PCAHasher.fit on all, codes, "
        "near_duplicate_pairs, connected_components. PHash: encode_image(image_array=...) per "
        "image in the same processes, find_duplicates(encoding_map=...) at threshold 10 (its own "
        "process pool), connected_components on its pairs.",
        "",
        "| method | hash s | search + group s | total s | planted recall | pair precision |",
        "|---|---:|---:|---:|---:|---:|",
        f"| PCA hash | {hash_s:.2f} | {group_s:.2f} | {ours_s['total']:.2f} | "
        f"{ours['planted_recall']:.3f} | {ours['pair_precision']:.3f} |",
        f"| PHash (imagededup) | {theirs['encode_s']:.2f} | {their_group:.2f}"
        f"{' (extrapolated)' if search['extrapolated'] else ''} | {theirs['total_s']:.2f} | "
        f"{recall} | {precision} |",
        "",
        "| ratio | value | target | met |",
        "|---|---:|---|---|",
        f"| PHash total / PCA-hash total | {s['speedup']:.1f}x | ≥ {TARGETS['speedup vs PHash']}x"
        f" | {met(s['speedup'] >= TARGETS['speedup vs PHash'])} |",
        "",
    ]
    probes = ", ".join(f"{n}: {t:.1f} s" for n, t in search["probes_s"].items())
    if search["extrapolated"]:
        measured = ", ".join(f"{n}: {t:.1f} s" for n, t in search["measured_s"].items())
        lines.append(
            f"find_duplicates was too slow to run on all {s['images']} within the budget "
            f"(probes {probes}; predicted {search['predicted_full_s']:.0f} s): measured at "
            f"{measured} and **extrapolated** as a + b N^2."
        )
    else:
        lines.append(
            f"find_duplicates measured on all {s['images']} hashes (probes {probes} predicted "
            f"{search['predicted_full_s']:.0f} s)."
        )
    return lines


def grouping_lines(g: dict) -> list[str]:
    lines = [
        f"## 3. Grouping alone: random 64-bit codes, 1% planted copies within radius {g['radius']}",
        "",
        f"Each scale runs in a fresh process. {RSS_NOTE}",
        "",
        "| codes | planted pairs | pairs found | near_duplicate_pairs s | connected_components s "
        "| total s | peak RSS MiB (before call) | planted pair recall | planted group recall |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in g["runs"]:
        lines.append(
            f"| {r['codes']:,} | {r['planted_pairs']:,} | {r['pairs_found']:,} | "
            f"{r['pairs_s']:.2f} | {r['components_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) | "
            f"{r['planted_pair_recall']:.4f} | {r['planted_group_recall']:.4f} |"
        )
    target = TARGETS["10x codes time growth"]
    lines += [
        "",
        "| growth | value | target | met |",
        "|---|---:|---|---|",
        f"| time for {g['size_factor']:.0f}x codes | {g['time_factor']:.1f}x | ≤ {target:.0f}x | "
        f"{met(g['time_factor'] <= target)} |",
    ]
    return lines


def knn_lines(k: dict) -> list[str]:
    target = TARGETS["IVF edge recall"]
    by_cosine = ", ".join(f"{b}: {v:.3f}" for b, v in k["planted_recall_by_cosine"].items())
    return [
        f"## 4. kNN copy graph: copy_edges on {k['descriptors']:,} x {k['dim']} random unit "
        f"float16 descriptors ({k['index']})",
        "",
        f"{k['planted_pairs']:,} planted copies at cosine {k['planted_cosine_range'][0]:.2f}-"
        f"{k['planted_cosine_range'][1]:.2f} to their source; defaults (k = 64, threshold "
        f"{COPY_THRESHOLD}). Exact all-pairs search of {k['descriptors']:,} rows does not fit the "
        f"time budget on this machine, so the "
        f"ground truth is the planted pairs (exact cosine known) plus an exact brute-force search "
        f"of {k['exact_queries']:,} random queries against all rows, which found "
        f"{k['exact_edges_of_queries']} true edges touching them, {k['exact_edges_not_planted']} "
        f"of them not planted. Run in a fresh process. {RSS_NOTE}",
        "",
        "| metric | value | target | met |",
        "|---|---:|---|---|",
        f"| copy_edges wall s | {k['copy_edges_s']:.1f} | | |",
        f"| peak RSS MiB (before call) | {k['peak_rss_mib']:.0f} ({k['rss_before_mib']:.0f}) | | |",
        f"| edges found | {k['edges_found']:,} | | |",
        f"| recall of planted pairs | {k['planted_recall']:.4f} | ≥ {target} | "
        f"{met(k['planted_recall'] >= target)} |",
        f"| recall on the exact query subset | {k['query_edge_recall']:.4f} | ≥ {target} | "
        f"{met(k['query_edge_recall'] >= target)} |",
        f"| edges of the subset not in the exact set | {k['query_edges_not_exact']} | 0 | "
        f"{met(k['query_edges_not_exact'] == 0)} |",
        "",
        f"Planted recall by cosine: {by_cosine}.",
    ]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Dedup: near-duplicate hashing and copy detection, {m['cpus']} CPUs",
        "",
        f"{m['platform']}; numpy {m['numpy']}, faiss {m['faiss']}, imagededup "
        f"{m['imagededup']}. Load average {m['load_before']:.1f} before, {m['load_after']:.1f} "
        f"after (shared machine); whole run {result['wall_s'] / 60:.1f} min.",
        "",
        code_line(result["code"]),
    ]
    render = {"real": real_lines, "quality": quality_lines, "speed": speed_lines}
    render |= {"grouping": grouping_lines, "knn": knn_lines}
    carried = result.get("carried", {})
    for name, lines_of in render.items():
        if name not in result:
            continue
        section = lines_of(result[name])
        if name in carried:
            note = carried[name]
            section[1:1] = [
                "",
                f"*Carried over from an earlier run ({note['measured_at']}, load average "
                f"{note['load_before']:.1f}); {code_line(note['code'])}*",
            ]
        if name == "quality" and "previous_quality" in result:
            section += ["", *quality_change_lines(result["previous_quality"], result[name])]
        lines += ["", *section]
    return "\n".join(lines) + "\n"


def quality_change_lines(before: dict, after: dict) -> list[str]:
    """The PCA hash's headline quality figures against the previous results file's."""
    rows = [
        ("pair precision, photometric set", ("photometric", "pair_precision")),
        ("photometric recall, photometric set", ("photometric", "photometric_recall")),
        ("pair precision, all edits", ("all", "pair_precision")),
        ("pair recall, all edits", ("all", "pair_recall")),
        ("geometric recall, all edits", ("all", "geometric_recall")),
    ]
    lines = [
        "PCA hash against the previous results file "
        f"({before['code']['commit']}, {before['measured_at']}):",
        "",
        "| metric | before | after |",
        "|---|---:|---:|",
    ]
    for label, (part, key) in rows:
        old, new = before[part]["pca_hash"][key], after[part]["pca_hash"][key]
        lines.append(f"| {label} | {old:.3f} | {new:.3f} |")
    for name in EDITS:
        old = before["all"]["pca_hash"]["per_edit_recall"].get(name)
        new = after["all"]["pca_hash"]["per_edit_recall"].get(name)
        if old is not None and new is not None and abs(old - new) >= 0.0005:
            lines.append(f"| recall: {name}, all edits | {old:.3f} | {new:.3f} |")
    old_false = before["all"]["pca_hash"]["false_raw_pairs"]
    new_false = after["all"]["pca_hash"]["false_raw_pairs"]
    lines.append(
        f"| raw pairs joining different originals, all edits | {sum(old_false.values())} | "
        f"{sum(new_false.values())} |"
    )
    return lines


# -- main ------------------------------------------------------------------------------------------


def machine() -> dict:
    # Imported here, before any timing: imagededup.methods pulls in torch (seconds). Not at the
    # top of the module, so that the spawned measuring processes do not carry torch in their RSS.
    from imagededup import __version__ as imagededup_version
    from imagededup.methods import PHash  # noqa: F401

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "imagededup": imagededup_version,
        "load_before": os.getloadavg()[0],
    }


QUICK = {
    "edited": 60,
    "speed_count": 5_000,
    "grouping_sizes": [100_000, 1_000_000],
    "knn_size": 250_000,
    "exact_queries": 500,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help=f"smaller sizes, a few minutes: {QUICK}")
    add("--sections", nargs="+", default=["real", "quality", "speed", "grouping", "knn"])
    add("--originals", type=int, default=300, help="demo originals in the quality set")
    add("--edited", type=int, default=150, help="originals that get every edit")
    add("--speed-count", type=int, default=20_000)
    add("--planted-share", type=float, default=0.05, help="near duplicates in the speed set")
    add("--phash-probes", type=int, nargs=2, default=[2_000, 4_000])
    add("--phash-sizes", type=int, nargs=2, default=[5_000, 10_000])
    add("--phash-budget", type=float, default=180.0, help="s for find_duplicates on all")
    add("--grouping-sizes", type=int, nargs=2, default=[1_000_000, 10_000_000])
    add("--knn-size", type=int, default=1_000_000)
    add("--exact-queries", type=int, default=2_000)
    add("--workers", type=int, default=os.cpu_count() or 1, help="hashing processes")
    add("--seed", type=int, default=0)
    add(
        "--no-keep-others",
        dest="keep_others",
        action="store_false",
        help="drop the sections not run now from the results (default: carried over, marked)",
    )
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    return args


def _carry_over(result: dict, previous: dict, sections: list[str], keep_others: bool) -> None:
    """Sections not run now are kept from the previous results file, each with the code and
    load it was measured with; a re-run quality section is compared with the previous one."""
    if "quality" in sections and "quality" in previous:
        result["previous_quality"] = {
            "code": previous.get("carried", {}).get("quality", previous)["code"],
            "measured_at": previous.get("measured_at", "date not recorded"),
            **{part: previous["quality"][part] for part in ("photometric", "all")},
        }
    if not keep_others:
        return
    carried_before = previous.get("carried", {})
    for name in ("real", "quality", "speed", "grouping", "knn"):
        if name in sections or name not in previous:
            continue
        result[name] = previous[name]
        result.setdefault("carried", {})[name] = carried_before.get(
            name,
            {
                "code": previous["code"],
                "measured_at": previous.get("measured_at", "date not recorded"),
                "load_before": previous["machine"]["load_before"],
            },
        )


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = {"benchmark": "dedup", "machine": machine(), "targets": TARGETS}
    result["code"] = code_version(MEASURED)
    result["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    previous_file = RESULTS / "dedup.json"
    previous = json.loads(previous_file.read_text()) if previous_file.exists() else None
    sections = {"real": real, "quality": quality, "speed": speed, "grouping": grouping, "knn": knn}
    for name in args.sections:
        print(f"[dedup] {name} ...", flush=True)
        result[name], seconds = timed(sections[name], args)
        print(f"[dedup] {name} done in {seconds:.0f} s", flush=True)
    result["machine"]["load_after"] = os.getloadavg()[0]
    # Spawned processes import the modules again: a change during the run would mix versions.
    # Only the content counts (a commit of the same content during the run changes nothing).
    before, after = result["code"]["modules"], code_version(MEASURED)["modules"]
    result["code"]["changed_during_run"] = any(
        after[path]["sha256"] != before[path]["sha256"] for path in MEASURED
    )
    result["wall_s"] = time.perf_counter() - started
    result["args"] = vars(args)
    if previous is not None:
        _carry_over(result, previous, args.sections, args.keep_others)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dedup.json").write_text(json.dumps(result, indent=2, default=float))
    text = markdown(result)
    (RESULTS / "dedup.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
