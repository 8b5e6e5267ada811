"""shapes: one colored shape on white, captioned with its color, shape, size and position.

Made by code, deterministic by seed, at any resolution >= 32. The caption grammar is

    "a {size} {color} {shape} {where}"    e.g. "a small red circle in the top left"

with ``where`` one of "in the top left", "at the top", "in the top right", "on the left",
"in the center", "on the right", "in the bottom left", "at the bottom", "in the bottom right".

Geometry: the image is a 3x3 grid; a shape's *centroid* lies in its position's cell (jittered
by up to 6% of the image, kept 3% inside the cell), its extent (circle diameter, square side,
triangle side; triangles point up) is 20% ("small") or 32% ("large") of the image, jittered
by 8%. Shapes are drawn 4x supersampled and box-filtered, so edges are anti-aliased.

Held out: for each of the 18 color-shape pairs one position (spread so that every position
is held out for exactly two pairs) never appears in the train split; the validation split is
made of exactly these 18 combinations, to measure whether a model composes attributes it saw
only apart. The train split has ``TRAIN_SIZE`` = 20,000 items, each rendered on access from
``(seed, index)``; the validation split has 18 combinations x 2 sizes x 10 = 360.

:func:`analyze` reads color, shape, size and position back from any image (PIL or HxWx3
array), for judging generated images. ``render_shape(..., outline=2)`` draws a shape hollow, a
style the dataset never shows (for fine-tuning to a new style); :func:`is_hollow` reads it back.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from latentdiff.data.dataset import CaptionedImageDataset
from latentdiff.data.files import digest
from latentdiff.data.transforms import to_tensor

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.20, "large": 0.32}  # extent as a fraction of the image side
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major over the 3x3 grid
PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
MIN_RESOLUTION = 32
TRAIN_SIZE = 20_000
VALIDATION_REPEATS = 10
VERSION = 1  # bump when rendering changes, so that latent caches of old renders are not reused

# Pair k = 3 * color + shape is held out at position 5k mod 9: each pair once, each position twice.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (color, shape, POSITIONS[(5 * (3 * c + s)) % 9])
    for c, color in enumerate(COLORS)
    for s, shape in enumerate(SHAPES)
)
TRAIN_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (color, shape, position)
    for color in COLORS for shape in SHAPES for position in POSITIONS
    if (color, shape, position) not in HELD_OUT
)

_SIZE_JITTER = 0.08
_POSITION_JITTER = 0.06
_CELL_MARGIN = 0.03
_IMAGE_MARGIN = 0.02
# area / extent**2 of each shape: how to get an extent back from a measured area
_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": math.sqrt(3) / 4}
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])
_HUES = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in COLORS.items()}


def caption(color: str, shape: str, size: str, position: str) -> str:
    """ "a small red circle in the top left" """
    return f"a {size} {color} {shape} {PHRASES[position]}"


def _check(color: str, shape: str, size: str, position: str, resolution: int) -> None:
    for value, allowed, what in ((color, COLORS, "color"), (shape, SHAPES, "shape"),
                                 (size, SIZES, "size"), (position, POSITIONS, "position")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"shapes needs a resolution of at least {MIN_RESOLUTION} px, got {resolution}")


def _extents(shape: str, extent: float) -> tuple[float, float, float]:
    """(half width, distance centroid->top, distance centroid->bottom) for a shape of ``extent``."""
    if shape == "triangle":
        height = extent * math.sqrt(3) / 2
        return extent / 2, 2 * height / 3, height / 3
    return extent / 2, extent / 2, extent / 2


def _layout(shape: str, size: str, position: str, rng: np.random.Generator | None) -> tuple[float, float, float]:
    """(centroid x, centroid y, extent) as fractions of the image side."""
    extent = SIZES[size] * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER) if rng is not None else 1)
    row, col = divmod(POSITIONS.index(position), 3)
    x, y = (col + 0.5) / 3, (row + 0.5) / 3
    if rng is not None:
        x += rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)
        y += rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)
    half_width, up, down = _extents(shape, extent)
    x = min(max(x, col / 3 + _CELL_MARGIN, half_width + _IMAGE_MARGIN), (col + 1) / 3 - _CELL_MARGIN,
            1 - half_width - _IMAGE_MARGIN)
    y = min(max(y, row / 3 + _CELL_MARGIN, up + _IMAGE_MARGIN), (row + 1) / 3 - _CELL_MARGIN,
            1 - down - _IMAGE_MARGIN)
    return x, y, extent


def _supersample(resolution: int) -> int:
    return max(1, min(4, 512 // resolution))


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, extent: float, fill,
          width: int | None = None) -> None:
    """Draw ``shape`` with its centroid at (x, y) px and the given extent in px; filled, or with
    ``width`` only its outline, that many px wide inside the boundary."""
    half_width, up, down = _extents(shape, extent)
    paint = dict(fill=fill) if width is None else dict(outline=fill, width=width)
    if shape == "circle":
        draw.ellipse((x - half_width, y - up, x + half_width, y + down), **paint)
    elif shape == "square":
        draw.rectangle((x - half_width, y - up, x + half_width, y + down), **paint)
    else:
        draw.polygon([(x, y - up), (x + half_width, y + down), (x - half_width, y + down)], **paint)


def _raster(resolution: int, mode: str, background, shape: str, x: float, y: float, extent: float, fill,
            outline: float | None = None) -> Image.Image:
    """Draw at ``s`` times the resolution and box-filter down: exact area coverage at the edges."""
    s = _supersample(resolution)
    canvas = Image.new(mode, (resolution * s, resolution * s), background)
    width = None if outline is None else max(1, round(outline * s))
    # pixel centers sit at half-integers: shift so that geometry in image units maps exactly
    _draw(ImageDraw.Draw(canvas), shape, x * s - 0.5, y * s - 0.5, extent * s, fill, width)
    return canvas.reduce(s) if s > 1 else canvas


def render_shape(color: str, shape: str, size: str, position: str, resolution: int = 32,
                 rng: np.random.Generator | None = None, outline: float | None = None) -> Image.Image:
    """One shape on white; exactly in its cell's center at its nominal size unless ``rng`` jitters it.

    ``outline``: draw the shape hollow, only its outline, this many px wide (inside the shape's boundary),
    a style the dataset never shows (at 32 px, 2 px leaves a hole in large shapes; small triangles fill up).
    """
    _check(color, shape, size, position, resolution)
    if outline is not None and not outline > 0:
        raise ValueError(f"outline must be a positive width in px (or None for a filled shape), got {outline}")
    x, y, extent = _layout(shape, size, position, rng)
    return _raster(resolution, "RGB", (255, 255, 255), shape, x * resolution, y * resolution,
                   extent * resolution, COLORS[color], outline)


class ShapesDataset(CaptionedImageDataset):
    """The shapes dataset; item ``i`` of a split is a pure function of ``(seed, split, i)``."""

    def __init__(self, resolution: int = 32, split: str = "train", seed: int = 0, size: int | None = None):
        if split not in ("train", "validation"):
            raise ValueError(f"shapes has the splits 'train' and 'validation', not {split!r}")
        _check("red", "circle", "small", "center", resolution)
        if size is None:
            size = TRAIN_SIZE if split == "train" else len(HELD_OUT) * len(SIZES) * VALIDATION_REPEATS
        super().__init__(name=f"shapes/{split}", num_rows=size, resolution=resolution,
                         fingerprint=digest("shapes", VERSION, split, seed, size))
        self.split = split
        self.seed = seed
        self._combinations = TRAIN_COMBINATIONS if split == "train" else tuple(sorted(HELD_OUT))

    def attributes(self, index: int) -> dict:
        """The ground truth of item ``index``: ``dict(color=, shape=, size=, position=)``."""
        return self._row_attributes(int(self._rows[index]))[0]

    def _row_attributes(self, row: int) -> tuple[dict, np.random.Generator]:
        rng = np.random.default_rng([self.seed, self.split == "validation", row])
        if self.split == "train":
            color, shape, position = self._combinations[rng.integers(len(self._combinations))]
            size = tuple(SIZES)[rng.integers(len(SIZES))]
        else:
            color, shape, position = self._combinations[row % len(self._combinations)]
            size = tuple(SIZES)[(row // len(self._combinations)) % len(SIZES)]
        return dict(color=color, shape=shape, size=size, position=position), rng

    def _row_image(self, row: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        attributes, rng = self._row_attributes(row)
        pixels = to_tensor(render_shape(**attributes, resolution=self.resolution, rng=rng))  # (3, R, R)
        return pixels.flip(-1) if flip else pixels

    def _row_captions(self, row: int) -> list[str]:
        return [caption(**self._row_attributes(row)[0])]


# --- analysis ---------------------------------------------------------------------------------

_NOISE_FLOOR = 0.15  # coverage below this is background noise
_MIN_AREA = 0.004  # a shape covers at least this fraction of the image (a small triangle ~1.5%)
_RING_SECTORS = 8  # a hollow shape's outline leaves no gap wider than 360 / 8 degrees around its centroid


def _coverage(rgb: np.ndarray) -> np.ndarray:
    """How much of each pixel is paint: 1 - min(R, G, B), since every palette color has a 0 channel
    and white has none; then the noise floor is cut off so that faint noise counts for nothing."""
    cover = 1.0 - rgb.min(axis=2)
    return np.clip((cover - _NOISE_FLOOR) / (1 - 2 * _NOISE_FLOOR), 0.0, 1.0)


def _as_rgb(image, caller: str) -> np.ndarray:
    """A PIL image or an (H, W, 3) array (uint8, or float in [0, 1]) as a float (H, W, 3) array in [0, 1]."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    rgb = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] != rgb.shape[1]:
        raise ValueError(f"{caller} expects a square RGB image, got an array of shape {rgb.shape}")
    return rgb


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) in px of the painted area's centroid, or ``None`` when too little is painted to be a shape."""
    area = mask.sum()
    if area < _MIN_AREA * mask.size:
        return None
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    return (mask * xs).sum() / area, (mask * ys).sum() / area


def analyze(image) -> dict:
    """Read the color, shape, size and position of the one shape in ``image``.

    ``image`` is a PIL image or an (H, W, 3) array (uint8, or float in [0, 1]). Color is the
    palette hue nearest the mean hue of the painted pixels; position is the 3x3 cell of the
    painted area's centroid; shape is the best soft-IoU fit among the three shapes drawn at
    that centroid with the measured area; size compares the fitted extent with the midpoint
    of the two sizes. With no shape (a blank image) every field is ``None``.
    """
    rgb = _as_rgb(image, "analyze")
    height, width = rgb.shape[:2]
    mask = _coverage(rgb)
    area = mask.sum()
    centroid = _centroid(mask)
    if centroid is None:
        return dict(color=None, shape=None, size=None, position=None)

    x, y = centroid
    position = POSITIONS[3 * min(int(3 * y / height), 2) + min(int(3 * x / width), 2)]

    painted = mask > 0.5
    mean_rgb = rgb[painted].mean(axis=0) if painted.any() else (rgb * mask[..., None]).sum((0, 1)) / area
    hue = colorsys.rgb_to_hsv(*mean_rgb)[0]
    color = min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 1 - abs(hue - _HUES[name])))

    def fit(shape: str) -> tuple[float, float]:
        extent = math.sqrt(area / _AREA_FACTOR[shape])
        template = _raster(width, "L", 0, shape, x, y, extent, 255)
        template = np.asarray(template, dtype=np.float64) / 255.0
        template = np.clip((template - _NOISE_FLOOR) / (1 - 2 * _NOISE_FLOOR), 0.0, 1.0)
        return np.minimum(mask, template).sum() / np.maximum(mask, template).sum(), extent

    scores = {shape: fit(shape) for shape in SHAPES}
    shape = max(scores, key=lambda s: scores[s][0])
    size = "small" if scores[shape][1] / width < _SIZE_THRESHOLD else "large"
    return dict(color=color, shape=shape, size=size, position=position)


def is_hollow(image) -> bool | None:
    """Whether the one shape in ``image`` is drawn hollow (``render_shape(..., outline=)``) rather than filled.

    Hollow: less than half paint at the painted area's centroid (interpolated between the four nearest
    pixels; every shape is convex, so a filled one is painted there) inside a closed ring of paint (a pixel
    more than half paint in each of ``_RING_SECTORS`` equal angular sectors around the centroid), so that a
    broken, C-shaped blob does not count. ``None`` with no shape (a blank image, as for :func:`analyze`).
    At 32 px a 2 px outline leaves a hole in large shapes only.
    """
    mask = _coverage(_as_rgb(image, "is_hollow"))
    centroid = _centroid(mask)
    if centroid is None or not (mask > 0.5).any():
        return None
    height, width = mask.shape
    x = min(max(centroid[0] - 0.5, 0.0), width - 1.0)  # pixel (i, j) has its center at (j + 0.5, i + 0.5)
    y = min(max(centroid[1] - 0.5, 0.0), height - 1.0)
    j, i = min(int(x), width - 2), min(int(y), height - 2)
    dx, dy = x - j, y - i
    center = ((1 - dy) * ((1 - dx) * mask[i, j] + dx * mask[i, j + 1])
              + dy * ((1 - dx) * mask[i + 1, j] + dx * mask[i + 1, j + 1]))  # fmt: skip

    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    dxs, dys = xs - centroid[0], ys - centroid[1]
    around = (mask > 0.5) & (np.hypot(dxs, dys) > 0.5)
    angles = np.arctan2(dys[around], dxs[around]) % (2 * math.pi)
    sectors = np.unique((angles // (2 * math.pi / _RING_SECTORS)).astype(int) % _RING_SECTORS)
    return bool(center < 0.5 and len(sectors) == _RING_SECTORS)
