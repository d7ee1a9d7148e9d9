"""Thumbnails: a JPEG of at most 256 px a side per image, made once and kept on disk.

Made with Pillow's draft mode: a JPEG decoder can scale by 1/2, 1/4 or 1/8 while it decodes, so
a 4000 px photo costs a fraction of a full decode. The file name is the image id (the SHA-256 of
the original bytes), so a thumbnail never goes stale and can be cached by browsers forever.
"""

import io
import re
from pathlib import Path

from PIL import Image, ImageOps

from curate.core.atomic import write_bytes

THUMB_SIZE = 256
QUALITY = 80
IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")

Image.init()  # every plugin registered, so MIME knows every format ingest accepts


def is_image_id(value: str) -> bool:
    return IMAGE_ID.match(value) is not None


def media_type(image_format: str | None) -> str:
    """The content type of an image's original bytes, from its PIL format (JPEG, PNG, ...)."""
    return Image.MIME.get((image_format or "").upper(), "application/octet-stream")


def thumbnail_path(thumb_dir: Path, image_id: str) -> Path:
    # Two hex digits of fan-out: 256 folders keep listings short at millions of thumbnails.
    return thumb_dir / image_id[:2] / f"{image_id}.jpg"


def make_thumbnail(data: bytes, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of the image scaled to fit size x size, upright (EXIF orientation applied),
    transparency flattened onto white."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image) or image
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def cached_thumbnail(thumb_dir: Path, image_id: str, original: bytes) -> Path:
    """Make the thumbnail of `original` and store it whole (atomic rename) under thumb_dir."""
    path = thumbnail_path(thumb_dir, image_id)
    write_bytes(path, make_thumbnail(original))
    return path
