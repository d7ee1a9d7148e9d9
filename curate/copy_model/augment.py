"""SSCD's copy augmentations (Pizzi et al., CVPR 2022, section 3.3 "strong" recipe): each view of an
image is cropped hard, flipped, rotated, colour-jittered, blurred, overlaid with text or an
emoji-like shape, framed, and re-encoded as JPEG, every draw from the given rng.

Two views of one image are a positive pair for the InfoNCE loss; views of other images in the
batch are the negatives. The views are far stronger than the named edits the benchmark applies
(`edits`), so the model meets those as easy cases of what it was trained on.
"""

import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from curate.copy_model.config import AugmentConfig
from curate.copy_model.edits import CAPTIONS

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_WORDS = (*CAPTIONS, "OMG", "lol", "#copy", "2024", "share!", "meme", "@user_123", "ORIGINAL")


def _resized_crop(img: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop, drawn from `rng`: an area share and aspect ratio, then a
    position; falls back to the whole image when no box fits in ten tries."""
    width, height = img.size
    area = width * height
    low, high = (math.log(r) for r in config.crop_ratio)
    for _ in range(10):
        target = area * rng.uniform(*config.crop_scale)
        ratio = math.exp(rng.uniform(low, high))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            box = (left, top, left + w, top + h)
            break
    else:
        box = (0, 0, width, height)
    return img.resize((config.size, config.size), Image.Resampling.BILINEAR, box=box)


def _colour_jitter(
    img: Image.Image, config: AugmentConfig, rng: np.random.Generator
) -> Image.Image:
    steps = [
        lambda im: ImageEnhance.Brightness(im).enhance(
            rng.uniform(1 - config.brightness, 1 + config.brightness)
        ),
        lambda im: ImageEnhance.Contrast(im).enhance(
            rng.uniform(1 - config.contrast, 1 + config.contrast)
        ),
        lambda im: ImageEnhance.Color(im).enhance(
            rng.uniform(1 - config.saturation, 1 + config.saturation)
        ),
        lambda im: _hue_shift(im, rng.uniform(-config.hue, config.hue)),
    ]
    for step in rng.permutation(len(steps)):
        img = steps[step](img)
    return img


def _hue_shift(img: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _rotated(img: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    degrees = rng.uniform(-config.max_degrees, config.max_degrees)
    return img.rotate(degrees, Image.Resampling.BILINEAR, fillcolor=_random_colour(rng))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.5:  # black or white: the usual fills of rotated and padded copies
        level = int(rng.choice([0, 255]))
        return level, level, level
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    draw = ImageDraw.Draw(img)
    size = max(8, int(img.height * rng.uniform(0.08, 0.25)))
    font = ImageFont.load_default(size=size)
    words = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 3))))
    x, y = rng.uniform(-0.2, 0.8) * img.width, rng.uniform(0.0, 0.85) * img.height
    draw.text(
        (x, y),
        words,
        font=font,
        fill=_random_colour(rng),
        stroke_width=int(rng.integers(0, 3)),
        stroke_fill=_random_colour(rng),
    )
    return img


def _emoji(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An emoji-like sticker: a filled disc, star or rounded square with a face or a mark."""
    draw = ImageDraw.Draw(img)
    side = img.width * rng.uniform(0.15, 0.45)
    cx, cy = rng.uniform(0, img.width), rng.uniform(0, img.height)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill, ink = _random_colour(rng), _random_colour(rng)
    shape = int(rng.integers(0, 3))
    if shape == 0:
        draw.ellipse(box, fill=fill, outline=ink, width=max(1, int(side / 20)))
    elif shape == 1:
        points = []
        for k in range(10):
            radius = side / 2 if k % 2 == 0 else side / 5
            angle = math.pi / 5 * k - math.pi / 2
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill, outline=ink)
    else:
        draw.rounded_rectangle(box, radius=side / 5, fill=fill, outline=ink)
    # Two eyes and a mouth: what makes a sticker look like an emoji rather than a blob.
    eye = side / 10
    for dx in (-side / 6, side / 6):
        draw.ellipse(
            (
                cx + dx - eye / 2,
                cy - side / 8 - eye / 2,
                cx + dx + eye / 2,
                cy - side / 8 + eye / 2,
            ),
            fill=ink,
        )
    draw.arc(
        (cx - side / 4, cy - side / 8, cx + side / 4, cy + side / 4),
        20,
        160,
        fill=ink,
        width=max(1, int(side / 25)),
    )
    return img


def _padded(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    share = rng.uniform(0.02, 0.15)
    dx, dy = round(img.width * share), round(img.height * share * rng.uniform(0.5, 1.5))
    framed = ImageOps.expand(img, border=(dx, dy, dx, dy), fill=_random_colour(rng))
    return framed.resize(img.size, Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=int(rng.integers(10, 90)))
    out.seek(0)
    with Image.open(out) as decoded:
        return decoded.convert("RGB")


def copy_view(img: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """One strongly augmented view of an RGB image, config.size pixels square."""
    view = _resized_crop(img, config, rng)
    if rng.random() < config.flip:
        view = ImageOps.mirror(view)
    if rng.random() < config.rotate:
        view = _rotated(view, config, rng)
    if rng.random() < config.colour:
        view = _colour_jitter(view, config, rng)
    if rng.random() < config.grey:
        view = ImageOps.grayscale(view).convert("RGB")
    if rng.random() < config.blur:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0)))
    if rng.random() < config.text:
        view = _text(view, rng)
    if rng.random() < config.emoji:
        view = _emoji(view, rng)
    if rng.random() < config.pad:
        view = _padded(view, rng)
    if rng.random() < config.jpeg:
        view = _jpeg(view, rng)
    return view


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> a normalised float batch [N, 3, H, W] (ImageNet statistics, as
    the copy descriptor's inference transform)."""
    pixels = np.stack([np.asarray(img, np.float32) for img in images]) / 255.0
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def positive_pairs(
    images: list[Image.Image], config: AugmentConfig, rng: np.random.Generator
) -> torch.Tensor:
    """Two views of every image: [2N, 3, size, size], view k of image i at row k * N + i."""
    first = [copy_view(img, config, rng) for img in images]
    second = [copy_view(img, config, rng) for img in images]
    return to_tensor(first + second)
