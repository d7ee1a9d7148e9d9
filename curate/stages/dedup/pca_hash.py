"""PCA hash: a cheap perceptual code per image, and exact near-duplicate search over the codes.

An image becomes a 143-number vector (low DCT frequencies of a 32x32 grey thumbnail of the
picture inside any uniform frame, after a brightness-invariant tone curve), the vector is
projected on a PCA basis fitted on a sample of the job, rotated by ITQ and cut at zero into 64
bits. Two images whose codes are within a Hamming radius are near duplicates; `pca_hash_groups`
joins them into connected components and keeps one representative per group
(`curate.stages.dedup.grouping`). `phash_codes` puts imagededup's PHash in the
same packed layout, so `--hash phash` reuses all of the search and grouping.

The pair search is exact at every scale: a blocked brute-force faiss range search for small
inputs, and above `EXACT_BELOW` codes a multi-index search whose tables are chosen so that every
pair within the radius collides exactly in at least one of them (see `multi_index_tables`). Each
table is one sort of the codes, so the work is O(tables * N log N) and the tables are independent
units that a Ray pipeline can fan out; nothing here needs all pairs of a billion images at once.
"""

import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
from PIL import Image, ImageOps

from curate.stages.dedup.grouping import connected_components, representatives
from curate.stages.ingest.decode import load_rgb, to_rgb

log = logging.getLogger(__name__)

# -- defaults, and how they were chosen -----------------------------------------------------------
#
# Measured on the demo corpus (357 originals of `generate_demo(count=400)`, nine edits of each:
# resize 50%, JPEG q30, WebP q75, brightness and contrast +-30%, Gaussian blur 2 px, greyscale),
# with the basis fitted on another demo corpus (count 2000, seed 2), so that the images were
# unseen by the fit, as most of a large job is by its fitting sample.
# - 32x32 thumbnail, antialiased (box reduction, then Lanczos): a plain box resize aliases fine
#   textures differently at different source sizes and lost 10% recall on the 50% resize.
# - 12x12 DCT block (143 features): 8x8 leaves too few dimensions for 64 bits; 14x14 and
#   16x16 did no better.
# - The x / (x + mean) tone curve lifted recall on brightness +30% (clipped highlights, the
#   hardest edit) from 0.78 to 0.87 at radius 4; log and square-root curves lost contrast edits.
# - 64 bits: 32 bits cannot keep a billion images apart (one random pair in a million falls
#   within radius 3); 128 bits need twice the radius for the same recall, and the exact search
#   pays for radius exponentially.
# - ITQ on the whitened projection: +2-3 points of recall on the hardest edit over plain PCA
#   signs at radius 4-6, under one point on average. ITQ on the raw projection halved
#   precision: the rotation spreads the few dominant components over every bit, so look-alike
#   images agree on most bits.
# - Uniform frames (padding, letterboxing, pillarboxing) are cut before the thumbnail: a black
#   5% border on every side made 150 padded copies of different originals collide in 2,569 raw
#   pairs (bench/dedup.py, all-edits set). Only a frame is cut: bands of one colour, about
#   equally deep on two opposite sides, ending in a step. A flat band on one side (sky, ground),
#   a gradient, or a band that fades (highlights clipped by brightening) is part of the picture,
#   and where it would be cut moves with the edit; on 300 demo originals under the nine
#   photometric edits no box was cut at all, so those codes are unchanged.
# - Radius 5: mean recall over the nine edits 0.990 (brightness +30% 0.92, all others >= 0.99)
#   with no false pair (precision 1.0); imagededup PHash at its default radius 10 gets 0.993 at
#   precision 0.995. Radius 6 adds half a point of recall but brought the first false pairs
#   (precision 0.996) and doubles the search tables; at a billion images, false pairs chain
#   unrelated images into one component.
THUMBNAIL_SIDE = 32
DCT_BLOCK = 12
# JPEG draft decoding stops at or above this size, leaving the last reduction to the resize.
_DRAFT_SIDE = 4 * THUMBNAIL_SIDE
# Below this AC energy (toned pixels lie in [0, 1)) an image counts as flat; one grey level of
# real structure is orders of magnitude above it.
_FLAT_ENERGY = 1e-6
FEATURE_DIM = DCT_BLOCK * DCT_BLOCK - 1
# Uniform frames: found on a copy box-reduced to a short side of 128-255 px (drafted JPEGs are
# probed as decoded); a frame row has this share of its pixels within the tolerance (grey
# levels) of the outermost row's colour, and its mean within the mean tolerance of it; at least
# this share of each dimension is kept.
_BORDER_PROBE_SIDE = 128
_BORDER_TOLERANCE = 12.0
_BORDER_SHARE = 0.95
_BORDER_MEAN_TOLERANCE = 3.0
_MIN_CONTENT_SHARE = 0.25
# A frame band is at least this share of its dimension deep on each of two opposite sides.
_MIN_BORDER_SHARE = 0.02
# Within this many rows after a frame, one has at most this share of the frame's colour.
_FRAME_EDGE_ROWS = 4
_FRAME_EDGE_SHARE = 0.5
PCA_HASH_BITS = 64
ITQ_ITERATIONS = 50
HAMMING_RADIUS = 5
# Enough images for a stable 143x143 covariance and a 64x64 rotation; more only costs time.
PCA_FIT_SAMPLE = 100_000
# imagededup's own default for PHash's `max_distance_threshold`.
PHASH_RADIUS = 10
# Below this many distinct codes the blocked brute force is used. With random 64-bit codes the
# multi-index search is already faster from about 5,000 (200,000: 1.1 s against 19 s at radius 5);
# brute force is kept for small inputs because clustered codes cannot slow it down.
EXACT_BELOW = 10_000

# Pairs are generated and verified in batches of about this many, to bound memory.
_PAIR_BATCH = 1 << 22
# Multi-index buckets above this size are searched with faiss inside the bucket instead of by
# materialising every pair of members in numpy.
_NUMPY_BUCKET_LIMIT = 256
_LARGE_BUCKET_WARNING = 100_000
# The balanced table construction covers up to this many errors per 64-bit word (126 tables).
_MAX_RADIUS_PER_WORD = 6
_QUERY_BLOCK = 4096
# Odd 64-bit constant (Fibonacci hashing): top bits of key * constant mix every key bit.
_KEY_MIX = np.uint64(0x9E3779B97F4A7C15)


# -- features --------------------------------------------------------------------------------------


def _dct_basis(side: int, block: int) -> np.ndarray:
    """The first `block` rows of the orthonormal DCT-II matrix of size `side`."""
    frequency = np.arange(block, dtype=np.float64)[:, None]
    position = np.arange(side, dtype=np.float64)[None, :]
    basis = np.cos(np.pi * (2 * position + 1) * frequency / (2 * side)) * np.sqrt(2.0 / side)
    basis[0] /= np.sqrt(2.0)
    return basis


_DCT = _dct_basis(THUMBNAIL_SIDE, DCT_BLOCK)


def _grey(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    # Same mode handling as `load_rgb`, so a file and its decoded image hash alike.
    return (img if img.mode == "RGB" else to_rgb(img)).convert("L")


def _border_lines(lines: np.ndarray, colour: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a grey [rows, cols] array: is it of the border colour, and what share of its
    pixels are near that colour. The share and tolerance leave room for JPEG ringing."""
    share = (np.abs(lines - colour) <= _BORDER_TOLERANCE).mean(axis=1)
    # The rows' own means must also stay on the border colour, which a gentle gradient (a clear
    # sky) does not: trimming it would move with every contrast edit.
    uniform = (share >= _BORDER_SHARE) & (
        np.abs(lines.mean(axis=1) - colour) <= _BORDER_MEAN_TOLERANCE
    )
    return uniform, share


def _leading(uniform: np.ndarray) -> int:
    return len(uniform) if uniform.all() else int(uniform.argmin())


def _border_depth(lines: np.ndarray) -> tuple[int, float]:
    """How many leading rows of a grey [rows, cols] array are a frame, and the frame's colour."""
    colour = float(np.median(lines[0]))
    # Nearly every image has no frame: its outermost row already says so, and costs one row.
    if not _border_lines(lines[:1], colour)[0][0]:
        return 0, colour
    # No frame is deeper than (1 - _MIN_CONTENT_SHARE) / 2 of the side (see `_frame`).
    window = int(len(lines) * (1 - _MIN_CONTENT_SHARE) / 2) + _FRAME_EDGE_ROWS + 1
    uniform, share = _border_lines(lines[:window], colour)
    depth = _leading(uniform)
    if depth == len(uniform):
        return depth, colour
    # A frame ends in a step: within a few rows (JPEG rings next to it) most pixels are far from
    # its colour. A flat band that fades into the picture (a sky clipped white by a brightening
    # edit) is not cut, since where it would be cut moves with every edit.
    step = share[depth : depth + _FRAME_EDGE_ROWS].min()
    return (depth if depth and step <= _FRAME_EDGE_SHARE else 0), colour


def _opposite_borders(lines: np.ndarray) -> tuple[tuple[int, float], tuple[int, float]]:
    """`_border_depth` from both ends; the far end is not read when the near one has no border,
    as a frame needs both (`_frame`)."""
    near = _border_depth(lines)
    return near, _border_depth(lines[::-1]) if near[0] else (0, near[1])


def _frame(before: int, after: int, length: int) -> tuple[int, int]:
    """The border depths on two opposite sides when they frame the content, else (0, 0).

    Padding, letterboxing and pillarboxing put about equal bands on both sides. A flat band on
    one side only is more often part of the picture (sky, ground, a studio backdrop), and how
    deep it reads changes with every re-encoding: cutting it would split copies apart.
    """
    least = max(1, round(_MIN_BORDER_SHARE * length))
    if min(before, after) < least or abs(before - after) > max(2, 0.25 * max(before, after)):
        return 0, 0
    if before + after > length * (1 - _MIN_CONTENT_SHARE):
        return 0, 0  # a flat image, or a thin strip on a field: too little left to describe
    return before, after


def _refined_box(
    grey: Image.Image, box: list[int], depths: list[int], colours: list[float], factor: int
) -> tuple[int, int, int, int]:
    """The probe's box (left, top, right, bottom) moved onto the exact full-size frame edges.

    Each framed side is re-read at full size over the few reduced rows where its edge lies, so
    a border sliver of up to `factor` - 1 pixels is not left in the thumbnail.
    """
    reach = (_FRAME_EDGE_ROWS + 1) * factor
    for side in range(4):
        if not depths[side]:
            continue
        left, top, right, bottom = box
        vertical = side in (1, 3)  # top or bottom: the strip's rows are image rows
        if side == 0:
            strip = grey.crop((left, top, min(right, left + reach), bottom))
        elif side == 1:
            strip = grey.crop((left, top, right, min(bottom, top + reach)))
        elif side == 2:
            strip = grey.crop((max(left, right - reach), top, right, bottom))
        else:
            strip = grey.crop((left, max(top, bottom - reach), right, bottom))
        lines = np.asarray(strip, dtype=np.float32)
        lines = lines if vertical else lines.T
        if side >= 2:
            lines = lines[::-1]
        extra = _leading(_border_lines(lines, colours[side])[0])
        box[side] += extra if side < 2 else -extra
    return box[0], box[1], box[2], box[3]


def _content_box(grey: Image.Image) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) inside a uniform frame (padding, letterboxing,
    pillarboxing), or None when nothing frames the image."""
    width, height = grey.size
    # Frames are found on a box-reduced copy: a reduced row that is uniform lies wholly in the
    # border at full size, so the box scaled back never cuts into the content.
    factor = max(1, min(width, height) // _BORDER_PROBE_SIDE)
    probe = np.asarray(grey.reduce(factor) if factor > 1 else grey, dtype=np.float32)
    rows, cols = probe.shape
    (top, top_colour), (bottom, bottom_colour) = _opposite_borders(probe)
    top, bottom = _frame(top, bottom, rows)
    inner = probe[top : rows - bottom].T
    (left, left_colour), (right, right_colour) = _opposite_borders(inner)
    left, right = _frame(left, right, cols)
    if not (top or bottom or left or right):
        return None
    # The last reduced row or column may cover fewer than `factor` pixels: the far sides are
    # counted from the probe's start, never from the image's end.
    box = [left * factor, top * factor, (cols - right) * factor, (rows - bottom) * factor]
    box[2], box[3] = min(box[2], width), min(box[3], height)
    if factor == 1:
        return box[0], box[1], box[2], box[3]
    depths = [left, top, right, bottom]
    colours = [left_colour, top_colour, right_colour, bottom_colour]
    return _refined_box(grey, box, depths, colours, factor)


def _thumbnail(img: Image.Image) -> np.ndarray:
    grey = _grey(img)
    # Padding and letterboxing are cut away first: a wide uniform border would otherwise own the
    # low DCT frequencies, and padded images of different originals would hash alike.
    box = _content_box(grey)
    if box is not None:
        # A crop, not resize(box=...): the latter aligns its integer reduction to the whole
        # image, so the framed copy would be filtered differently from its unframed original.
        grey = grey.crop(box)
    # reducing_gap: a fast integer box reduction to twice the target, then Lanczos, which
    # removes the frequencies a box filter would alias into the low DCT coefficients.
    small = grey.resize(
        (THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0
    )
    return np.asarray(small, dtype=np.float64)


def _features_from_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """[N, side, side] grey thumbnails -> [N, FEATURE_DIM] unit vectors."""
    mean = thumbnails.mean(axis=(1, 2), keepdims=True)
    # A saturating response x / (x + mean): a brightness gain scales x and the mean alike and
    # cancels, and highlights clipped by a brightening edit sit on the flat top of the curve.
    toned = thumbnails / (thumbnails + mean + 1.0)
    coefficients = _DCT @ toned @ _DCT.T
    # Dropping DC (index 0) and normalising makes the vector blind to the overall level and gain.
    features = coefficients.reshape(len(thumbnails), -1)[:, 1:]
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # A flat image has no structure to describe (its AC energy is rounding error): its vector is
    # zero, so all flat images share one code and land in one group.
    flat = norms < _FLAT_ENERGY
    return np.where(flat, 0.0, features / np.where(flat, 1.0, norms)).astype(np.float32)


def _thumbnail_from_bytes(data: bytes) -> np.ndarray:
    """The thumbnail of `load_rgb(data)`, with JPEGs decoded at a reduced DCT scale."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        if img.format == "JPEG":
            # libjpeg scales by 1/2..1/8 while decoding, averaging 8x8 blocks much as the box
            # reduction would, and only decodes luma for colour JPEGs: several times faster.
            img.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))
        return _thumbnail(ImageOps.exif_transpose(img))


def hash_features(img: Image.Image | bytes) -> np.ndarray:
    """The PCA-hash input vector of one image: float32 [FEATURE_DIM], unit norm (or zero).

    Takes a decoded image (as `load_rgb` gives it) or the stored bytes, which are decoded the
    same way but faster.
    """
    return hash_features_batch([img])[0]


def _any_thumbnail(img: Image.Image | bytes) -> np.ndarray:
    return _thumbnail_from_bytes(img) if isinstance(img, bytes) else _thumbnail(img)


def hash_features_batch(images: Iterable[Image.Image | bytes]) -> np.ndarray:
    """`hash_features` of many images: float32 [N, FEATURE_DIM].

    One thread: parallelism comes from one process per core (a Ray task per part). Threads
    slow it down: each image is many short Pillow and numpy calls, and two threads handing the
    GIL back and forth ran at half the speed of one (measured, 200 px images).
    """
    thumbnails = [_any_thumbnail(img) for img in images]
    if not thumbnails:
        return np.zeros((0, FEATURE_DIM), dtype=np.float32)
    return _features_from_thumbnails(np.stack(thumbnails))


# -- the hasher ------------------------------------------------------------------------------------


def _single_threaded_blas() -> AbstractContextManager:
    """One BLAS thread for the fit: its many small matrix products and 64x64 SVDs ran up to 100x
    slower on a loaded 2-core host with OpenBLAS threads spinning against each other.
    """
    try:
        from threadpoolctl import threadpool_limits  # installed with imagededup (scikit-learn)
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _sign_fixed(vectors: np.ndarray) -> np.ndarray:
    """Columns flipped so each one's largest entry is positive: eigenvectors become unique."""
    largest = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[largest, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def _random_rotation(bits: int, seed: int) -> np.ndarray:
    gaussian = np.random.default_rng(seed).standard_normal((bits, bits))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))  # the sign fix makes Q the unique Haar-distributed factor


def _itq_rotation(projected: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """Iterative quantisation (Gong & Lazebnik, 2011): the rotation R minimising
    ||sign(V R) - V R||, found by alternating the binary codes and an orthogonal Procrustes step.
    """
    rotation = _random_rotation(projected.shape[1], seed)
    for _ in range(iterations):
        binary = np.where(projected @ rotation >= 0, 1.0, -1.0)
        u, _, vt = np.linalg.svd(projected.T @ binary)
        rotation = u @ vt
    return rotation


@dataclass(frozen=True, eq=False)  # array fields: identity, not elementwise, equality
class PCAHasher:
    """A fitted PCA-hash basis: codes = sign((x - mean) @ components.T @ rotation), packed."""

    mean: np.ndarray  # [D]
    components: np.ndarray  # [bits, D] principal axes, scaled to unit variance on the sample
    rotation: np.ndarray  # [bits, bits] ITQ rotation (identity without ITQ)
    bits: int

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        bits: int = PCA_HASH_BITS,
        itq_iterations: int = ITQ_ITERATIONS,
        seed: int = 0,
        sample_size: int = PCA_FIT_SAMPLE,
    ) -> "PCAHasher":
        """Fit on [N, D] features (at most `sample_size` rows are used, drawn with `seed`)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {features.shape}")
        n, dim = features.shape
        if bits <= 0 or bits % 8 or bits > dim:
            raise ValueError(f"bits must be a positive multiple of 8 and <= {dim}, got {bits}")
        if n <= bits:
            raise ValueError(f"fitting {bits} bits needs more than {bits} samples, got {n}")
        if n > sample_size:
            rng = np.random.default_rng(seed)
            features = features[np.sort(rng.choice(n, sample_size, replace=False))]
        with _single_threaded_blas():
            return cls._fit_sample(features, bits, itq_iterations, seed)

    @classmethod
    def _fit_sample(
        cls, features: np.ndarray, bits: int, itq_iterations: int, seed: int
    ) -> "PCAHasher":
        mean = features.mean(axis=0)
        centred = features - mean
        variances, axes = np.linalg.eigh(centred.T @ centred / len(centred))
        top = np.argsort(variances)[::-1][:bits]
        axes = _sign_fixed(axes[:, top])
        # Whitening before ITQ gives every principal direction an equal say in the rotation.
        floor = max(float(variances[top[0]]) * 1e-12, 1e-30)
        components = (axes / np.sqrt(np.maximum(variances[top], floor))).T
        if itq_iterations > 0:
            rotation = _itq_rotation(centred @ components.T, itq_iterations, seed)
        else:
            rotation = np.eye(bits)
        return cls(
            mean=mean.astype(np.float32),
            components=components.astype(np.float32),
            rotation=rotation.astype(np.float32),
            bits=bits,
        )

    def project(self, features: np.ndarray) -> np.ndarray:
        """Real-valued [N, bits] projections whose signs are the code bits."""
        features = np.asarray(features, dtype=np.float32)
        return (features - self.mean) @ (self.components.T @ self.rotation)

    def codes(self, features: np.ndarray) -> np.ndarray:
        """Packed sign bits, uint8 [N, bits // 8] (faiss binary layout)."""
        return np.packbits(self.project(features) >= 0, axis=1)

    def save(self, path: str | Path) -> None:
        """Write the basis as .npz, atomically (temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                np.savez(
                    out,
                    mean=self.mean,
                    components=self.components,
                    rotation=self.rotation,
                    bits=np.int64(self.bits),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def dct_signs(cls, dim: int, bits: int = PCA_HASH_BITS) -> "PCAHasher":
        """The basis for jobs too small to estimate `bits` principal axes: the signs of the
        lowest DCT coefficients themselves (the features are mean-free already)."""
        return cls(
            mean=np.zeros(dim, np.float32),
            components=np.eye(bits, dim, dtype=np.float32),
            rotation=np.eye(bits, dtype=np.float32),
            bits=bits,
        )

    @classmethod
    def load(cls, path: str | Path) -> "PCAHasher":
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(
                mean=data["mean"],
                components=data["components"],
                rotation=data["rotation"],
                bits=int(data["bits"]),
            )


def phash_codes(images: Iterable[Image.Image | bytes]) -> np.ndarray:
    """imagededup's 64-bit PHash of each image, packed like `PCAHasher.codes`: uint8 [N, 8].

    Stored bytes are decoded with `load_rgb`, as the PCA hash sees them.
    """
    from imagededup.methods import PHash  # heavy import (it pulls in torch): only for phash

    hasher = PHash(verbose=False)
    rows = []
    for img in images:
        pixels = np.asarray(load_rgb(img) if isinstance(img, bytes) else to_rgb(img))
        rows.append(np.frombuffer(bytes.fromhex(hasher.encode_image(image_array=pixels)), "u1"))
    return np.stack(rows) if rows else np.zeros((0, 8), dtype=np.uint8)


# -- Hamming-radius search -------------------------------------------------------------------------


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    as_bytes = words.view(np.uint8).reshape(*words.shape, words.itemsize)
    return table[as_bytes].sum(axis=-1, dtype=np.uint8)


def _as_words(codes: np.ndarray) -> np.ndarray:
    """uint8 [N, B] codes as uint64 [N, ceil(B / 8)] words; padding bytes are zero in every code."""
    n, width = codes.shape
    padded = -width % 8
    if padded:
        codes = np.concatenate([codes, np.zeros((n, padded), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(codes).view("<u8")


def _hamming(words: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return _popcount(words[left] ^ words[right]).sum(axis=1, dtype=np.int32)


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"codes must be uint8 [N, bytes], got {codes.dtype} {codes.shape}")
    return np.ascontiguousarray(codes)


class _Distinct(NamedTuple):
    """The distinct rows of a code array."""

    firsts: np.ndarray  # [G] ascending: the first row with each distinct code
    index: np.ndarray  # [N] position in `firsts` of each row's code


def _fingerprints(words: np.ndarray) -> np.ndarray:
    """One uint64 per code: the code itself for 64 bits, a hash of its words for longer codes."""
    if words.shape[1] == 1:
        return words[:, 0]
    mixed = words[:, 0] * _KEY_MIX
    for column in range(1, words.shape[1]):
        mixed = (mixed ^ (mixed >> np.uint64(29))) * _KEY_MIX ^ words[:, column]
    return mixed


def _distinct_codes(codes: np.ndarray) -> _Distinct:
    """Identical codes (flat images, exact copies) are at distance 0 from each other by
    definition; searching only distinct codes keeps them from forming one huge bucket in every
    multi-index table.
    """
    words = _as_words(codes)
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
    return _Distinct(np.flatnonzero(is_first), position[first_of])


def _pairs_flat(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
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
    if radius > _MAX_RADIUS_PER_WORD:
        raise ValueError(f"at most {_MAX_RADIUS_PER_WORD} errors per word, got {radius}")
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


def _pairs_in_runs(starts: np.ndarray, stops: np.ndarray) -> Iterable[tuple[np.ndarray, ...]]:
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
    near = _popcount(xor).sum(axis=1) <= radius
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
    keys *= _KEY_MIX
    keys &= ~row_mask
    keys |= row_ids
    keys.sort()
    starts, stops = _run_bounds(keys, index_bits)
    small = stops - starts <= _NUMPY_BUCKET_LIMIT
    found = [
        _verified(words, radius, tables, current, *_rows(keys, row_mask, a, b))
        for a, b in _pairs_in_runs(starts[small], stops[small])
    ]
    # A big bucket (many distinct but similar codes) is searched by faiss inside the bucket:
    # still every pair of members, but in C++ and in bounded memory.
    for start, stop in zip(starts[~small].tolist(), stops[~small].tolist(), strict=True):
        if stop - start > _LARGE_BUCKET_WARNING:
            log.warning("pca_hash: %d distinct codes share one multi-index key", stop - start)
        members = np.sort((keys[start:stop] & row_mask).astype(np.int64))
        a, b = _pairs_flat(codes[members], radius)
        found.append(_verified(words, radius, tables, current, members[a], members[b]))
    return _concatenated(found)


def _rows(
    keys: np.ndarray, row_mask: np.uint64, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return (keys[a] & row_mask).astype(np.int64), (keys[b] & row_mask).astype(np.int64)


def _concatenated(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


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
    codes = _check_codes(codes)
    tables = multi_index_tables(codes.shape[1] * 8, radius)
    if not 0 <= table < len(tables):
        raise ValueError(f"table must be in [0, {len(tables)}), got {table}")
    words = _as_words(codes)
    row_ids = np.arange(len(codes), dtype=np.uint64)
    return _table_pairs(codes, words, row_ids, radius, tables, table)


def _threaded_tables(workers: int | None) -> MapTables:
    def run(codes: np.ndarray, radius: int, count: int) -> list[Pairs]:
        words = _as_words(codes)
        row_ids = np.arange(len(codes), dtype=np.uint64)
        tables = multi_index_tables(codes.shape[1] * 8, radius)

        def search(table: int) -> Pairs:
            return _table_pairs(codes, words, row_ids, radius, tables, table)

        with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
            return list(pool.map(search, range(count)))

    return run


def _pairs_multi_index(codes: np.ndarray, radius: int, map_tables: MapTables) -> Pairs:
    count = len(multi_index_tables(codes.shape[1] * 8, radius))
    left, right = _concatenated(list(map_tables(codes, radius, count)))
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
        return _pairs_flat(codes, radius)
    if radius // words_per_code > _MAX_RADIUS_PER_WORD:
        log.warning(
            "pca_hash: radius %d on %d-bit codes is beyond the multi-index tables; "
            "searching %d codes by brute force",
            radius,
            codes.shape[1] * 8,
            len(codes),
        )
        return _pairs_flat(codes, radius)
    return _pairs_multi_index(codes, radius, map_tables or _threaded_tables(workers))


def _expand_identical(
    left: np.ndarray, right: np.ndarray, distinct: _Distinct
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
    for a, b in _pairs_in_runs(offsets[shared], offsets[shared] + sizes[shared]):
        pairs.append((by_code[a], by_code[b]))
    # Rows of two near codes: the cross product of their rows.
    count = sizes[left] * sizes[right]
    pair = np.repeat(np.arange(left.size), count)
    step = np.arange(pair.size) - np.repeat(np.cumsum(count) - count, count)
    rows_a = by_code[offsets[left][pair] + step // sizes[right][pair]]
    rows_b = by_code[offsets[right][pair] + step % sizes[right][pair]]
    pairs.append((np.minimum(rows_a, rows_b), np.maximum(rows_a, rows_b)))
    return _concatenated(pairs)


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
    codes = _check_codes(codes)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    distinct = _distinct_codes(codes)
    near_a, near_b = _distinct_pairs(
        codes[distinct.firsts], radius, exact_below, workers, map_tables
    )
    left, right = _expand_identical(near_a, near_b, distinct)
    ranked = np.lexsort((right, left))
    left, right = left[ranked], right[ranked]
    return left, right, _hamming(_as_words(codes), left, right)


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
    codes = _check_codes(codes)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    n = len(codes)
    firsts, index = _distinct_codes(codes)
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
    distance = _hamming(_as_words(codes), rows, representative)
    return PCAHashGroups(labels, representative, distance)
