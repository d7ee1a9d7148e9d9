"""The built-in demo corpus: a synthetic, uncurated "crawl" with planted problems, and seed images.

Everything is drawn from numpy generators seeded per image, so the same (count, seed) gives
byte-identical files on every machine, with no download. The crawl holds labelled originals from
ten look-alike classes, exact and near duplicates of some of them, broken files with the reason
code ingest must give each, and valid images in unusual modes. `manifest.json`, written last,
says what every file is, so later stages can be scored against it.
"""

import colorsys
import hashlib
import io
import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, UnidentifiedImageError
from tqdm import tqdm

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CRAWL_DIR = "crawl"
SEED_DIR = "seeds/demo"
FILES_PER_FOLDER = 250
MIN_COUNT = 60
MIN_SEEDS = 20
MIN_SIDE = 96  # comfortably above ingest's default min_side of 64
MAX_SHORT_SIDE = 512
MAX_ASPECT = 2.5

CLASSES = (
    "scene_day",
    "scene_sunset",
    "scene_mountains",
    "texture_noise",
    "texture_stripes",
    "texture_checkers",
    "texture_dots",
    "texture_waves",
    "object_circles",
    "object_polygons",
)
# Few enough that retrieval from the seeds has a clear answer, more than one so it is not trivial.
SEED_CLASSES = ("scene_sunset", "texture_checkers", "object_polygons")

EDIT_KINDS = ("jpeg", "format", "resize", "crop", "brightness", "contrast")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}

Rgb = tuple[int, int, int]
Array = np.ndarray


class FileKind(StrEnum):
    ORIGINAL = "original"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    BROKEN = "broken"
    MODE_SAMPLE = "mode_sample"
    SEED = "seed"


class _Stream(IntEnum):
    """Independent random streams, so adding items of one kind never shifts another kind."""

    ORIGINAL = 0
    LAYOUT = 1
    EXACT = 2
    NEAR = 3
    BROKEN = 4
    MODE = 5
    SEED = 6


# -- manifest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoFile:
    path: str  # relative to the corpus folder, with forward slashes
    kind: FileKind
    sha256: str
    label: str | None = None  # the class, where the file has one
    duplicate_of: str | None = None  # the original's path, for exact and near duplicates
    edit: str | None = None  # how a near duplicate was made, e.g. "jpeg_q55", "crop_0.05"
    expected_reason: str | None = None  # the ingest reason code a broken file must get
    variant: str | None = None  # what a mode sample exercises, e.g. "cmyk", "animated"
    format: str | None = None  # as Pillow names it; None for files that are not images
    mode: str | None = None  # as Pillow opens it
    width: int | None = None  # upright, i.e. after EXIF orientation, as ingest reports it
    height: int | None = None


@dataclass(frozen=True)
class DemoManifest:
    seed: int
    count: int
    classes: tuple[str, ...] = CLASSES
    seed_classes: tuple[str, ...] = SEED_CLASSES
    files: tuple[DemoFile, ...] = field(default_factory=tuple)
    version: int = MANIFEST_VERSION

    def by_kind(self, kind: FileKind | str) -> list[DemoFile]:
        return [f for f in self.files if f.kind == kind]

    def file(self, path: str) -> DemoFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def crawl_files(self) -> list[DemoFile]:
        return [f for f in self.files if f.kind != FileKind.SEED]

    @property
    def seed_files(self) -> list[DemoFile]:
        return self.by_kind(FileKind.SEED)

    def expected_errors(self) -> dict[str, str]:
        """Relative path -> the reason code ingest must reject it with."""
        return {f.path: f.expected_reason for f in self.files if f.expected_reason is not None}

    def labels(self) -> dict[str, str]:
        """Relative path -> class, for every file that has one (crawl and seeds)."""
        return {f.path: f.label for f in self.files if f.label is not None}

    def duplicates(self) -> dict[str, str]:
        """Relative path of each exact or near duplicate -> the original it copies."""
        return {f.path: f.duplicate_of for f in self.files if f.duplicate_of is not None}

    def to_json(self) -> str:
        body = asdict(self)
        body["classes"] = list(self.classes)
        body["seed_classes"] = list(self.seed_classes)
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DemoManifest":
        body = json.loads(text)
        if body.get("version") != MANIFEST_VERSION:
            raise ValueError(f"demo manifest version {body.get('version')!r} is not supported")
        files = tuple(
            DemoFile(**{**entry, "kind": FileKind(entry["kind"])}) for entry in body["files"]
        )
        return cls(
            seed=body["seed"],
            count=body["count"],
            classes=tuple(body["classes"]),
            seed_classes=tuple(body["seed_classes"]),
            files=files,
            version=body["version"],
        )


def load_manifest(out_dir: Path) -> DemoManifest:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} holds no complete demo corpus")
    return DemoManifest.from_json(path.read_text())


# -- randomness and pixels ------------------------------------------------------------------------


def _rng(seed: int, stream: _Stream, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), index])


def _draw_size(rng: np.random.Generator) -> tuple[int, int]:
    # Skewed towards small images: keeps generation fast while still spanning the range.
    short = int(MIN_SIDE + (MAX_SHORT_SIDE - MIN_SIDE) * rng.random() ** 1.6)
    long = round(short * (1.0 + (MAX_ASPECT - 1.0) * rng.random() ** 2))
    return (long, short) if rng.random() < 0.7 else (short, long)


def _jitter(rng: np.random.Generator, colour: Rgb, amount: int = 28) -> Array:
    shifted = np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)
    return np.clip(shifted, 0, 255)


def _vivid(rng: np.random.Generator) -> Rgb:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _coords(w: int, h: int) -> tuple[Array, Array]:
    """Pixel coordinates shaped to broadcast to (h, w)."""
    return np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]


def _rotated(x: Array, y: Array, angle: float) -> tuple[Array, Array]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, y * c - x * s


def _blend(c0: Array, c1: Array, t: Array) -> Array:
    """Colour c0 where t is 0, c1 where t is 1; t of shape (h, w) gives (h, w, 3)."""
    return c0 + (c1 - c0) * t[..., None]


def _paint(canvas: Array, colour: Array, weight: Array) -> None:
    canvas += (colour - canvas) * weight[..., None]


def _value_noise(rng: np.random.Generator, w: int, h: int, cells: float) -> Array:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    scale = cells / max(w, h)
    grid = rng.random((max(2, round(h * scale) + 2), max(2, round(w * scale) + 2)))
    up = Image.fromarray(grid.astype(np.float32)).resize((w, h), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(up), 0.0, 1.0)


def _fractal_noise(rng: np.random.Generator, w: int, h: int, cells: float, octaves: int) -> Array:
    total = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        total += _value_noise(rng, w, h, cells * 2**octave) * 0.5**octave
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _lighting(rng: np.random.Generator, w: int, h: int) -> Array:
    """Uneven illumination; one more source of difference between two images of a class."""
    return 0.82 + 0.3 * _value_noise(rng, w, h, rng.uniform(1.5, 3.5))


def _to_image(canvas: Array) -> Image.Image:
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))


def _ridge(rng: np.random.Generator, w: int, knots: int) -> Array:
    """A jagged 1-D profile in [0, 1] across the width: mountain crests, hill lines."""
    xs = np.linspace(0, w - 1, knots)
    coarse = np.interp(np.arange(w), xs, rng.random(knots))
    fine = np.interp(np.arange(w), np.linspace(0, w - 1, knots * 4), rng.random(knots * 4))
    return (coarse * 0.75 + fine * 0.25).astype(np.float32)


def _waves_1d(rng: np.random.Generator, w: int, count: int) -> Array:
    """A smooth 1-D profile in [-1, 1]: rolling hills."""
    x = np.arange(w, dtype=np.float32) / w
    total = np.zeros(w, np.float32)
    for _ in range(count):
        total += np.sin(2 * np.pi * (rng.uniform(0.5, 3.0) * x + rng.random()))
    return total / count


# -- the ten classes ------------------------------------------------------------------------------


def _sky(rng: np.random.Generator, w: int, h: int, top: Rgb, bottom: Rgb) -> Array:
    _, y = _coords(w, h)
    t = (y / h) ** rng.uniform(0.6, 1.5)
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = _blend(_jitter(rng, top), _jitter(rng, bottom), t)
    return canvas


def _sun(
    canvas: Array, cx: float, cy: float, radius: float, core: Array, glow: Array, reach: float
) -> None:
    h, w, _ = canvas.shape
    x, y = _coords(w, h)
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    _paint(canvas, glow, reach * np.exp(-((d / (4 * radius)) ** 2)))
    _paint(canvas, core, np.clip(radius - d + 0.5, 0, 1))


def render_scene_day(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    canvas = _sky(rng, w, h, (70, 130, 215), (175, 210, 240))
    horizon = h * rng.uniform(0.5, 0.72) + h * rng.uniform(0.02, 0.08) * _waves_1d(rng, w, 3)
    radius = min(w, h) * rng.uniform(0.04, 0.09)
    sun_y = rng.uniform(0.1, 0.6) * float(horizon.min())
    core, glow = _jitter(rng, (255, 245, 200), 10), _jitter(rng, (255, 250, 225), 10)
    _sun(canvas, rng.uniform(0.1, 0.9) * w, sun_y, radius, core, glow, 0.35)
    clouds = _fractal_noise(rng, w, h, rng.uniform(3, 8), 3)
    cover = np.clip((clouds - rng.uniform(0.45, 0.7)) / 0.15, 0, 1) * rng.uniform(0.6, 0.95)
    _paint(canvas, np.array([250, 250, 252], np.float32), cover)
    x, y = _coords(w, h)
    ground = _blend(
        _jitter(rng, (90, 155, 60)), _jitter(rng, (35, 85, 30)), np.broadcast_to(y / h, (h, w))
    )
    ground *= (0.85 + 0.3 * _fractal_noise(rng, w, h, rng.uniform(6, 20), 3))[..., None]
    below = y > horizon[None, :]
    canvas[below] = ground[below]
    return _to_image(canvas)


def _streaky_clouds(rng: np.random.Generator, w: int, h: int) -> Array:
    """Long thin cloud bands in [0, 1], as low sun lights them: few columns, many rows."""
    grid = rng.random((int(rng.integers(8, 24)), int(rng.integers(2, 5)))).astype(np.float32)
    bands = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))
    return np.clip((bands - rng.uniform(0.55, 0.8)) / 0.2, 0, 1)


def render_scene_sunset(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    canvas = _sky(rng, w, h, (55, 35, 95), (250, 150, 70))
    horizon = h * rng.uniform(0.45, 0.8)
    if rng.random() < 0.7:
        cover = _streaky_clouds(rng, w, h) * rng.uniform(0.5, 0.9)
        _paint(canvas, _jitter(rng, (120, 50, 90), 30), cover)
    radius = min(w, h) * rng.uniform(0.05, 0.16)
    sun_x = rng.uniform(0.08, 0.92) * w
    core, glow = _jitter(rng, (255, 205, 120), 15), _jitter(rng, (255, 160, 80), 20)
    _sun(canvas, sun_x, horizon - rng.uniform(-0.3, 1.5) * radius, radius, core, glow, 0.6)
    x, y = _coords(w, h)
    # Water: dark, with the sun's reflection broken into horizontal streaks.
    water = np.empty((h, w, 3), np.float32)
    water[:] = _jitter(rng, (45, 28, 55), 15)
    streaks = np.sin(y * rng.uniform(0.3, 0.9) + 6 * _value_noise(rng, w, h, 12)) > 0.3
    shimmer = streaks * np.exp(-(((x - sun_x) / (rng.uniform(1.0, 2.0) * radius)) ** 2))
    _paint(water, glow, shimmer * rng.uniform(0.5, 0.9))
    below = np.broadcast_to(y > horizon, (h, w))
    canvas[below] = water[below]
    # A dark island or headland on the horizon, somewhere.
    island = horizon - h * rng.uniform(0.02, 0.2) * _ridge(rng, w, int(rng.integers(3, 8))) ** 2
    shore = (y > island[None, :]) & ~below
    canvas[shore] = _jitter(rng, (30, 20, 35), 10)
    return _to_image(canvas)


def render_scene_mountains(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    canvas = _sky(rng, w, h, (150, 175, 205), (225, 230, 238))
    _, y = _coords(w, h)
    far, near = _jitter(rng, (125, 140, 170), 20), _jitter(rng, (40, 58, 60), 20)
    layers = int(rng.integers(2, 5))
    snow = _jitter(rng, (240, 242, 248), 8)
    for layer in range(layers):
        depth = layer / max(layers - 1, 1)
        base = h * (0.42 + 0.4 * depth + rng.uniform(-0.05, 0.05))
        height = h * rng.uniform(0.12, 0.3) / (1 + depth)
        crest = base - height * _ridge(rng, w, int(rng.integers(4, 13)))
        inside = y > crest[None, :]
        colour = far + (near - far) * depth
        shade = 0.9 + 0.2 * _value_noise(rng, w, h, rng.uniform(8, 25))
        layer_rgb = colour[None, None, :] * shade[..., None]
        if layer == 0:  # only the farthest, highest range keeps its snow
            snowy = inside & (y < base - 0.55 * height)
            layer_rgb[snowy] = snow
        canvas[inside] = layer_rgb[inside]
    return _to_image(canvas * _lighting(rng, w, h)[..., None])


def render_texture_noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    t = _fractal_noise(rng, w, h, rng.uniform(3, 10), int(rng.integers(3, 6)))
    t = t ** rng.uniform(0.7, 1.5)
    dark, mid, light = (
        _jitter(rng, (55, 40, 28)),
        _jitter(rng, (120, 100, 60)),
        _jitter(rng, (170, 180, 110)),
    )
    lower = _blend(dark, mid, np.clip(t * 2, 0, 1))
    upper = _blend(mid, light, np.clip(t * 2 - 1, 0, 1))
    return _to_image(np.where((t < 0.5)[..., None], lower, upper))


def render_texture_stripes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    x, y = _coords(w, h)
    u, v = _rotated(x, y, rng.uniform(0, np.pi))
    period = rng.uniform(10, 60)
    wobble = period * rng.uniform(0, 0.4) * np.sin(2 * np.pi * v / rng.uniform(80, 400))
    wave = np.sin(2 * np.pi * (u + wobble) / period + rng.uniform(0, 2 * np.pi))
    t = np.clip(wave * rng.uniform(2, 8) + rng.uniform(-0.5, 0.5), -1, 1) * 0.5 + 0.5
    canvas = _blend(_jitter(rng, (195, 45, 50)), _jitter(rng, (240, 228, 205)), t)
    return _to_image(canvas * _lighting(rng, w, h)[..., None])


def render_texture_checkers(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    x, y = _coords(w, h)
    u, v = _rotated(x, y, rng.uniform(0, np.pi / 2))
    cell = rng.uniform(10, 64)
    t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    canvas = _blend(_jitter(rng, (35, 45, 95)), _jitter(rng, (225, 220, 195)), t)
    grain = 0.92 + 0.16 * _value_noise(rng, w, h, rng.uniform(10, 40))
    return _to_image(canvas * (_lighting(rng, w, h) * grain)[..., None])


def render_texture_dots(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    x, y = _coords(w, h)
    u, v = _rotated(x, y, rng.uniform(0, np.pi / 2))
    spacing = rng.uniform(16, 64)
    radius = spacing * rng.uniform(0.18, 0.42)
    if rng.random() < 0.5:  # hexagonal packing: every other row shifted by half a step
        u = u + (np.floor(v / spacing) % 2) * spacing / 2
    du, dv = u % spacing - spacing / 2, v % spacing - spacing / 2
    t = np.clip(radius - np.sqrt(du**2 + dv**2) + 0.5, 0, 1)
    canvas = _blend(_jitter(rng, (25, 85, 95)), _jitter(rng, (240, 200, 50)), t)
    return _to_image(canvas * _lighting(rng, w, h)[..., None])


def render_texture_waves(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    x, y = _coords(w, h)
    sources = int(rng.integers(1, 4))
    total = np.zeros((h, w), np.float32)
    for _ in range(sources):
        cx, cy = rng.uniform(-0.5, 1.5) * w, rng.uniform(-0.5, 1.5) * h
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        total += np.sin(2 * np.pi * d / rng.uniform(12, 60) + rng.uniform(0, 2 * np.pi))
    t = 0.5 + 0.5 * total / sources
    canvas = _blend(_jitter(rng, (15, 45, 125)), _jitter(rng, (120, 215, 230)), t)
    return _to_image(canvas * _lighting(rng, w, h)[..., None])


def _plain_background(rng: np.random.Generator, w: int, h: int, top: Rgb, bottom: Rgb) -> Array:
    """A soft gradient with mottling, whose colours vary a lot from image to image."""
    _, y = _coords(w, h)
    angle_mix = rng.uniform(0.3, 1.0) * y / h
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = _blend(_jitter(rng, top, 45), _jitter(rng, bottom, 45), angle_mix)
    return canvas * (0.9 + 0.2 * _value_noise(rng, w, h, rng.uniform(2, 12)))[..., None]


def _draw_shapes(
    rng: np.random.Generator, img: Image.Image, polygon: Callable[..., list[tuple[float, float]]]
) -> Image.Image:
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(1, 7))):
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        size = min(w, h) * rng.uniform(0.08, 0.32)
        outline = _vivid(rng) if rng.random() < 0.4 else None
        draw.polygon(polygon(rng, cx, cy, size), fill=_vivid(rng), outline=outline)
    return img


def _ellipse(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    squash, tilt = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
    points = []
    for k in range(48):
        a = 2 * np.pi * k / 48
        px, py = r * math.cos(a), r * squash * math.sin(a)
        points.append(
            (
                cx + px * math.cos(tilt) - py * math.sin(tilt),
                cy + px * math.sin(tilt) + py * math.cos(tilt),
            )
        )
    return points


def _angular(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A triangle, a square or a five-pointed star, turned at random."""
    shape = rng.choice(["triangle", "square", "star"])
    turn = rng.uniform(0, 2 * np.pi)
    if shape == "star":
        radii = [r if k % 2 == 0 else r * rng.uniform(0.35, 0.5) for k in range(10)]
    else:
        radii = [r] * (3 if shape == "triangle" else 4)
    n = len(radii)
    return [
        (
            cx + radii[k] * math.cos(turn + 2 * np.pi * k / n),
            cy + radii[k] * math.sin(turn + 2 * np.pi * k / n),
        )
        for k in range(n)
    ]


def render_object_circles(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    background = _to_image(_plain_background(rng, w, h, (235, 215, 185), (200, 170, 140)))
    return _draw_shapes(rng, background, _ellipse)


def render_object_polygons(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    background = _to_image(_plain_background(rng, w, h, (190, 200, 215), (120, 130, 150)))
    return _draw_shapes(rng, background, _angular)


RENDERERS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "scene_day": render_scene_day,
    "scene_sunset": render_scene_sunset,
    "scene_mountains": render_scene_mountains,
    "texture_noise": render_texture_noise,
    "texture_stripes": render_texture_stripes,
    "texture_checkers": render_texture_checkers,
    "texture_dots": render_texture_dots,
    "texture_waves": render_texture_waves,
    "object_circles": render_object_circles,
    "object_polygons": render_object_polygons,
}
assert tuple(RENDERERS) == CLASSES


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


# -- planning and writing -------------------------------------------------------------------------


def planted_counts(count: int) -> dict[FileKind, int]:
    """How many files of each kind a crawl of `count` files holds."""
    exact = max(1, round(0.02 * count))
    near = max(len(EDIT_KINDS), round(0.05 * count))
    fixed = len(BROKEN_FILES) + len(MODE_SAMPLES)
    return {
        FileKind.ORIGINAL: count - exact - near - fixed,
        FileKind.EXACT_DUPLICATE: exact,
        FileKind.NEAR_DUPLICATE: near,
        FileKind.BROKEN: len(BROKEN_FILES),
        FileKind.MODE_SAMPLE: len(MODE_SAMPLES),
        FileKind.SEED: max(MIN_SEEDS, round(0.025 * count)),
    }


@dataclass
class _Planned:
    """One file to write: what the manifest will say about it, and how to make its bytes."""

    entry: dict
    make: Callable[[], bytes]


def _crawl_path(slot: int, extension: str) -> str:
    return f"{CRAWL_DIR}/{slot // FILES_PER_FOLDER:03d}/{slot:05d}{extension}"


def _plan(seed: int, count: int, staging: Path) -> list[_Planned]:
    counts = planted_counts(count)
    specs = [_original_spec(seed, i)[0] for i in range(counts[FileKind.ORIGINAL])]
    # Names carry no hint of what a file is: kinds are shuffled over the slots.
    slots = iter(_rng(seed, _Stream.LAYOUT).permutation(count).tolist())
    plan: list[_Planned] = []
    original_paths: list[str] = []
    for spec in specs:
        path = _crawl_path(next(slots), EXTENSIONS[spec.fmt])
        original_paths.append(path)
        entry = {"path": path, "kind": FileKind.ORIGINAL, "label": spec.label}
        plan.append(_Planned(entry, lambda i=spec.index: make_original(seed, i)))

    def read(path: str) -> bytes:
        return (staging / path).read_bytes()

    pick = _rng(seed, _Stream.EXACT)
    for source in pick.choice(len(specs), counts[FileKind.EXACT_DUPLICATE], replace=False):
        spec = specs[source]
        entry = {
            "path": _crawl_path(next(slots), EXTENSIONS[spec.fmt]),
            "kind": FileKind.EXACT_DUPLICATE,
            "label": spec.label,
            "duplicate_of": original_paths[source],
        }
        plan.append(_Planned(entry, lambda p=original_paths[source]: read(p)))

    # Sources large enough that a 50% resize still clears ingest's 64-pixel minimum.
    roomy = [s.index for s in specs if min(s.size) >= 140] or [s.index for s in specs]
    pick = _rng(seed, _Stream.NEAR)
    sources = pick.choice(
        roomy, counts[FileKind.NEAR_DUPLICATE], replace=len(roomy) < counts[FileKind.NEAR_DUPLICATE]
    )
    for k, source in enumerate(sources.tolist()):
        spec = specs[source]
        rng = _rng(seed, _Stream.NEAR, k + 1)
        near = _near_duplicate_spec(rng, EDIT_KINDS[k % len(EDIT_KINDS)], spec.fmt)
        entry = {
            "path": _crawl_path(next(slots), EXTENSIONS[near.fmt]),
            "kind": FileKind.NEAR_DUPLICATE,
            "label": spec.label,
            "duplicate_of": original_paths[source],
            "edit": near.edit,
        }
        make = lambda p=original_paths[source], n=near, r=rng: make_near_duplicate(read(p), n, r)  # noqa: E731
        plan.append(_Planned(entry, make))

    for k, (name, extension, reason) in enumerate(BROKEN_FILES):
        entry = {
            "path": _crawl_path(next(slots), extension),
            "kind": FileKind.BROKEN,
            "expected_reason": reason,
            "variant": name,
        }
        rng = _rng(seed, _Stream.BROKEN, k)
        plan.append(_Planned(entry, lambda n=name, r=rng: make_broken(n, r)))

    for k, (variant, extension) in enumerate(MODE_SAMPLES):
        label = CLASSES[k % len(CLASSES)]
        entry = {
            "path": _crawl_path(next(slots), extension),
            "kind": FileKind.MODE_SAMPLE,
            "label": label,
            "variant": variant,
        }
        rng = _rng(seed, _Stream.MODE, k)
        plan.append(_Planned(entry, lambda v=variant, r=rng, c=label: make_mode_sample(v, r, c)))

    for k in range(counts[FileKind.SEED]):
        label = SEED_CLASSES[k % len(SEED_CLASSES)]
        entry = {"path": f"{SEED_DIR}/seed_{k:04d}.jpg", "kind": FileKind.SEED, "label": label}
        plan.append(_Planned(entry, lambda i=k: make_seed_image(seed, i)[1]))
    return plan


def _header_facts(data: bytes) -> dict:
    """Format, mode and upright size as read from the header (no pixels are decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION)
                if orientation in (5, 6, 7, 8):
                    w, h = h, w
                return {"format": img.format, "mode": img.mode, "width": w, "height": h}
    except Exception:  # not an image at all: nothing to say
        return {}


def _check_folder(out_dir: Path, count: int, seed: int) -> DemoManifest | None:
    """The finished corpus if it is already there; refuse folders holding anything else."""
    if (out_dir / MANIFEST_NAME).exists():
        manifest = load_manifest(out_dir)
        if (manifest.count, manifest.seed) == (count, seed):
            return manifest
        raise ValueError(
            f"{out_dir} already holds a demo corpus with count={manifest.count}, "
            f"seed={manifest.seed}; pick another folder for count={count}, seed={seed}"
        )
    for name in (CRAWL_DIR, SEED_DIR.split("/")[0]):
        if (out_dir / name).exists():
            raise ValueError(
                f"{out_dir / name} exists but {out_dir} has no {MANIFEST_NAME}; "
                "pick another folder (or empty this one)"
            )
    return None


def generate_demo(
    out_dir: Path, count: int = 2000, seed: int = 0, progress: bool = False
) -> DemoManifest:
    """Write the demo corpus to `out_dir` (crawl/, seeds/demo/, manifest.json) and return it.

    Idempotent: a finished corpus with the same count and seed is returned as it is.
    """
    if count < MIN_COUNT:
        raise ValueError(f"demo count must be at least {MIN_COUNT}, got {count}")
    if seed < 0:
        raise ValueError(f"demo seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    existing = _check_folder(out_dir, count, seed)
    if existing is not None:
        return existing

    # Files are written to a staging folder and moved in at the end, so an interrupted run
    # leaves nothing that looks like a corpus; the next run clears it and starts over.
    staging = out_dir / ".demo-partial"
    if staging.exists():
        shutil.rmtree(staging)
    plan = _plan(seed, count, staging)
    files = []
    for item in tqdm(plan, desc="demo corpus", unit="file", disable=not progress):
        data = item.make()
        target = staging / item.entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        files.append(DemoFile(**item.entry, sha256=sha, **_header_facts(data)))

    for name in (CRAWL_DIR, SEED_DIR.split("/")[0]):
        (staging / name).rename(out_dir / name)
    manifest = DemoManifest(seed=seed, count=count, files=tuple(files))
    partial = out_dir / (MANIFEST_NAME + ".partial")
    partial.write_text(manifest.to_json())
    partial.rename(out_dir / MANIFEST_NAME)
    staging.rmdir()
    return manifest
