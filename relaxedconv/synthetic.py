"""A synthetic image task whose rotation symmetry is a knob (issue 11's controlled-symmetry experiment).

Images are asymmetric stroke glyphs drawn analytically (anti-aliased distance to line segments, no
interpolation) at a random angle, scale and shift, plus Gaussian pixel noise. The classes:

- ``orientation_classes`` of the ``num_classes`` classes share *one* glyph and differ only in its
  orientation: class j of them shows the glyph turned by ``j * 360 / orientation_classes`` degrees
  (+ a uniform jitter of +-``angle_spread``). For these the label *is* an orientation.
- every other class has a glyph of its own, drawn at a uniformly random angle: its label is
  rotation-invariant.

``orientation_fraction = orientation_classes / num_classes`` is the knob: 0 is a fully
rotation-symmetric task (rotating an image never changes its label); 1 is a task whose label is
only an orientation. With 4 classes the shared glyph's orientations are multiples of 90 degrees
(or 0 and 180 for two classes), which a C_4-invariant network cannot tell apart *exactly*: at
fraction 1 a strict SE(2)-4 model can only be at chance (25%).

Coordinates: x to the right, y up, so a positive angle turns a glyph counter-clockwise as displayed,
like ``torch.rot90(img, 1, dims=(-2, -1))`` (the library's chart, groups.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

GLYPH_SEED = 20261127  # the glyph shapes are part of the task definition, not of a run's seed


@dataclass(frozen=True)
class SymmetryTask:
    """The task's definition; :func:`make_split` draws images from it."""

    orientation_fraction: float = 0.0
    num_classes: int = 4
    size: int = 20
    angle_spread: float = 20.0  # degrees of jitter around each orientation class's angle
    scale: tuple = (0.6, 1.0)  # glyph radius as a fraction of 0.4 * size
    max_shift: float = 2.5  # pixels, uniform in each direction
    stroke_width: float = 1.6  # pixels
    noise: float = 0.3  # std of the additive Gaussian pixel noise (strokes are 1, background 0)

    def __post_init__(self):
        if not 0.0 <= self.orientation_fraction <= 1.0:
            raise ValueError(f"orientation_fraction must be in [0, 1], got {self.orientation_fraction}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        k = self.orientation_classes
        if k == 1:
            raise ValueError(
                f"orientation_fraction {self.orientation_fraction} of {self.num_classes} classes gives one "
                "orientation class, which is not orientation-dependent; use 0 or at least 2 classes' worth"
            )
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")

    @property
    def orientation_classes(self) -> int:
        return int(round(self.orientation_fraction * self.num_classes))

    def describe(self) -> dict:
        d = asdict(self)
        d["orientation_classes"] = self.orientation_classes
        d["class_angles_deg"] = class_angles_deg(self)
        return d


def class_angles_deg(task: SymmetryTask) -> list:
    """Per class: the base angle in degrees for an orientation class, None for a free-angle class."""
    k = task.orientation_classes
    return [360.0 * j / k for j in range(k)] + [None] * (task.num_classes - k)


def _random_glyph(g: torch.Generator, strokes: int = 3) -> torch.Tensor:
    """A polyline of ``strokes`` segments in the unit disk, centred on its centroid: [strokes, 2, 2]."""
    pts = [torch.zeros(2, dtype=torch.float64)]
    for _ in range(strokes):
        a = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi
        length = 0.6 + 0.6 * float(torch.rand((), generator=g, dtype=torch.float64))
        pts.append(pts[-1] + length * torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64))
    p = torch.stack(pts)
    p = p - p.mean(0)
    p = p / p.norm(dim=-1).max()
    return torch.stack([p[:-1], p[1:]], dim=1)


def render(segments: torch.Tensor, size: int, stroke_width: float) -> torch.Tensor:
    """Anti-aliased strokes: ``segments`` [B, S, 2, 2] in pixel units about the image centre
    (x right, y up) -> images [B, size, size] in [0, 1]."""
    c = (size - 1) / 2.0
    idx = torch.arange(size, dtype=segments.dtype)
    y = (c - idx)[:, None].expand(size, size)
    x = (idx - c)[None, :].expand(size, size)
    p = torch.stack([x, y], -1).reshape(1, 1, -1, 2)  # [1, 1, P, 2]
    a, b = segments[:, :, None, 0], segments[:, :, None, 1]  # [B, S, 1, 2]
    ab = b - a
    t = ((p - a) * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-12)
    closest = a + t.clamp(0, 1)[..., None] * ab
    d = (p - closest).norm(dim=-1).amin(1)  # [B, P]
    img = (1.0 - (d - stroke_width / 2)).clamp(0, 1)
    return img.reshape(-1, size, size)


def glyphs(task: SymmetryTask) -> torch.Tensor:
    """The task's glyphs [G, S, 2, 2] (G = free-angle classes + 1 shared orientation glyph when there
    are orientation classes), fixed by :data:`GLYPH_SEED`. Each glyph differs from its own quarter
    turns and from every other glyph at every angle tried (normalised overlap < 0.6 at 64 px)."""
    k = task.orientation_classes
    return _glyph_sequence((task.num_classes - k) + (1 if k else 0)).clone()


@functools.lru_cache(maxsize=8)
def _glyph_sequence(count: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(GLYPH_SEED)
    probe = torch.arange(16, dtype=torch.float64) * (2 * math.pi / 16)
    chosen, images = [], []

    def views(seg, angles):
        cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
        xy = seg[None]
        rot = torch.stack([cos * xy[..., 0] - sin * xy[..., 1], sin * xy[..., 0] + cos * xy[..., 1]], -1)
        im = render(rot * 24.0, 64, 4.0).flatten(1)
        return im / im.norm(dim=1, keepdim=True)

    while len(chosen) < 64 * count and len(images) < count:
        seg = _random_glyph(g)
        v = views(seg, probe)  # [16, P]
        own = v[4:13:4] @ v[0]  # overlap with its quarter turns
        if own.max() > 0.6:
            continue
        if any(float((v @ other[0]).max()) > 0.6 for other in images):
            continue
        chosen.append(seg)
        images.append(v)
    if len(images) < count:  # pragma: no cover - the seed is fixed; this would be a code change
        raise RuntimeError("could not draw distinct asymmetric glyphs")
    return torch.stack(chosen)


def make_split(task: SymmetryTask, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, size, size]`` (float32, noisy, roughly in [0, 1]) and labels ``[n]``,
    balanced over classes in expectation, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    shapes = glyphs(task)
    k = task.orientation_classes
    labels = torch.randint(task.num_classes, (n,), generator=g)
    # class c < k: the shared glyph (index 0) at 360*c/k degrees; class c >= k: glyph c - k (+1 if shared)
    glyph_index = torch.where(labels < k, torch.zeros_like(labels), labels - k + (1 if k else 0))
    free = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    jitter = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(task.angle_spread)
    base = labels.to(torch.float64) * (2 * math.pi / max(k, 1))
    angle = torch.where(labels < k, base + jitter, free)
    lo, hi = task.scale
    radius = (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)) * 0.4 * task.size
    shift = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * task.max_shift
    seg = shapes[glyph_index]  # [n, S, 2, 2]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    rot = torch.stack([cos * seg[..., 0] - sin * seg[..., 1], sin * seg[..., 0] + cos * seg[..., 1]], -1)
    pix = rot * radius[:, None, None, None] + shift[:, None, None, :]
    img = render(pix, task.size, task.stroke_width)
    img = img + task.noise * torch.randn(img.shape, generator=g, dtype=torch.float64)
    return img[:, None].float(), labels
