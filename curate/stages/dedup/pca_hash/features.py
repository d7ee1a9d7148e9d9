"""What an image becomes before it is hashed: the picture inside any uniform frame, a 32x32 grey
thumbnail of it, a brightness-invariant tone curve and its low DCT frequencies, as a unit vector
of FEATURE_DIM numbers (`hash_features_batch`). `phash_codes` is imagededup's PHash, packed like
the PCA-hash codes, for `--hash phash`.
"""

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps

from curate.stages.ingest.decode import load_rgb, to_rgb

# -- defaults, and how they were chosen -----------------------------------------------------------
#
# Measured on the demo corpus, with the basis fitted on another (see the package docstring).
# - 32x32 thumbnail, antialiased (box reduction, then Lanczos): a plain box resize aliases fine
#   textures differently at different source sizes and lost 10% recall on the 50% resize.
# - 12x12 DCT block (143 features): 8x8 leaves too few dimensions for 64 bits; 14x14 and
#   16x16 did no better.
# - The x / (x + mean) tone curve lifted recall on brightness +30% (clipped highlights, the
#   hardest edit) from 0.78 to 0.87 at radius 4; log and square-root curves lost contrast edits.
# - Uniform frames (padding, letterboxing, pillarboxing) are cut before the thumbnail: a black
#   5% border on every side made 150 padded copies of different originals collide in 2,569 raw
#   pairs (bench/dedup.py, all-edits set). Only a frame is cut: bands of one colour, about
#   equally deep on two opposite sides, ending in a step. A flat band on one side (sky, ground),
#   a gradient, or a band that fades (highlights clipped by brightening) is part of the picture,
#   and where it would be cut moves with the edit; on 300 demo originals under the nine
#   photometric edits no box was cut at all, so those codes are unchanged.
# - Two more rules from real clip art and photographs (bench/copybench, misses inspected on both
#   splits): the two bands of a frame share one colour (a white band beside a red and green flag,
#   whose grey levels agree, is the picture), and white-point bands around a picture that is
#   itself a tenth that colour are its canvas, not a frame (`_canvas`). With them, easy-edit
#   recall of the 128-bit hash on the tune split rose from 0.994 to 0.998 and padded copies
#   still join their original (0.97).
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
# White-point bands covering at least this share of the image are a canvas, not a frame.
_CANVAS_SHARE = 0.1
# A frame band is at least this share of its dimension deep on each of two opposite sides.
_MIN_BORDER_SHARE = 0.02
# Within this many rows after a frame, one has at most this share of the frame's colour.
_FRAME_EDGE_ROWS = 4
_FRAME_EDGE_SHARE = 0.5


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


def _canvas(inside: np.ndarray, colour_before: float, colour_after: float) -> bool:
    """Whether two opposite bands are the canvas a picture was drawn on rather than a frame
    around it: of the white point of what they enclose, which shows their colour in a tenth of
    its pixels or more.

    Clip art sits on a white canvas whose margins are rarely equal; whether they read as a frame
    flipped with the slightest edit (a resize, a blur, JPEG ringing) and moved a copy's box.
    Its canvas is the brightest thing in the image, which brightness and contrast edits keep so.
    A photograph padded in white (the square-fitting bars of a re-post) keeps its frame cut:
    little of the photograph itself is that white.
    """
    if inside.size == 0:
        return False
    white = float(np.percentile(inside, 99))
    if min(colour_before, colour_after) < white - _BORDER_TOLERANCE:
        return False
    near = np.abs(inside - (colour_before + colour_after) / 2) <= _BORDER_TOLERANCE
    return near.mean() >= _CANVAS_SHARE


def _frame(
    before: int, after: int, length: int, colour_before: float, colour_after: float
) -> tuple[int, int]:
    """The border depths on two opposite sides when they frame the content, else (0, 0).

    Padding, letterboxing and pillarboxing put about equal bands on both sides. A flat band on
    one side only is more often part of the picture (sky, ground, a studio backdrop), and how
    deep it reads changes with every re-encoding: cutting it would split copies apart.
    """
    least = max(1, round(_MIN_BORDER_SHARE * length))
    if min(before, after) < least or abs(before - after) > max(2, 0.25 * max(before, after)):
        return 0, 0
    # Padding and letterboxing put one colour on both sides; two flat fields of different grey
    # levels (a white band beside a red and green flag, whose grey levels agree) are the picture.
    if abs(colour_before - colour_after) > _BORDER_TOLERANCE:
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
    if _canvas(probe[top : rows - bottom], top_colour, bottom_colour):
        top = bottom = 0
    top, bottom = _frame(top, bottom, rows, top_colour, bottom_colour)
    inner = probe[top : rows - bottom].T
    (left, left_colour), (right, right_colour) = _opposite_borders(inner)
    if _canvas(inner[left : inner.shape[0] - right], left_colour, right_colour):
        left = right = 0
    left, right = _frame(left, right, cols, left_colour, right_colour)
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
