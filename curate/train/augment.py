"""DINOv2 multi-crop augmentation and iBOT block masks, every random draw from a given rng.

The recipe is the DINOv2 paper's (and `dinov2/data/augmentations.py`): two global crops and N
local crops, each flipped, colour-jittered, sometimes greyed, blurred and (second global crop
only) solarised, then ImageNet-normalised. Parameters are drawn first (`draw_view`) and applied
second (`apply_view`), both from a `random.Random` the caller seeds per sample, so a sample's
views are the same in any process and with any number of loader workers.

Pixels are processed with Pillow and numpy only: both are exact and single-threaded, whereas
torch kernels may reduce in a thread-count-dependent order, and a loader worker runs one thread
while an in-process loader runs many.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)

# RandomResizedCrop's aspect-ratio range (torchvision's default, used by DINOv2).
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
JITTER_P = 0.8
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAYSCALE_P = 0.2
BLUR_KERNEL = 9  # DINOv2's transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128

# iBOT's rectangles: aspect ratios in (0.3, 1/0.3); one rectangle covers at most half the grid
# (DINOv2's train.py builds its MaskingGenerator with max_num_patches = 0.5 * patches).
MASK_MIN_ASPECT = 0.3
MASK_MAX_BLOCK_SHARE = 0.5


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)

    def __post_init__(self) -> None:
        if self.global_size < 1 or self.local_size < 1:
            raise ValueError(f"crop sizes must be positive: {self.global_size}, {self.local_size}")
        if self.n_local < 0:
            raise ValueError(f"n_local must be >= 0, not {self.n_local}")
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, not {(low, high)}")


@dataclass(frozen=True)
class MaskingConfig:
    probability: float = 0.5  # share of global crops that are masked
    ratio: tuple[float, float] = (0.1, 0.5)
    min_block_patches: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1:
            raise ValueError(f"masking probability must be in [0, 1], not {self.probability}")
        low, high = self.ratio
        if not 0 <= low <= high <= 1:
            raise ValueError(f"mask ratio must satisfy 0 <= low <= high <= 1, not {self.ratio}")
        if self.min_block_patches < 1:
            raise ValueError(f"min_block_patches must be >= 1, not {self.min_block_patches}")


@dataclass(frozen=True)
class ViewRecipe:
    """The per-view probabilities that differ between the three kinds of crop."""

    blur_p: float
    solarize_p: float


# The paper's probabilities. The reference code's GaussianBlur(p=...) wrapper hands `1 - p` to
# RandomApply, so it blurs global crop 1 never, global crop 2 with p 0.9 and local crops with
# p 0.5 -- the inverse of what its arguments and the paper say. We apply the documented ones.
GLOBAL_1 = ViewRecipe(blur_p=1.0, solarize_p=0.0)
GLOBAL_2 = ViewRecipe(blur_p=0.1, solarize_p=0.2)
LOCAL = ViewRecipe(blur_p=0.5, solarize_p=0.0)


@dataclass(frozen=True)
class ColorJitterParams:
    order: tuple[int, ...]  # a permutation of (brightness, contrast, saturation, hue)
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view: enough to redo it exactly."""

    box: tuple[int, int, int, int]  # top, left, height, width in the source image
    size: int
    flip: bool
    jitter: ColorJitterParams | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm, our rng): top, left, height, width."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback after ten misses: the largest centred box within the ratio range.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draw_jitter(rng: random.Random) -> ColorJitterParams:
    brightness, contrast, saturation, hue = JITTER
    return ColorJitterParams(
        order=tuple(rng.sample(range(4), 4)),
        brightness=rng.uniform(1 - brightness, 1 + brightness),
        contrast=rng.uniform(1 - contrast, 1 + contrast),
        saturation=rng.uniform(1 - saturation, 1 + saturation),
        hue=rng.uniform(-hue, hue),
    )


def draw_view(
    recipe: ViewRecipe,
    size: int,
    scale: tuple[float, float],
    image_size: tuple[int, int],
    rng: random.Random,
) -> ViewParams:
    """Draw one view's random parameters; `image_size` is the source's (width, height)."""
    box = resized_crop_box(image_size[0], image_size[1], scale, rng)
    flip = rng.random() < FLIP_P
    jitter = _draw_jitter(rng) if rng.random() < JITTER_P else None
    grayscale = rng.random() < GRAYSCALE_P
    blur_sigma = rng.uniform(*BLUR_SIGMA) if rng.random() < recipe.blur_p else None
    solarize = rng.random() < recipe.solarize_p
    return ViewParams(box, size, flip, jitter, grayscale, blur_sigma, solarize)


def _apply_jitter(img: Image.Image, jitter: ColorJitterParams) -> Image.Image:
    for index in jitter.order:
        if index == 0:
            img = F.adjust_brightness(img, jitter.brightness)
        elif index == 1:
            img = F.adjust_contrast(img, jitter.contrast)
        elif index == 2:
            img = F.adjust_saturation(img, jitter.saturation)
        else:
            img = F.adjust_hue(img, jitter.hue)
    return img


def gaussian_blur(img: Image.Image, sigma: float, kernel_size: int = BLUR_KERNEL) -> Image.Image:
    """torchvision's GaussianBlur(kernel_size, sigma) in numpy: separable, reflect-padded."""
    half = kernel_size // 2
    x = np.arange(kernel_size, dtype=np.float32) - half
    kernel = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    kernel /= kernel.sum()
    pixels = np.asarray(img, dtype=np.float32)
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((half, half), (half, half), (0, 0)), mode="reflect")
    rows = sum(kernel[t] * padded[t : t + height] for t in range(kernel_size))
    out = sum(kernel[t] * rows[:, t : t + width] for t in range(kernel_size))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _normalised(img: Image.Image) -> Tensor:
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255)
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def apply_view(image: Image.Image, params: ViewParams) -> Tensor:
    """One view of an RGB image as float32 [3, size, size], ImageNet-normalised."""
    top, left, height, width = params.box
    img = F.resized_crop(
        image, top, left, height, width, [params.size, params.size], InterpolationMode.BICUBIC
    )
    if params.flip:
        img = F.hflip(img)
    if params.jitter is not None:
        img = _apply_jitter(img, params.jitter)
    if params.grayscale:
        img = img.convert("L").convert("RGB")
    if params.blur_sigma is not None:
        img = gaussian_blur(img, params.blur_sigma)
    if params.solarize:
        img = ImageOps.solarize(img, threshold=SOLARIZE_THRESHOLD)
    return _normalised(img)


class MultiCrop:
    """DINOv2 multi-crop: an RGB image and an rng -> (2 global crops, n_local local crops)."""

    def __init__(self, config: MultiCropConfig):
        self.config = config

    def draw(self, image_size: tuple[int, int], rng: random.Random) -> list[ViewParams]:
        """The parameters of all views of one image: global 1, global 2, then the local ones."""
        c = self.config
        views = [
            draw_view(GLOBAL_1, c.global_size, c.global_scale, image_size, rng),
            draw_view(GLOBAL_2, c.global_size, c.global_scale, image_size, rng),
        ]
        views += [
            draw_view(LOCAL, c.local_size, c.local_scale, image_size, rng) for _ in range(c.n_local)
        ]
        return views

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[list[Tensor], list[Tensor]]:
        """(2 global crops [3,G,G], n_local local crops [3,L,L]), float32, ImageNet-normalised."""
        if image.mode != "RGB":
            raise ValueError(f"MultiCrop needs an RGB image, not mode {image.mode}")
        views = [apply_view(image, params) for params in self.draw(image.size, rng)]
        return views[:2], views[2:]


def _mask_block(
    mask: np.ndarray,
    max_patches: float,
    min_patches: int,
    log_aspect: tuple[float, float],
    rng: random.Random,
) -> int:
    """Add one rectangle of new masked patches (at most `max_patches`); returns how many."""
    grid_h, grid_w = mask.shape
    added = 0
    for _ in range(10):
        target_area = rng.uniform(min_patches, max_patches)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < grid_w and h < grid_h:
            top = rng.randint(0, grid_h - h)
            left = rng.randint(0, grid_w - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:
                block[...] = True
                added += new
            if added > 0:
                break
    return added


def block_mask(grid: int, n_patches: int, min_block_patches: int, rng: random.Random) -> np.ndarray:
    """One [grid, grid] iBOT mask: rectangles until about `n_patches` are masked."""
    mask = np.zeros((grid, grid), dtype=bool)
    max_block = MASK_MAX_BLOCK_SHARE * grid * grid
    log_aspect = (math.log(MASK_MIN_ASPECT), math.log(1 / MASK_MIN_ASPECT))
    count = 0
    while count < n_patches:
        room = min(n_patches - count, max_block)
        added = _mask_block(mask, room, min_block_patches, log_aspect, rng)
        if added == 0:  # no rectangle fits any more: stop short rather than loop forever
            break
        count += added
    return mask


def block_masks(n_images: int, grid: int, config: MaskingConfig, rng: random.Random) -> Tensor:
    """Bool [n_images, grid*grid]: iBOT block masks; about `probability` of the rows have masks."""
    if n_images < 0 or grid < 1:
        raise ValueError(f"need n_images >= 0 and grid >= 1, not {n_images} and {grid}")
    patches = grid * grid
    n_masked = int(n_images * config.probability)
    # As DINOv2's collate: the masked rows' target ratios are stratified over the ratio range
    # (one draw per equal slice), and the rows are shuffled so masked ones land anywhere.
    bounds = np.linspace(config.ratio[0], config.ratio[1], n_masked + 1)
    rows = [
        block_mask(
            grid,
            int(patches * rng.uniform(bounds[i], bounds[i + 1])),
            config.min_block_patches,
            rng,
        )
        for i in range(n_masked)
    ]
    rows += [np.zeros((grid, grid), dtype=bool)] * (n_images - n_masked)
    rng.shuffle(rows)
    if not rows:
        return torch.zeros((0, patches), dtype=torch.bool)
    return torch.from_numpy(np.stack(rows).reshape(n_images, patches))
