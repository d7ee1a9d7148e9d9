"""Near duplicates among PCA-hash codes: every pair within a Hamming radius, exactly, and the
groups they join into (one representative kept per group).

Small inputs are searched by brute force, larger ones by the multi-index tables (`tables`);
identical codes (flat images, exact copies) are searched once and expanded afterwards.
"""

import logging
from typing import NamedTuple

import numpy as np

from curate.stages.dedup.grouping import connected_components, representatives
from curate.stages.dedup.pca_hash.codes import (
    Distinct,
    as_words,
    check_codes,
    concatenated,
    distinct_codes,
    hamming,
    pairs_flat,
    pairs_in_runs,
)
from curate.stages.dedup.pca_hash.tables import (
    MAX_RADIUS_PER_WORD,
    MapTables,
    Pairs,
    multi_index_tables,
    threaded_tables,
)
from schemas.job import DedupOptions

log = logging.getLogger(__name__)

# -- defaults, and how they were chosen -----------------------------------------------------------
#
# Measured on the demo corpus, with the basis fitted on another (see the package docstring).
# - Radius 5: mean recall over the nine edits 0.990 (brightness +30% 0.92, all others >= 0.99)
#   with no false pair (precision 1.0); imagededup PHash at its default radius 10 gets 0.993 at
#   precision 0.995. Radius 6 adds half a point of recall but brought the first false pairs
#   (precision 0.996) and doubles the search tables; at a billion images, false pairs chain
#   unrelated images into one component.
HAMMING_RADIUS = 5
# 128-bit codes (the dedup stage's default since the real-image copy benchmark,
# bench/copybench): candidates within WORD_RADIUS on either 64-bit word, each found exactly by
# that word's multi-index tables (2 x 62 at radius 5), kept when the whole code is within
# WIDE_RADIUS. Every pair within 11 is found (it has a word within 5); beyond, a pair needs one
# word within 5. Twice the bits estimate the angle between two images' features twice as
# finely: on the benchmark's tune split (600 photographs and clip art, 2,800 edits, look-alikes
# of the same topics) pair precision rose from 0.953 (64 bits, radius 5) to 0.985 at the same
# easy-edit recall (0.994), with 15 instead of 42 distinct pictures wrongly merged; radius 18 on
# the whole code added no recall. Searching only the first word at radius 6 (126 tables)
# scored the same there, but a pair whose differing bits fall in one word was lost to it.
WIDE_RADIUS = 16
WORD_RADIUS = 5
WORD_BYTES = 8
# imagededup's own default for PHash's `max_distance_threshold`.
PHASH_RADIUS = 10
# Below this many distinct codes the blocked brute force is used. With random 64-bit codes the
# multi-index search is already faster from about 5,000 (200,000: 1.1 s against 19 s at radius 5);
# brute force is kept for small inputs because clustered codes cannot slow it down.
EXACT_BELOW = 10_000


def search_radii(options: DedupOptions) -> tuple[int, int | None]:
    """(Hamming radius over the whole code, radius of the candidate search on its first 64 bits,
    None when the code is 64 bits): the options', else the hash's own defaults."""
    if options.hash == "phash":
        return options.hamming_radius or PHASH_RADIUS, None
    if options.hash_bits == 64:
        radius = HAMMING_RADIUS if options.hamming_radius is None else options.hamming_radius
        return radius, None
    radius = WIDE_RADIUS if options.hamming_radius is None else options.hamming_radius
    word = WORD_RADIUS if options.word_radius is None else options.word_radius
    return radius, min(word, radius)


def _pairs_multi_index(codes: np.ndarray, radius: int, map_tables: MapTables) -> Pairs:
    count = len(multi_index_tables(codes.shape[1] * 8, radius))
    left, right = concatenated(list(map_tables(codes, radius, count)))
    # Tables may come back in any order: one canonical order keeps every caller deterministic.
    ranked = np.lexsort((right, left))
    return left[ranked], right[ranked]


def _distinct_pairs(
    codes: np.ndarray,
    radius: int,
    exact_below: int,
    workers: int | None,
    map_tables: MapTables | None = None,
) -> Pairs:
    """All i < j within `radius` among codes that are pairwise distinct."""
    words_per_code = -(-codes.shape[1] // 8)
    if len(codes) < exact_below:
        return pairs_flat(codes, radius)
    if radius // words_per_code > MAX_RADIUS_PER_WORD:
        log.warning(
            "pca_hash: radius %d on %d-bit codes is beyond the multi-index tables; "
            "searching %d codes by brute force",
            radius,
            codes.shape[1] * 8,
            len(codes),
        )
        return pairs_flat(codes, radius)
    return _pairs_multi_index(codes, radius, map_tables or threaded_tables(workers))


def _expand_identical(
    left: np.ndarray, right: np.ndarray, distinct: Distinct
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of distinct codes -> pairs of rows, plus all pairs of rows with one code."""
    sizes = np.bincount(distinct.index, minlength=distinct.firsts.size)
    if sizes.max(initial=1) == 1:
        return distinct.firsts[left], distinct.firsts[right]
    # Rows grouped by code, ascending within a group (a stable sort of the group index).
    by_code = np.argsort(distinct.index, kind="stable")
    offsets = np.cumsum(sizes) - sizes
    pairs = []
    # Rows that share a code: every pair of them, at distance 0.
    shared = sizes > 1
    for a, b in pairs_in_runs(offsets[shared], offsets[shared] + sizes[shared]):
        pairs.append((by_code[a], by_code[b]))
    # Rows of two near codes: the cross product of their rows.
    count = sizes[left] * sizes[right]
    pair = np.repeat(np.arange(left.size), count)
    step = np.arange(pair.size) - np.repeat(np.cumsum(count) - count, count)
    rows_a = by_code[offsets[left][pair] + step // sizes[right][pair]]
    rows_b = by_code[offsets[right][pair] + step % sizes[right][pair]]
    pairs.append((np.minimum(rows_a, rows_b), np.maximum(rows_a, rows_b)))
    return concatenated(pairs)


def _pairs_by_word(
    codes: np.ndarray,
    radius: int,
    word_radius: int,
    exact_below: int,
    workers: int | None,
    map_tables: MapTables | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`near_duplicate_pairs` of long codes from candidates found word by word."""
    found = [
        near_duplicate_pairs(
            np.ascontiguousarray(codes[:, start : start + WORD_BYTES]),
            word_radius,
            exact_below,
            workers,
            map_tables,
        )[:2]
        for start in range(0, codes.shape[1], WORD_BYTES)
    ]
    left, right = concatenated(found)
    # A pair near on both words is found twice: one key per pair keeps it once, sorted.
    keys = np.unique(left * np.int64(len(codes)) + right)
    left, right = keys // len(codes), keys % len(codes)
    distance = hamming(as_words(codes), left, right)
    near = distance <= radius
    return left[near], right[near], distance[near]


def near_duplicate_pairs(
    codes: np.ndarray,
    radius: int,
    exact_below: int = EXACT_BELOW,
    workers: int | None = None,
    map_tables: MapTables | None = None,
    word_radius: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair i < j of codes within Hamming `radius`: (left, right, distance).

    Exact on both paths: brute force below `exact_below` distinct codes, the multi-index tables
    above. Pairs come sorted by (left, right). The tables are searched by `map_tables` (see
    `table_pairs`), by default in `workers` threads.

    word_radius: for codes longer than 64 bits, the pairs within `radius` that are within
    word_radius on at least one 64-bit word: each word is searched exactly for candidates, then
    the candidates are checked on the whole code.
    """
    codes = check_codes(codes)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if word_radius is not None and codes.shape[1] > WORD_BYTES:
        return _pairs_by_word(
            codes, radius, min(word_radius, radius), exact_below, workers, map_tables
        )
    distinct = distinct_codes(codes)
    near_a, near_b = _distinct_pairs(
        codes[distinct.firsts], radius, exact_below, workers, map_tables
    )
    left, right = _expand_identical(near_a, near_b, distinct)
    ranked = np.lexsort((right, left))
    left, right = left[ranked], right[ranked]
    return left, right, hamming(as_words(codes), left, right)


class PCAHashGroups(NamedTuple):
    labels: np.ndarray  # int64 [N]: smallest row index in the row's group
    representative: np.ndarray  # int64 [N]: the row kept for the row's group
    distance_to_representative: np.ndarray  # int32 [N]: Hamming distance of the codes


def pca_hash_groups(
    codes: np.ndarray,
    radius: int,
    area: np.ndarray,
    order: np.ndarray,
    exact_below: int = EXACT_BELOW,
    workers: int | None = None,
    map_tables: MapTables | None = None,
) -> PCAHashGroups:
    """Near-duplicate groups of `codes`: pairs within `radius` -> components -> representatives.

    `area` is each image's pixel count and `order` its position in the source; the representative
    of a group is its largest image, then the first seen.
    """
    codes = check_codes(codes)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    n = len(codes)
    firsts, index = distinct_codes(codes)
    near_a, near_b = _distinct_pairs(codes[firsts], radius, exact_below, workers, map_tables)
    # Identical codes are joined to the first row with their code: a star, not a clique, so a
    # million flat images cost a million edges.
    rows = np.arange(n, dtype=np.int64)
    first_of = firsts[index]
    copy = first_of != rows
    left = np.concatenate([firsts[near_a], first_of[copy]])
    right = np.concatenate([firsts[near_b], rows[copy]])
    labels = connected_components(n, left, right)
    representative = representatives(labels, area, order)
    distance = hamming(as_words(codes), rows, representative)
    return PCAHashGroups(labels, representative, distance)
