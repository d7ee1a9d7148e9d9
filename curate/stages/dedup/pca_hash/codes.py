"""Packed binary codes (uint8 [N, bytes], faiss binary layout) as the Hamming search reads them:
64-bit words, popcounts, the distinct codes of an array, and the brute-force range search that
small inputs and large multi-index buckets use.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import faiss
import numpy as np

# Pairs are generated and verified in batches of about this many, to bound memory.
_PAIR_BATCH = 1 << 22
_QUERY_BLOCK = 4096
# Odd 64-bit constant (Fibonacci hashing): top bits of key * constant mix every key bit.
KEY_MIX = np.uint64(0x9E3779B97F4A7C15)


def popcount(words: np.ndarray) -> np.ndarray:
    """The number of set bits of each word, elementwise."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    as_bytes = words.view(np.uint8).reshape(*words.shape, words.itemsize)
    return table[as_bytes].sum(axis=-1, dtype=np.uint8)


def as_words(codes: np.ndarray) -> np.ndarray:
    """uint8 [N, B] codes as uint64 [N, ceil(B / 8)] words; padding bytes are zero in every code."""
    n, width = codes.shape
    padded = -width % 8
    if padded:
        codes = np.concatenate([codes, np.zeros((n, padded), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(codes).view("<u8")


def hamming(words: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Hamming distance between the codes of rows `left` and `right`, pairwise: int32."""
    return popcount(words[left] ^ words[right]).sum(axis=1, dtype=np.int32)


def check_codes(codes: np.ndarray) -> np.ndarray:
    """`codes` as a contiguous uint8 [N, bytes] array, or ValueError."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"codes must be uint8 [N, bytes], got {codes.dtype} {codes.shape}")
    return np.ascontiguousarray(codes)


class Distinct(NamedTuple):
    """The distinct rows of a code array."""

    firsts: np.ndarray  # [G] ascending: the first row with each distinct code
    index: np.ndarray  # [N] position in `firsts` of each row's code


def _fingerprints(words: np.ndarray) -> np.ndarray:
    """One uint64 per code: the code itself for 64 bits, a hash of its words for longer codes."""
    if words.shape[1] == 1:
        return words[:, 0]
    mixed = words[:, 0] * KEY_MIX
    for column in range(1, words.shape[1]):
        mixed = (mixed ^ (mixed >> np.uint64(29))) * KEY_MIX ^ words[:, column]
    return mixed


def distinct_codes(codes: np.ndarray) -> Distinct:
    """Identical codes (flat images, exact copies) are at distance 0 from each other by
    definition; searching only distinct codes keeps them from forming one huge bucket in every
    multi-index table.
    """
    words = as_words(codes)
    n = len(words)
    fingerprint = _fingerprints(words)
    ordered = np.sort(fingerprint)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    first_of = np.arange(n, dtype=np.int64)
    if repeated.size:
        # Only rows whose fingerprint repeats can share a code; group those on their full words.
        slot = np.minimum(np.searchsorted(repeated, fingerprint), repeated.size - 1)
        suspects = np.flatnonzero(repeated[slot] == fingerprint)
        # lexsort is stable, so each run of equal codes starts with its smallest row.
        by_code = suspects[np.lexsort(words[suspects].T[::-1])]
        ranked = words[by_code]
        starts = np.ones(by_code.size, dtype=bool)
        starts[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
        first_of[by_code] = by_code[starts][np.cumsum(starts) - 1]
    is_first = first_of == np.arange(n)
    position = np.cumsum(is_first) - 1
    return Distinct(np.flatnonzero(is_first), position[first_of])


def pairs_flat(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """All i < j within `radius`, by blocked faiss range search: O(N^2) work, O(block) memory."""
    n, width = codes.shape
    lefts, rights = [], []
    for start in range(0, n - 1, _QUERY_BLOCK):
        # Only codes from `start` on are indexed: each unordered pair is compared once.
        index = faiss.IndexBinaryFlat(width * 8)
        index.add(codes[start:])
        stop = min(start + _QUERY_BLOCK, n)
        # faiss keeps distances strictly below its radius.
        lims, _, found = index.range_search(codes[start:stop], radius + 1)
        query = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims).astype(np.int64))
        found = found.astype(np.int64) + start
        later = found > query
        lefts.append(query[later])
        rights.append(found[later])
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lefts), np.concatenate(rights)


def pairs_in_runs(starts: np.ndarray, stops: np.ndarray) -> Iterable[tuple[np.ndarray, ...]]:
    """Every (a, b), a < b, of sorted positions inside each run, in batches of ~_PAIR_BATCH."""
    lengths = stops - starts
    pair_counts = lengths * (lengths - 1) // 2
    batch_of_run = np.cumsum(pair_counts) // _PAIR_BATCH
    cuts = np.flatnonzero(np.diff(batch_of_run)) + 1
    for chunk in np.split(np.arange(starts.size), cuts):
        if chunk.size == 0:
            continue
        run_length = lengths[chunk]
        first_of_run = np.cumsum(run_length) - run_length
        position = np.repeat(starts[chunk], run_length)
        position += np.arange(position.size) - np.repeat(first_of_run, run_length)
        partners = np.repeat(stops[chunk], run_length) - position - 1
        left = np.repeat(position, partners)
        first_partner = np.cumsum(partners) - partners
        right = left + 1 + np.arange(left.size) - np.repeat(first_partner, partners)
        yield left, right


def concatenated(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Batches of (left, right) pairs as one (left, right); empty int64 arrays for none."""
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
