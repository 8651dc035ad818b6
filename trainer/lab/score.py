"""Exact scorers for the lab's world: read colour, shape, pattern and background from an image.

Each reading is the label plus a continuous score beside it, so a half-formed shape counts
less than a clean one:
- background: the border's median colour, nearest of ``world.BACKGROUNDS``;
- foreground: pixels farther than ``FOREGROUND_DISTANCE`` from the border's median colour;
- colour: every foreground pixel votes for the nearest colour among the palette and its dark
  shades; score = the winner's share of the votes;
- shape: every known shape is fitted to the foreground's bounding box (and nudged by half a
  pixel and a few percent of size), the best intersection-over-union wins; score = that IoU;
- pattern: which foreground pixels are dark shades, compared with each pattern at each of its
  phases; score = the fraction of foreground pixels that agree with the winner.
Images are uint8 (3, H, W) or floats in [-1, 1] (what the sampler decodes).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import world

FOREGROUND_DISTANCE = 60.0  # RGB units: half the smallest colour-to-background distance
MIN_FOREGROUND = 12  # pixels; fewer means "no shape"
NONE = "none"


@dataclass
class Reading:
    background: str
    colour: str
    shape: str
    pattern: str
    colour_score: float = 0.0  # share of foreground pixels voting for ``colour``
    shape_iou: float = 0.0  # IoU of the best-fitting ``shape`` with the foreground
    pattern_score: float = 0.0  # share of foreground pixels agreeing with ``pattern``
    foreground: int = 0  # pixels
    shape_ious: dict = field(default_factory=dict)  # every shape's best IoU

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.pattern, self.background)


def as_rgb255(image: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float (3, H, W) -> float64 RGB 0..255."""
    if image.dtype == torch.uint8:
        return image.double()
    return ((image.double().clamp(-1, 1) + 1) * 127.5)


def _nearest(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(N, 3) pixels, (K, 3) palette -> (N,) index of the nearest palette entry."""
    return torch.cdist(pixels, palette).argmin(dim=1)


@functools.lru_cache(maxsize=None)
def _unit_extent(shape: str) -> tuple[float, float, float, float]:
    """(umin, umax, vmin, vmax) of a shape in its unit box, measured on a fine grid."""
    grid = torch.linspace(-1.2, 1.2, 2401, dtype=torch.float64)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    inside = world.unit_mask(shape, u, v)
    us, vs = u[inside], v[inside]
    return us.min().item(), us.max().item(), vs.min().item(), vs.max().item()


_NUDGES = [(dx, dy, ds) for dx, dy, ds in itertools.product((-0.5, 0.0, 0.5), (-0.5, 0.0, 0.5), (0.94, 1.0, 1.06))]


def fit_shape(mask: torch.Tensor, shape: str) -> float:
    """Best IoU of ``shape`` placed on the bounding box of ``mask`` (H, W bool), nudged."""
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    y0, y1 = rows.min().item(), rows.max().item() + 1
    x0, x1 = cols.min().item(), cols.max().item() + 1
    umin, umax, vmin, vmax = _unit_extent(shape)
    # The box side that makes the shape's extent match the mask's, per axis, averaged.
    size = ((x1 - x0) / ((umax - umin) / 2) + (y1 - y0) / ((vmax - vmin) / 2)) / 2
    cx = (x0 + x1) / 2 - size / 2 * (umin + umax) / 2
    cy = (y0 + y1) / 2 - size / 2 * (vmin + vmax) / 2
    h, w = mask.shape
    n = len(_NUDGES)
    nudges = torch.tensor(_NUDGES, dtype=torch.float64)
    half = (size * nudges[:, 2] / 2).view(n, 1, 1)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5).view(1, h, 1) - (cy + nudges[:, 1]).view(n, 1, 1)
    xs = (torch.arange(w, dtype=torch.float64) + 0.5).view(1, 1, w) - (cx + nudges[:, 0]).view(n, 1, 1)
    templates = world.unit_mask(shape, (xs / half).expand(n, h, w), (ys / half).expand(n, h, w))
    inter = (templates & mask).sum(dim=(1, 2)).double()
    union = (templates | mask).sum(dim=(1, 2)).double()
    return (inter / union.clamp(min=1)).max().item()


@functools.lru_cache(maxsize=None)
def _pattern_phases(pattern: str, image_size: int) -> torch.Tensor:
    """(P, H, W) every phase of a pattern's dark-pixel map."""
    period = world.PATTERN_PERIOD
    return torch.stack([world.pattern_dark(pattern, image_size, dx, dy) for dx in range(period) for dy in range(period)])


def read(image: torch.Tensor, shapes: Sequence[str] = world.SHAPES, patterns: Sequence[str] = world.PATTERNS) -> Reading:
    """Read one image's labels; ``shapes``/``patterns`` are the candidates (default: all)."""
    rgb = as_rgb255(image)
    _, h, w = rgb.shape
    border = torch.cat([rgb[:, 0, :], rgb[:, -1, :], rgb[:, :, 0], rgb[:, :, -1]], dim=1).T
    bg_names = list(world.BACKGROUNDS)
    bg_palette = torch.tensor([world.BACKGROUNDS[b] for b in bg_names], dtype=torch.float64)
    bg_colour = border.median(dim=0).values
    background = bg_names[_nearest(bg_colour[None], bg_palette).item()]

    pixels = rgb.reshape(3, -1).T
    # Measured from the border's own colour, not the named background's: a generated
    # background a little off its named colour must not turn into foreground.
    mask = (pixels - bg_colour).norm(dim=1) > FOREGROUND_DISTANCE
    count = int(mask.sum())
    if count < MIN_FOREGROUND:
        return Reading(background, NONE, NONE, NONE, foreground=count)

    names = list(world.COLOURS)
    light = torch.tensor([world.COLOURS[c] for c in names], dtype=torch.float64)
    palette = torch.cat([light, light * world.DARK_SHADE])  # index k: colour k % n, dark if k >= n
    nearest = _nearest(pixels[mask], palette)
    votes = torch.bincount(nearest % len(names), minlength=len(names))
    best = int(votes.argmax())
    colour, colour_score = names[best], votes[best].item() / count

    mask2d = mask.view(h, w)
    ious = {s: fit_shape(mask2d, s) for s in shapes}
    shape = max(ious, key=ious.get)

    dark = torch.zeros(h * w, dtype=torch.bool)
    dark[mask] = nearest >= len(names)
    dark = dark.view(h, w)
    agreement = {}
    for p in patterns:
        phases = _pattern_phases(p, h)
        agree = ((phases == dark) & mask2d).sum(dim=(1, 2)).double() / count
        agreement[p] = agree.max().item()
    pattern = max(agreement, key=agreement.get)
    return Reading(background, colour, shape, pattern, colour_score, ious[shape], agreement[pattern], count, ious)


def read_batch(images: torch.Tensor, **kwargs) -> list[Reading]:
    return [read(image, **kwargs) for image in images]


def accuracy(readings: Sequence[Reading], scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Fraction of images whose colour/shape/pattern/background (and all four) match the scenes',
    and the mean shape IoU."""
    n = len(scenes)
    if n == 0 or len(readings) != n:
        raise ValueError(f"accuracy: {len(readings)} readings for {n} scenes")
    out = {}
    for i, kind in enumerate(("colour", "shape", "pattern", "background")):
        out[kind] = sum(r.labels[i] == s.labels[i] for r, s in zip(readings, scenes)) / n
    out["all"] = sum(r.labels == s.labels for r, s in zip(readings, scenes)) / n
    out["shape_iou"] = sum(r.shape_iou for r in readings) / n
    return out
