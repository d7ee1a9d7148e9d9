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
# imagededup's own default for PHash's `max_distance_threshold`.
PHASH_RADIUS = 10
# Below this many distinct codes the blocked brute force is used. With random 64-bit codes the
# multi-index search is already faster from about 5,000 (200,000: 1.1 s against 19 s at radius 5);
# brute force is kept for small inputs because clustered codes cannot slow it down.
EXACT_BELOW = 10_000


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


def near_duplicate_pairs(
    codes: np.ndarray,
    radius: int,
    exact_below: int = EXACT_BELOW,
    workers: int | None = None,
    map_tables: MapTables | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair i < j of codes within Hamming `radius`: (left, right, distance).

    Exact on both paths: brute force below `exact_below` distinct codes, the multi-index tables
    above. Pairs come sorted by (left, right). The tables are searched by `map_tables` (see
    `table_pairs`), by default in `workers` threads.
    """
    codes = check_codes(codes)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
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
