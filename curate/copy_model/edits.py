"""Named copy edits: the deterministic changes a copied image goes through on its way around the
web, in four families, as the copy benchmark (bench/copybench) and a model's calibration apply
them. Training draws random, stronger versions of the same kinds (`augment`).

  photometric      JPEG quality 30, brightness +30%, contrast -30%, greyscale, Gaussian blur
  re-encoding      WebP, resize to 50%
  light geometric  central crop to 90%, a 5% black border, a caption over the lower third
  hard geometric   central crop to 50% of each side, crop to 70% + resize back, mirror,
                   rotation by 10 degrees

Each edit takes an RGB image and returns the image as a reader of the saved file would decode it
(re-encoding edits go through their codec), so that scoring in memory and on files agree.
"""

import io
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

PHOTOMETRIC = "photometric"
REENCODING = "re-encoding"
LIGHT_GEOMETRIC = "light geometric"
HARD_GEOMETRIC = "hard geometric"
FAMILIES = (PHOTOMETRIC, REENCODING, LIGHT_GEOMETRIC, HARD_GEOMETRIC)
# What a perceptual hash is expected to catch: the pixels are all still there.
EASY_FAMILIES = (PHOTOMETRIC, REENCODING)
CAPTIONS = ("(c) lvd-curate 2024", "SALE -50% today only", "follow @copybench", "www.example.org")


class Edit(NamedTuple):
    name: str
    family: str
    apply: Callable[[Image.Image], Image.Image]
    # A codec edit's format and options: its file is the original saved so, and `apply` is
    # what a reader decodes from it. None: the edited pixels are stored in the original's format.
    codec: tuple[str, dict] | None = None


def reencoded(img: Image.Image, fmt: str, **options) -> Image.Image:
    """`img` saved in `fmt` and decoded again: what a reader of that file sees."""
    out = io.BytesIO()
    img.save(out, fmt, **options)
    out.seek(0)
    with Image.open(out) as decoded:
        return decoded.convert("RGB")


def central_crop(img: Image.Image, keep: float) -> Image.Image:
    """The centred box of `keep` times the width and the height."""
    w, h = img.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def caption(img: Image.Image, text: str = CAPTIONS[0], height_share: float = 0.125) -> Image.Image:
    """White text with a dark outline across the lower third, about `height_share` of the
    height tall: the watermark or meme caption of a re-posted picture."""
    out = img.copy()
    font = ImageFont.load_default(size=max(10, round(img.height * height_share)))
    ImageDraw.Draw(out).text(
        (img.width * 0.05, img.height * 0.62),
        text,
        font=font,
        fill=(255, 255, 255),
        stroke_width=max(1, img.height // 100),
        stroke_fill=(0, 0, 0),
    )
    return out


def _padded(img: Image.Image) -> Image.Image:
    dx, dy = round(img.width * 0.05), round(img.height * 0.05)
    return ImageOps.expand(img, border=(dx, dy, dx, dy), fill=(0, 0, 0))


def _half(img: Image.Image) -> Image.Image:
    return img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS)


def _crop_and_resize(img: Image.Image) -> Image.Image:
    return central_crop(img, 0.7).resize(img.size, Image.Resampling.BICUBIC)


_JPEG30 = ("JPEG", {"quality": 30})
_WEBP75 = ("WEBP", {"quality": 75})
EDITS: tuple[Edit, ...] = (
    Edit("JPEG q30", PHOTOMETRIC, lambda img: reencoded(img, "JPEG", quality=30), _JPEG30),
    Edit("brightness +30%", PHOTOMETRIC, lambda img: ImageEnhance.Brightness(img).enhance(1.3)),
    Edit("contrast -30%", PHOTOMETRIC, lambda img: ImageEnhance.Contrast(img).enhance(0.7)),
    Edit("greyscale", PHOTOMETRIC, lambda img: ImageOps.grayscale(img).convert("RGB")),
    Edit("blur", PHOTOMETRIC, lambda img: img.filter(ImageFilter.GaussianBlur(2))),
    Edit("WebP", REENCODING, lambda img: reencoded(img, "WEBP", quality=75), _WEBP75),
    Edit("resize 50%", REENCODING, _half),
    Edit("crop 90%", LIGHT_GEOMETRIC, lambda img: central_crop(img, 0.9)),
    Edit("padding", LIGHT_GEOMETRIC, _padded),
    Edit("text overlay", LIGHT_GEOMETRIC, caption),
    Edit("crop 50%", HARD_GEOMETRIC, lambda img: central_crop(img, 0.5)),
    Edit("crop 70% + resize", HARD_GEOMETRIC, _crop_and_resize),
    Edit("mirror", HARD_GEOMETRIC, ImageOps.mirror),
    Edit("rotate 10°", HARD_GEOMETRIC, lambda img: img.rotate(10, Image.Resampling.BICUBIC)),
)
BY_NAME = {edit.name: edit for edit in EDITS}


def family_of(names: list[str]) -> list[str]:
    """The family of each edit name ("" for an unedited original)."""
    return [BY_NAME[name].family if name else "" for name in names]


def write_copies(sources: list[Path], out_dir: Path, names: tuple[str, ...]) -> list[Path]:
    """Edited copies of image files, one per (file, edit name) in turn, written as PNG (codec
    edits in their codec) under out_dir: a stand-in evaluation set whose copies a crawl holds."""
    from curate.core.atomic import write_bytes
    from curate.stages.ingest.decode import load_rgb

    written = []
    for number, source in enumerate(sources):
        edit = BY_NAME[names[number % len(names)]]
        img = load_rgb(Path(source).read_bytes())
        fmt, options = edit.codec or ("PNG", {})
        out = io.BytesIO()
        (img if edit.codec else edit.apply(img)).save(out, fmt, **options)
        path = out_dir / f"copy-{number:03d}.{fmt.lower().replace('jpeg', 'jpg')}"
        write_bytes(path, out.getvalue())
        written.append(path)
    return written
