"""The files planted in the crawl: originals, near duplicates, broken files, odd modes, seeds."""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, UnidentifiedImageError

from curate.demo.classes import (
    CLASSES,
    RENDERERS,
    SEED_CLASSES,
    _coords,
    _draw_size,
    _rng,
    _Stream,
    render_object_circles,
    render_texture_noise,
    render_texture_stripes,
)

EDIT_KINDS = ("jpeg", "format", "resize", "crop", "brightness", "contrast")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}


# -- encoding -------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Encoder settings are explicit, so output bytes never depend on Pillow defaults."""
    out = io.BytesIO()
    if fmt == "JPEG":
        img.save(out, "JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "PNG":
        # Level 3 compresses nearly as well as the default 6 in a third of the time.
        img.save(out, "PNG", compress_level=3)
    elif fmt == "WEBP":
        img.save(out, "WEBP", quality=quality, method=4, lossless=False)
    else:
        raise ValueError(f"no encoder settings for {fmt}")
    return out.getvalue()


def _decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


# -- what goes in the crawl -----------------------------------------------------------------------


@dataclass(frozen=True)
class _OriginalSpec:
    index: int
    label: str
    size: tuple[int, int]
    fmt: str
    quality: int


def _original_spec(seed: int, index: int) -> tuple[_OriginalSpec, np.random.Generator]:
    """The spec comes from the image's own stream, so index i is the same image for any count."""
    rng = _rng(seed, _Stream.ORIGINAL, index)
    size = _draw_size(rng)
    roll = rng.random()
    fmt = "JPEG" if roll < 0.78 else "PNG" if roll < 0.9 else "WEBP"
    quality = int(rng.integers(82, 96))
    return _OriginalSpec(index, CLASSES[index % len(CLASSES)], size, fmt, quality), rng


def make_original(seed: int, index: int) -> bytes:
    spec, rng = _original_spec(seed, index)
    return encode(RENDERERS[spec.label](rng, *spec.size), spec.fmt, spec.quality)


def make_seed_image(seed: int, index: int) -> tuple[str, bytes]:
    """A new image of one of the seed classes, from a stream the crawl never uses."""
    rng = _rng(seed, _Stream.SEED, index)
    label = SEED_CLASSES[index % len(SEED_CLASSES)]
    return label, encode(RENDERERS[label](rng, *_draw_size(rng)), "JPEG", 90)


@dataclass(frozen=True)
class _NearDuplicateSpec:
    kind: str
    amount: float  # quality, scale, crop fraction or enhancement factor, by kind
    fmt: str  # the output format
    quality: int

    @property
    def edit(self) -> str:
        if self.kind == "jpeg":
            return f"jpeg_q{int(self.amount)}"
        if self.kind == "format":
            return f"format_{self.fmt.lower()}"
        return f"{self.kind}_{self.amount:.2f}"


def _near_duplicate_spec(
    rng: np.random.Generator, kind: str, source_fmt: str
) -> _NearDuplicateSpec:
    quality = int(rng.integers(80, 96))
    if kind == "jpeg":
        return _NearDuplicateSpec(kind, int(rng.integers(40, 71)), "JPEG", 0)
    if kind == "format":
        fmt = str(rng.choice([f for f in ("JPEG", "PNG", "WEBP") if f != source_fmt]))
        return _NearDuplicateSpec(kind, 0.0, fmt, quality)
    if kind == "resize":
        amount = round(rng.uniform(0.5, 0.8), 2)
    elif kind == "crop":
        amount = round(rng.uniform(0.03, 0.10), 2)
    else:  # brightness or contrast, up or down by 15-30%
        amount = round(1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3), 2)
    return _NearDuplicateSpec(kind, amount, source_fmt, quality)


def make_near_duplicate(source: bytes, spec: _NearDuplicateSpec, rng: np.random.Generator) -> bytes:
    img = _decode_rgb(source)
    w, h = img.size
    if spec.kind == "jpeg":
        return encode(img, "JPEG", int(spec.amount))
    if spec.kind == "resize":
        size = (round(w * spec.amount), round(h * spec.amount))
        img = img.resize(size, Image.Resampling.LANCZOS)
    elif spec.kind == "crop":
        # The fraction is split unevenly between opposite borders, as a real re-crop would be.
        left, top = rng.uniform(0.2, 0.8, 2) * spec.amount * 2
        right, bottom = spec.amount * 2 - left, spec.amount * 2 - top
        img = img.crop(
            (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
        )
    elif spec.kind == "brightness":
        img = ImageEnhance.Brightness(img).enhance(spec.amount)
    elif spec.kind == "contrast":
        img = ImageEnhance.Contrast(img).enhance(spec.amount)
    return encode(img, spec.fmt, spec.quality)


# Broken files: (name, extension, expected ingest reason).
BROKEN_FILES = (
    ("truncated", ".jpg", "decode_error"),
    ("html_page", ".jpg", "not_an_image"),
    ("random_bytes", ".png", "not_an_image"),
    ("empty", ".jpg", "empty"),
    ("tiny", ".png", "too_small"),
    ("banner", ".jpg", "bad_aspect"),
    ("bomb", ".png", "decompression_bomb"),
)

_HTML_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>404 Not Found</title></head>
<body><h1>Not Found</h1><p>The requested image was not found on this server.</p></body>
</html>
"""


def _truncated_jpeg(rng: np.random.Generator) -> bytes:
    """Header intact, entropy-coded data cut off half way: opens fine, fails on load."""
    data = encode(render_texture_noise(rng, 480, 360), "JPEG", 92)
    start_of_scan = data.index(b"\xff\xda")
    return data[: start_of_scan + (len(data) - start_of_scan) // 2]


def _random_bytes(rng: np.random.Generator) -> bytes:
    # Some Pillow plugins (TGA, for one) have no magic number; draw again until none claims it.
    while True:
        data = rng.bytes(2048)
        try:
            Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return data
        except Exception:
            continue


def _decompression_bomb() -> bytes:
    """100 million pixels (> Pillow's 89,478,485 limit) in about 12 kB: 1-bit, all zero."""
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000), 0).save(out, "PNG", compress_level=9)
    return out.getvalue()


def make_broken(name: str, rng: np.random.Generator) -> bytes:
    if name == "truncated":
        return _truncated_jpeg(rng)
    if name == "html_page":
        return _HTML_PAGE
    if name == "random_bytes":
        return _random_bytes(rng)
    if name == "empty":
        return b""
    if name == "tiny":
        return encode(render_object_circles(rng, 20, 20), "PNG")
    if name == "banner":
        return encode(render_texture_stripes(rng, 1000, 100), "JPEG", 90)
    if name == "bomb":
        return _decompression_bomb()
    raise ValueError(name)


# Mode samples: valid images whose Pillow mode (or container) the ingest normaliser must handle.
MODE_SAMPLES = (
    ("palette_transparency", ".png"),
    ("la", ".png"),
    ("rgba", ".png"),
    ("cmyk", ".jpg"),
    ("gray16", ".png"),
    ("bilevel", ".png"),
    ("animated", ".gif"),
    ("exif_orientation_6", ".jpg"),
)
_EXIF_ORIENTATION = 0x0112


def _alpha_vignette(w: int, h: int) -> Image.Image:
    x, y = _coords(w, h)
    d = np.sqrt(((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2)
    return Image.fromarray(np.clip((1.2 - d) * 400, 0, 255).astype(np.uint8))


def _animated_gif(rng: np.random.Generator, img: Image.Image) -> bytes:
    w, h = img.size
    # Frames must differ, or Pillow merges them into one.
    frames = [img.rotate(0, translate=(k * w // 10, 0)) for k in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    return out.getvalue()


def make_mode_sample(variant: str, rng: np.random.Generator, label: str) -> bytes:
    w, h = _draw_size(rng)
    img = RENDERERS[label](rng, w, h)
    out = io.BytesIO()
    if variant == "palette_transparency":
        img.quantize(colors=64, dither=Image.Dither.NONE).save(out, "PNG", transparency=0)
    elif variant == "la":
        Image.merge("LA", (img.convert("L"), _alpha_vignette(w, h))).save(out, "PNG")
    elif variant == "rgba":
        rgba = img.copy()
        rgba.putalpha(_alpha_vignette(w, h))
        rgba.save(out, "PNG")
    elif variant == "cmyk":
        img.convert("CMYK").save(out, "JPEG", quality=90)
    elif variant == "gray16":
        gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
        Image.fromarray(gray).save(out, "PNG")
    elif variant == "bilevel":
        img.convert("1").save(out, "PNG")
    elif variant == "animated":
        return _animated_gif(rng, img)
    elif variant == "exif_orientation_6":
        # Orientation 6 asks viewers to turn the stored pixels 90 degrees clockwise, so the
        # stored pixels are the upright image turned the other way.
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=90, exif=exif)
    else:
        raise ValueError(variant)
    return out.getvalue()
