"""Validate image bytes with Pillow and normalise decoded pixels to RGB."""

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from schemas.job import IngestOptions
from schemas.reasons import Reason

# Our per-job `max_pixels` cap replaces Pillow's process-wide one, which would otherwise refuse
# some images before we can say why, and warn about others.
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Truncated files must fail, not come back grey at the bottom.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # these swap width and height
_REENCODE_QUALITY = 95


class Rejected(Exception):
    """An item that is not an acceptable image; carries its reason code."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AcceptedImage:
    data: bytes  # the stored bytes: the original unless resized
    image_id: str  # hex SHA-256 of `data`
    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str  # the source's mode, before RGB normalisation
    resized: bool


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block is no reason to lose the image
        orientation = None
    w, h = img.size
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips 16-bit and float values to 255 instead of scaling them.
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        gray = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    """Decode stored image bytes as the later stages see them: first frame, upright, RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        upright = ImageOps.exif_transpose(img)
        return to_rgb(upright).copy()


def _check_geometry(width: int, height: int, options: IngestOptions) -> None:
    if width * height > options.max_pixels:
        raise Rejected(
            Reason.DECOMPRESSION_BOMB,
            f"{width}x{height} = {width * height} pixels > max_pixels {options.max_pixels}",
        )
    short, long = sorted((width, height))
    if short < options.min_side:
        raise Rejected(Reason.TOO_SMALL, f"{width}x{height}: shorter side < {options.min_side}")
    if long > short * options.max_aspect:
        raise Rejected(
            Reason.BAD_ASPECT, f"{width}x{height}: aspect {long / short:.2f} > {options.max_aspect}"
        )


def _downscaled(img: Image.Image, max_side: int) -> bytes:
    img.seek(0)
    upright = to_rgb(ImageOps.exif_transpose(img))
    upright.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    upright.save(out, format="JPEG", quality=_REENCODE_QUALITY)
    return out.getvalue()


def decode_image(data: bytes, options: IngestOptions) -> AcceptedImage:
    """Accept `data` as an image under the job's rules, or raise Rejected with the reason."""
    if not data:
        raise Rejected(Reason.EMPTY, "zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        detail = f"not a recognised image format: {data[:16]!r}"
        raise Rejected(Reason.NOT_AN_IMAGE, detail) from None
    except Exception as error:  # Pillow raises many kinds for broken headers
        raise Rejected(Reason.DECODE_ERROR, f"{type(error).__name__}: {error}") from None
    with img:
        fmt = img.format or "UNKNOWN"
        mode = img.mode
        width, height = _oriented_size(img)
        # Geometry comes from the header: a bomb is refused before a single pixel is decoded.
        _check_geometry(width, height, options)
        resize = options.max_side is not None and max(width, height) > options.max_side
        try:
            if resize:
                assert options.max_side is not None
                # JPEG draft decodes at a reduced DCT scale; only worth it when we shrink anyway.
                img.draft("RGB", (options.max_side, options.max_side))
                stored = _downscaled(img, options.max_side)
            else:
                # Validation needs every byte entropy-decoded (that is where truncation shows) but
                # not every pixel at full size: a 1/8-scale JPEG draft still reads the whole stream.
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
                stored = data
        except Rejected:
            raise
        except Exception as error:
            raise Rejected(Reason.DECODE_ERROR, f"{type(error).__name__}: {error}") from None
    if resize:
        with Image.open(io.BytesIO(stored)) as small:
            width, height = small.size
        fmt = "JPEG"
    return AcceptedImage(
        data=stored,
        image_id=hashlib.sha256(stored).hexdigest(),
        width=width,
        height=height,
        format=fmt,
        mode=mode,
        resized=resize,
    )
