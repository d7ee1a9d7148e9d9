"""The ten look-alike classes of the demo corpus, and the seeded randomness and pixels they use."""

import colorsys
import math
from collections.abc import Callable
from enum import IntEnum

import numpy as np
from PIL import Image, ImageDraw

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

Rgb = tuple[int, int, int]
Array = np.ndarray


class _Stream(IntEnum):
    """Independent random streams, so adding items of one kind never shifts another kind."""

    ORIGINAL = 0
    LAYOUT = 1
    EXACT = 2
    NEAR = 3
    BROKEN = 4
    MODE = 5
    SEED = 6


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
