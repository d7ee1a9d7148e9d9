"""Small images made by the tests themselves."""

import io

import numpy as np
from PIL import Image


def photo(width: int = 160, height: int = 120, seed: int = 0) -> Image.Image:
    """A smooth random RGB image: compresses like a photo, distinct per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3))
    img = Image.fromarray(coarse.astype(np.uint8))
    return img.resize((width, height), Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def jpeg(width: int = 160, height: int = 120, seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=quality)


def truncated_jpeg(seed: int = 0) -> bytes:
    data = jpeg(256, 256, seed)
    return data[: len(data) // 2]
