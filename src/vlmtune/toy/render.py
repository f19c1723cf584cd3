"""Procedural, batched rendering of toy scenes to (B, 3, S, S) float images in [0, 1].

Every random choice (position, scale, colour jitter, texture phase, noise) comes from an explicit
``torch.Generator``, so a dataset is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtune.toy.world import COLOUR_RGB, COLOURS, SHAPES, STYLES, SceneBatch


@dataclass(frozen=True)
class StyleParams:
    """Strength of each rendering style; downstream tasks raise these to make a shift harder."""

    noise_std: float = 0.2  # 'noisy': additive Gaussian noise
    blur_sigma: float = 1.2  # 'blurry': Gaussian blur in pixels
    pixel_factor: int = 2  # 'pixel': down-sampling factor before nearest up-sampling
    sketch_width: float = 0.08  # 'sketch': outline half-width in shape units
    sketch_jitter: float = 0.0  # 'sketch': random wobble of the outline, in shape units


def _polygon(p: torch.Tensor, n: int, apothem: float, phase: float) -> torch.Tensor:
    angles = phase + 2 * math.pi * torch.arange(n, dtype=p.dtype, device=p.device) / n  # (n,)
    normals = torch.stack([angles.cos(), angles.sin()], -1)  # (n, 2)
    return (p @ normals.T).amax(-1) - apothem  # (..., )


def _box(p: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    return torch.maximum(p[..., 0].abs() - hx, p[..., 1].abs() - hy)


def _rotate(p: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=p.dtype, device=p.device)
    return p @ rot


def shape_sdf(p: torch.Tensor) -> torch.Tensor:
    """Signed distances of points ``p`` (..., 2) in unit shape coordinates to every shape: (n_shapes, ...)."""
    r = p.norm(dim=-1)
    theta = torch.atan2(p[..., 1], p[..., 0])
    star_k = ((torch.cos(5 * (theta - math.pi / 2)) + 1) / 2) ** 2
    plus = torch.minimum(_box(p, 0.95, 0.3), _box(p, 0.3, 0.95))
    crescent = torch.maximum(r - 0.95, -((p - torch.tensor([0.45, -0.2], device=p.device)).norm(dim=-1) - 0.75))
    sdfs = {
        "circle": r - 0.9,
        "triangle": _polygon(p, 3, 0.5, math.pi / 2),  # apex up (image y grows downwards)
        "square": _box(p, 0.78, 0.78),
        "diamond": (p[..., 0].abs() + p[..., 1].abs() - 1.05) / math.sqrt(2),
        "star": r - (0.42 + 0.6 * star_k),
        "plus": plus,
        "cross": torch.minimum(_box(_rotate(p, math.pi / 4), 0.95, 0.28), _box(_rotate(p, -math.pi / 4), 0.95, 0.28)),
        "ring": (r - 0.72).abs() - 0.22,
        "crescent": crescent,
        "hexagon": _polygon(p, 6, 0.85, 0.0),
    }
    return torch.stack([sdfs[name] for name in SHAPES])


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = img.shape[1]
    img = F.conv2d(
        F.pad(img, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(img, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def render(
    scene: SceneBatch,
    generator: torch.Generator,
    size: int = 32,
    params: StyleParams | None = None,
) -> torch.Tensor:
    """Render a batch of scenes to images (B, 3, size, size) in [0, 1]."""
    params = params or StyleParams()
    b = len(scene)
    dev = scene.shape.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(dev)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=generator.device).to(dev)

    lin = (torch.arange(size, device=dev, dtype=torch.float) + 0.5) / size * 2 - 1
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)  # (S, S, 2) with x right, y down
    radius = torch.where(scene.size == 1, 0.62, 0.36) * (1 + 0.1 * (rand(b) * 2 - 1))  # (B,)
    centre = (rand(b, 2) * 2 - 1) * (0.92 - radius)[:, None]  # (B, 2) keeps the shape inside
    angle = (rand(b) * 2 - 1) * (10 * math.pi / 180)  # small rotation jitter
    cos, sin = angle.cos(), angle.sin()
    rel = (grid[None] - centre[:, None, None]) / radius[:, None, None, None]  # (B, S, S, 2)
    p = torch.stack(
        [
            cos[:, None, None] * rel[..., 0] + sin[:, None, None] * rel[..., 1],
            -sin[:, None, None] * rel[..., 0] + cos[:, None, None] * rel[..., 1],
        ],
        -1,
    )
    all_sdf = shape_sdf(p)  # (n_shapes, B, S, S)
    sdf = all_sdf.gather(0, scene.shape.view(1, b, 1, 1).expand(1, b, size, size))[0]  # (B, S, S)
    px = radius[:, None, None] * size / 2  # pixels per shape unit, for anti-aliasing
    mask = torch.sigmoid(-sdf * px * 2.5)  # (B, S, S)

    # fill colour with jitter and texture
    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS], device=dev)[scene.colour]  # (B, 3)
    rgb = (rgb + 0.06 * randn(b, 3)).clamp(0, 1)
    xs, ys = grid[..., 0] * size / 2, grid[..., 1] * size / 2  # pixel units (S, S)
    phase = rand(b, 2) * 5
    period = 4.5
    stripes = (torch.sin(2 * math.pi * (xs + ys + phase[:, :1, None]) / period) > 0).float()  # (B, S, S)
    dx = torch.remainder(xs - phase[:, :1, None], period) - period / 2
    dy = torch.remainder(ys - phase[:, 1:, None], period) - period / 2
    dots = ((dx**2 + dy**2) < 1.4).float()
    checks = torch.remainder(torch.floor((xs - phase[:, :1, None]) / 3) + torch.floor((ys - phase[:, 1:, None]) / 3), 2)
    tex = torch.stack([torch.zeros_like(stripes), stripes, dots, checks])  # (4, B, S, S)
    tex = tex.gather(0, scene.texture.view(1, b, 1, 1).expand(1, b, size, size))[0]  # 1 where darkened
    fill = rgb[:, :, None, None] * (1 - 0.6 * tex[:, None])  # (B, 3, S, S)

    # backgrounds: dark, light, gradient, noisy
    dark = (rand(b, 1, 1, 1) * 0.15).expand(b, 3, size, size)
    light = (0.8 + rand(b, 1, 1, 1) * 0.2).expand(b, 3, size, size)
    c0, c1 = 0.25 + 0.5 * rand(b, 3, 1, 1), 0.25 + 0.5 * rand(b, 3, 1, 1)
    direction = rand(b) * 2 * math.pi
    t = (
        grid[None, ..., 0] * direction.cos()[:, None, None] + grid[None, ..., 1] * direction.sin()[:, None, None] + 1
    ) / 2
    gradient = c0 + (c1 - c0) * t[:, None]
    noisy = (0.3 + 0.4 * rand(b, 1, 1, 1) + 0.15 * randn(b, 1, size, size)).expand(b, 3, size, size)
    bgs = torch.stack([dark, light, gradient, noisy])  # (4, B, 3, S, S)
    bg = bgs.gather(0, scene.background.view(1, b, 1, 1, 1).expand(1, b, 3, size, size))[0]
    img = bg * (1 - mask[:, None]) + fill * mask[:, None]  # (B, 3, S, S)
    img = img + 0.02 * randn(b, 3, size, size)

    # rendering styles
    style = scene.style
    out = img.clone()
    sel = style == STYLES.index("sketch")
    if bool(sel.any()):
        n = int(sel.sum())
        wobble = params.sketch_jitter * randn(n, 1, 1)
        line = torch.sigmoid(-((sdf[sel] + wobble).abs() - params.sketch_width) * px[sel] * 2.5)  # (n, S, S)
        line = torch.maximum(line, 0.7 * mask[sel] * tex[sel])  # textures are hatched in ink
        paper = 0.85 + 0.1 * rand(n, 1, 1)
        ink = 0.1 + 0.15 * rand(n, 1, 1)
        gray = paper * (1 - line) + ink * line + 0.03 * randn(n, size, size)
        out[sel] = gray[:, None].expand(n, 3, size, size)
    sel = style == STYLES.index("pixel")
    if bool(sel.any()):
        f = params.pixel_factor
        low = F.avg_pool2d(img[sel], f)
        low = torch.round(low * 4) / 4  # colour quantisation
        out[sel] = F.interpolate(low, scale_factor=f, mode="nearest")
    sel = style == STYLES.index("noisy")
    if bool(sel.any()):
        out[sel] = img[sel] + params.noise_std * randn(int(sel.sum()), 3, size, size)
    sel = style == STYLES.index("blurry")
    if bool(sel.any()):
        out[sel] = _gaussian_blur(img[sel], params.blur_sigma)
    return out.clamp(0, 1)
