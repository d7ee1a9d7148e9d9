"""The exact multi-index search: tables chosen so that every pair of codes within the radius
collides exactly in at least one of them (`multi_index_tables`), each searched by one sort of the
codes (`table_pairs`). Tables are independent units: threads here, Ray tasks in a pipeline.
"""

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from curate.stages.dedup.pca_hash.codes import (
    KEY_MIX,
    as_words,
    check_codes,
    concatenated,
    pairs_flat,
    pairs_in_runs,
    popcount,
)

log = logging.getLogger(__name__)

# Multi-index buckets above this size are searched with faiss inside the bucket instead of by
# materialising every pair of members in numpy.
_NUMPY_BUCKET_LIMIT = 256
_LARGE_BUCKET_WARNING = 100_000
# The balanced table construction covers up to this many errors per 64-bit word (126 tables).
MAX_RADIUS_PER_WORD = 6


def _covering_masks(radius: int) -> list[int]:
    """64-bit masks such that two words differing in at most `radius` bits agree on one mask.

    Bit p is given the vector u_p = (1, low bits of p) in GF(2)^(radius+1); the table of each
    nonzero v other than (1, 0, ...) keys on the bits with odd <u_p, v>. Any `radius` differing
    bits span at most `radius` dimensions, so some v is orthogonal to all of them, and that table
    leaves every differing bit out of its key (Pagh's CoveringLSH, 2016). The u_p are the columns
    of a first-order Reed-Muller code, so every key is exactly 32 bits: long enough that random
    codes rarely collide, which keeps the candidates near linear in N. 2^(radius+1) - 2 tables.
    """
    if radius == 0:
        return [(1 << 64) - 1]
    if radius > MAX_RADIUS_PER_WORD:
        raise ValueError(f"at most {MAX_RADIUS_PER_WORD} errors per word, got {radius}")
    masks = []
    for low in range(1, 1 << radius):  # the non-constant part of v
        odd = [p for p in range(64) if bin(p & low).count("1") % 2 == 1]
        mask = sum(1 << p for p in odd)
        masks += [mask, mask ^ ((1 << 64) - 1)]  # v0 = 0 and v0 = 1 flip which half is keyed
    return masks


def multi_index_tables(bits: int, radius: int) -> list[tuple[int, int]]:
    """The (word, mask) tables of the exact multi-index search for `bits`-bit codes.

    A pair within `radius` differs in at most radius // words bits in some 64-bit word
    (pigeonhole), and then collides in one of that word's covering tables.
    """
    words = -(-bits // 64)
    per_word = radius // words
    return [(word, mask) for word in range(words) for mask in _covering_masks(per_word)]


def _run_bounds(sorted_keys: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of each run of >= 2 sorted entries that agree above the index bits."""
    above = sorted_keys >> np.uint64(index_bits)
    link = np.flatnonzero(above[1:] == above[:-1])
    del above
    if link.size == 0:
        return link, link
    new_run = np.ones(link.size, dtype=bool)
    new_run[1:] = link[1:] != link[:-1] + 1
    last_link = np.ones(link.size, dtype=bool)
    last_link[:-1] = new_run[1:]
    return link[new_run], link[last_link] + 2


def _first_table_filter(
    xor: np.ndarray, tables: Sequence[tuple[int, int]], current: int
) -> np.ndarray:
    """Pairs (given by their code XOR) whose first exactly-colliding table is `current`.

    Each pair is reported by one table only, so no global de-duplication is needed; checking the
    key itself also drops pairs that met only through a hash collision.
    """
    word, mask = tables[current]
    keep = (xor[:, word] & np.uint64(mask)) == 0
    earlier = tables[:current]
    for earlier_word in {w for w, _ in earlier}:
        masks = np.array([m for w, m in earlier if w == earlier_word], dtype=np.uint64)
        step = max(1, (1 << 22) // max(len(masks), 1))
        for begin in range(0, len(xor), step):
            block = xor[begin : begin + step, earlier_word, None] & masks[None, :]
            keep[begin : begin + step] &= ~(block == 0).any(axis=1)
    return keep


def _verified(
    words: np.ndarray,
    radius: int,
    tables: Sequence[tuple[int, int]],
    current: int,
    left: np.ndarray,
    right: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs that are within `radius` and belong to table `current`, as i < j."""
    left, right = np.minimum(left, right), np.maximum(left, right)
    xor = words[left] ^ words[right]
    near = popcount(xor).sum(axis=1) <= radius
    left, right, xor = left[near], right[near], xor[near]
    mine = _first_table_filter(xor, tables, current)
    return left[mine], right[mine]


def _table_pairs(
    codes: np.ndarray,
    words: np.ndarray,
    row_ids: np.ndarray,
    radius: int,
    tables: Sequence[tuple[int, int]],
    current: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs within `radius` whose first exactly-colliding multi-index table is `current`."""
    n = len(words)
    word, mask = tables[current]
    index_bits = max(1, (n - 1).bit_length())
    row_mask = np.uint64((1 << index_bits) - 1)
    # One in-place sort of (hash of key | row) per table is much cheaper than an argsort. The
    # hash only groups candidates: every candidate is verified on the full code.
    keys = words[:, word] & np.uint64(mask)
    keys *= KEY_MIX
    keys &= ~row_mask
    keys |= row_ids
    keys.sort()
    starts, stops = _run_bounds(keys, index_bits)
    small = stops - starts <= _NUMPY_BUCKET_LIMIT
    found = [
        _verified(words, radius, tables, current, *_rows(keys, row_mask, a, b))
        for a, b in pairs_in_runs(starts[small], stops[small])
    ]
    # A big bucket (many distinct but similar codes) is searched by faiss inside the bucket:
    # still every pair of members, but in C++ and in bounded memory.
    for start, stop in zip(starts[~small].tolist(), stops[~small].tolist(), strict=True):
        if stop - start > _LARGE_BUCKET_WARNING:
            log.warning("pca_hash: %d distinct codes share one multi-index key", stop - start)
        members = np.sort((keys[start:stop] & row_mask).astype(np.int64))
        a, b = pairs_flat(codes[members], radius)
        found.append(_verified(words, radius, tables, current, members[a], members[b]))
    return concatenated(found)


def _rows(
    keys: np.ndarray, row_mask: np.uint64, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return (keys[a] & row_mask).astype(np.int64), (keys[b] & row_mask).astype(np.int64)


def _default_workers() -> int:
    # Each table in flight holds about three uint64 arrays of N; a few threads already keep the
    # sorts busy (numpy releases the GIL in them).
    return max(1, min(4, os.cpu_count() or 1))


Pairs = tuple[np.ndarray, np.ndarray]
# map_tables(codes, radius, tables) -> [table_pairs(codes, radius, t) for t in range(tables)],
# in any order and anywhere: threads, processes, Ray tasks sharing `codes` in an object store.
MapTables = Callable[[np.ndarray, int, int], Iterable[Pairs]]


def table_pairs(codes: np.ndarray, radius: int, table: int) -> Pairs:
    """The pairs i < j of pairwise-distinct `codes` within `radius` that multi-index table
    `table` reports: those whose first exactly-colliding table it is.

    Each table is one sort of the N codes, independent of the others, and every pair within the
    radius is reported by exactly one table, so the union over
    `range(len(multi_index_tables(bits, radius)))` is every pair, each once, on any machines.
    """
    codes = check_codes(codes)
    tables = multi_index_tables(codes.shape[1] * 8, radius)
    if not 0 <= table < len(tables):
        raise ValueError(f"table must be in [0, {len(tables)}), got {table}")
    words = as_words(codes)
    row_ids = np.arange(len(codes), dtype=np.uint64)
    return _table_pairs(codes, words, row_ids, radius, tables, table)


def threaded_tables(workers: int | None) -> MapTables:
    def run(codes: np.ndarray, radius: int, count: int) -> list[Pairs]:
        words = as_words(codes)
        row_ids = np.arange(len(codes), dtype=np.uint64)
        tables = multi_index_tables(codes.shape[1] * 8, radius)

        def search(table: int) -> Pairs:
            return _table_pairs(codes, words, row_ids, radius, tables, table)

        with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
            return list(pool.map(search, range(count)))

    return run
