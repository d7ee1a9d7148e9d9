"""The methods side by side on the same files: imagededup's hashes, our hash pass, a copy model,
and the hash pass followed by the copy pass as the dedup stage chains them.

Files are decoded as the pipeline decodes them (`load_rgb` of the stored bytes). Hashing runs in
one forked single-threaded process per core, as the dedup stage runs one task per part.
"""

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from curate.stages.dedup.decide import copy_groups
from curate.stages.dedup.grouping import connected_components, representatives
from curate.stages.dedup.pca_hash.basis import PCAHasher
from curate.stages.dedup.pca_hash.features import hash_features_batch
from curate.stages.dedup.pca_hash.search import HAMMING_RADIUS, near_duplicate_pairs
from curate.stages.ingest.decode import load_rgb
from schemas.job import DedupOptions

# imagededup's own default `max_distance_threshold` for its hashes.
IMAGEDEDUP_RADIUS = 10
_PATHS: list[Path] = []  # read by the forked workers: inherited at fork, never pickled


class Pairs(NamedTuple):
    left: np.ndarray
    right: np.ndarray
    seconds: float


def _slices(n: int, workers: int) -> list[tuple[int, int]]:
    step = max(1, -(-n // (8 * workers)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def in_processes(fn: Callable, paths: list[Path], workers: int | None = None) -> list:
    """fn((start, stop)) over slices of `paths` in forked processes; results in order."""
    global _PATHS
    _PATHS = list(paths)
    workers = workers or os.cpu_count() or 1
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(fn, _slices(len(paths), workers))
    finally:
        _PATHS = []


def _images(bounds: tuple[int, int]) -> list:
    return [load_rgb(path.read_bytes()) for path in _PATHS[bounds[0] : bounds[1]]]


def _our_features(bounds: tuple[int, int]) -> np.ndarray:
    return hash_features_batch(_images(bounds))


def _imagededup_hashes(method: str) -> Callable[[tuple[int, int]], list[str]]:
    return {"phash": _phash, "dhash": _dhash}[method]


def _encode_with(hasher, bounds: tuple[int, int]) -> list[str]:
    return [hasher.encode_image(image_array=np.asarray(img)) for img in _images(bounds)]


def _phash(bounds: tuple[int, int]) -> list[str]:
    from imagededup.methods import PHash

    return _encode_with(PHash(verbose=False), bounds)


def _dhash(bounds: tuple[int, int]) -> list[str]:
    from imagededup.methods import DHash

    return _encode_with(DHash(verbose=False), bounds)


def imagededup_pairs(paths: list[Path], method: str) -> Pairs:
    """imagededup's `method` ("phash", "dhash"): its hashes and its own find_duplicates at its
    default threshold, as index pairs."""
    import time

    from imagededup.methods import DHash, PHash

    started = time.perf_counter()
    hashes = [h for part in in_processes(_imagededup_hashes(method), paths) for h in part]
    hasher = {"phash": PHash, "dhash": DHash}[method](verbose=False)
    found = hasher.find_duplicates(
        encoding_map={str(i): h for i, h in enumerate(hashes)},
        max_distance_threshold=IMAGEDEDUP_RADIUS,
    )
    left = np.array([int(a) for a, dups in found.items() for _ in dups], np.int64)
    right = np.array([int(b) for dups in found.values() for b in dups], np.int64)
    keep = left < right  # find_duplicates reports each pair from both ends
    return Pairs(left[keep], right[keep], time.perf_counter() - started)


def hash_features(paths: list[Path]) -> np.ndarray:
    """Our hash pass's input vectors of every file, as the dedup_features stage computes them."""
    return np.concatenate(in_processes(_our_features, paths))


def hash_codes(features: np.ndarray, options: DedupOptions) -> np.ndarray:
    """Codes as the dedup stage makes them: the basis fitted on the job (here: the split)."""
    if len(features) <= 2 * options.hash_bits:
        return PCAHasher.dct_signs(features.shape[1], options.hash_bits).codes(features)
    hasher = PCAHasher.fit(
        features,
        bits=options.hash_bits,
        itq_iterations=options.itq_iterations,
        seed=0,
        sample_size=options.pca_sample,
    )
    return hasher.codes(features)


def hash_pairs(
    codes: np.ndarray, radius: int = HAMMING_RADIUS, word_radius: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    left, right, _ = near_duplicate_pairs(codes, radius, word_radius=word_radius)
    return left, right


def cosine_pairs(descriptors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j with cosine above `threshold` (exact: the splits are a few thousand)."""
    x = np.asarray(descriptors, np.float32)
    sims = x @ x.T
    left, right = np.nonzero(np.triu(sims > threshold, k=1))
    return left.astype(np.int64), right.astype(np.int64)


def chained_labels(
    n: int,
    hash_left: np.ndarray,
    hash_right: np.ndarray,
    descriptors: np.ndarray,
    threshold: float,
    area: np.ndarray,
) -> np.ndarray:
    """Groups as the dedup stage forms them (curate.stages.dedup.decide): hash groups, then
    joined by copy edges between any of their files."""
    order = np.arange(n)
    group = representatives(connected_components(n, hash_left, hash_right), area, order)
    left, right = cosine_pairs(descriptors, threshold)
    return copy_groups(group, left, right, area, order)


def compare_hashes(split, options: DedupOptions) -> dict:
    """imagededup's PHash and DHash and our hash pass on one split, on the same files: scores,
    seconds, and our raw pairs under "_pairs" (the copy pass chains on them)."""
    import time

    from copybench.score import score_pairs

    from curate.stages.dedup.pca_hash.search import search_radii

    out = {}
    for name in ("phash", "dhash"):
        pairs = imagededup_pairs(split.paths, name)
        out[name] = {**score_pairs(pairs.left, pairs.right, split), "seconds": pairs.seconds}
    started = time.perf_counter()
    codes = hash_codes(hash_features(split.paths), options)
    radius, word = search_radii(options)
    left, right = hash_pairs(codes, radius, word)
    out["pca_hash"] = {
        **score_pairs(left, right, split),
        "seconds": time.perf_counter() - started,
        "bits": options.hash_bits,
        "radius": radius,
        "word_radius": word,
    }
    out["_pairs"] = (left, right)
    return out
