"""The lab's procedural world: one flat shape, one colour, one pattern, on a plain background.

Every scene is a handful of discrete labels (colour, shape, pattern, background) plus where the
shape sits (centre, size); ``render`` turns it into an image with hard pixel edges and
``caption`` into a sentence from a small vocabulary. Both are pure functions of the scene, and
``sample_scenes`` draws scenes from one seeded generator, so a dataset is a function of its
seed. Torch only (the scorers in ``trainer.lab.score`` use the same definitions).

Geometry: a shape lives in its unit box u, v in [-1, 1] (v grows downwards, like image rows),
scaled to ``size`` pixels and centred at (cx, cy); a pixel is inside when its centre is.
Patterns darken some of the shape's pixels to a darker shade of its colour, on a grid fixed to
the image (not to the shape), so the pattern a pixel shows depends only on where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

IMAGE_SIZE = 32

# name -> RGB 0..255; hues far apart, and every colour (and its dark shade) far from every background
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "cyan": (20, 200, 220),
}
DARK_SHADE = 0.45  # a pattern's dark pixels: the colour times this
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "heart", "star")
PATTERNS = ("solid", "striped", "checkered", "dotted")
PATTERN_PERIOD = 4  # pixels; every pattern repeats with this period on both axes

# Sizes (the unit box's side in pixels) and a margin that keeps shapes off the image border,
# where the background is read. Shapes sit near the centre: with centres anywhere the box fits
# (up to 7 px off), a 1 M-parameter UNet had not bound the shape word after 1,400 steps
# (27 % shape, chance 25 %); within 1.5 px it reached 86 % after 600 (docs/lab.md, probe H).
MIN_SIZE, MAX_SIZE, MARGIN = 16, 22, 2
JITTER = 1.5  # the most a shape's centre strays from the image centre, in pixels (on each axis)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    pattern: str
    background: str
    cx: float  # centre, in pixels from the left/top edge of the image
    cy: float
    size: float  # the unit box's side, in pixels

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.pattern, self.background)


def caption(scene: Scene) -> str:
    """``a red circle on white``; a pattern other than solid goes before the shape
    (``a red striped circle on white``)."""
    pattern = "" if scene.pattern == "solid" else scene.pattern + " "
    return f"a {scene.colour} {pattern}{scene.shape} on {scene.background}"


# ----------------------------------------------------------------- geometry
def unit_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of ``shape`` at unit-box coordinates (u, v)."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return (u.abs() <= 1) & (v.abs() <= 1)
    if shape == "triangle":  # apex at the top, base along the bottom edge
        return (v >= -1) & (v <= 1) & (u.abs() <= (v + 1) / 2)
    if shape == "cross":
        inside = (u.abs() <= 1) & (v.abs() <= 1)
        return inside & ((u.abs() <= 1 / 3) | (v.abs() <= 1 / 3))
    if shape == "diamond":
        return u.abs() + v.abs() <= 1
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.3)
    if shape == "heart":  # two lobes over a downward point, filling the unit box
        x, y = 1.1 * u, -1.1 * v + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "star":
        return _star(u, v)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Five points: inside when the radius is under the star's outline at that angle.
    inner = 0.45
    angle = torch.atan2(u, -v)  # 0 at the top point
    sector = 2 * math.pi / 5
    a = torch.remainder(angle, sector) - sector / 2  # -36..36 degrees; 0 halfway between points
    # Outline between a point (radius 1, angle +-36) and an inner corner (radius inner, angle 0):
    # the line through (cos 36, sin 36) and (inner, 0) in the sector's frame.
    p = torch.tensor([math.cos(sector / 2), math.sin(sector / 2)])
    q = torch.tensor([inner, 0.0])
    normal = torch.tensor([-(p[1] - q[1]), p[0] - q[0]])
    r = torch.sqrt(u * u + v * v)
    x, y = r * torch.cos(a), r * torch.sin(a).abs()
    return (x - q[0]) * normal[0] + (y - q[1]) * normal[1] >= 0


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """(H, W) boolean mask of ``shape`` centred at (cx, cy) with unit box side ``size`` pixels."""
    centres = torch.arange(image_size, dtype=torch.float64) + 0.5
    v, u = torch.meshgrid((centres - cy) / (size / 2), (centres - cx) / (size / 2), indexing="ij")
    return unit_mask(shape, u, v)


def pattern_dark(pattern: str, image_size: int = IMAGE_SIZE, dx: int = 0, dy: int = 0) -> torch.Tensor:
    """(H, W) boolean: which pixels a pattern darkens, shifted by (dx, dy) pixels."""
    idx = torch.arange(image_size)
    y, x = torch.meshgrid((idx + dy) % PATTERN_PERIOD, (idx + dx) % PATTERN_PERIOD, indexing="ij")
    half = PATTERN_PERIOD // 2
    if pattern == "solid":
        return torch.zeros(image_size, image_size, dtype=torch.bool)
    if pattern == "striped":  # horizontal bands, half the period each
        return y >= half
    if pattern == "checkered":
        return (x >= half) ^ (y >= half)
    if pattern == "dotted":  # one dark dot of half the period per cell
        return (x < half) & (y < half)
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """(3, H, W) uint8 image of ``scene``."""
    image = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float64).view(3, 1, 1).expand(3, image_size, image_size).clone()
    light = torch.tensor(COLOURS[scene.colour], dtype=torch.float64).view(3, 1, 1)
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.size, image_size)
    dark = pattern_dark(scene.pattern, image_size)
    colour = torch.where(dark, light * DARK_SHADE, light)
    image = torch.where(mask, colour, image)
    return image.round().to(torch.uint8)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [-1, 1], what the VAE encodes."""
    return images.float() / 127.5 - 1


# ----------------------------------------------------------------- drawing scenes
@dataclass(frozen=True)
class Vocabulary:
    """Which labels a dataset draws from, and which (colour, shape, pattern, background)
    combinations it leaves out (held out for evaluation)."""

    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    patterns: tuple[str, ...] = PATTERNS
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)

    def __post_init__(self):
        for kind, given, known in (("colour", self.colours, COLOURS), ("shape", self.shapes, SHAPES),
                                   ("pattern", self.patterns, PATTERNS), ("background", self.backgrounds, BACKGROUNDS)):
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                from qrlora.errors import UserError

                raise UserError(f"lab vocabulary: unknown or no {kind} {unknown or given!r}; known: {', '.join(known)}")

    def combinations(self) -> list[tuple[str, str, str, str]]:
        return [(c, s, p, b) for s in self.shapes for c in self.colours for p in self.patterns for b in self.backgrounds]


def held_out(vocab: Vocabulary, every: int) -> set[tuple[str, str, str, str]]:
    """About 1/``every`` of the vocabulary's combinations, left out of training to test
    composition: those whose label indices sum to a multiple of ``every``. Along each axis
    that is every ``every``-th value, so each single label still appears in many kept ones."""
    out = set()
    for ci, c in enumerate(vocab.colours):
        for si, s in enumerate(vocab.shapes):
            for pi, p in enumerate(vocab.patterns):
                for bi, b in enumerate(vocab.backgrounds):
                    if (ci + si + pi + bi) % every == 0:
                        out.add((c, s, p, b))
    return out


def sample_scenes(n: int, seed: int, combos: Sequence[tuple[str, str, str, str]]) -> list[Scene]:
    """``n`` scenes, labels uniform over ``combos``, position and size uniform in their ranges."""
    if not combos:
        raise ValueError("sample_scenes: no combinations to draw from")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(combos), (n,), generator=g).tolist()
    sizes = (MIN_SIZE + (MAX_SIZE - MIN_SIZE) * torch.rand(n, generator=g, dtype=torch.float64)).tolist()
    jitter = torch.rand(n, 2, generator=g, dtype=torch.float64).tolist()
    scenes = []
    for k, size, (jx, jy) in zip(picks, sizes, jitter):
        # room for the centre, the box staying MARGIN from the border
        reach = min(JITTER, (IMAGE_SIZE - 2 * MARGIN - size) / 2)
        cx, cy = IMAGE_SIZE / 2 + (2 * jx - 1) * reach, IMAGE_SIZE / 2 + (2 * jy - 1) * reach
        colour, shape, pattern, background = combos[k]
        scenes.append(Scene(colour, shape, pattern, background, round(cx, 3), round(cy, 3), round(size, 3)))
    return scenes


def render_batch(scenes: Iterable[Scene], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.stack([render(s, image_size) for s in scenes])
