"""Fast numpy drawing primitives of the synthetic CT generator (see :mod:`ctmask.data.synth`).

Everything works on float32 [H, W] images. Small objects (vessels, bones, bronchi) are
drawn in batches: every object gets a square patch of the same side, the profile is
computed for all patches at once, and ``np.bincount`` scatters it into the image. This
keeps a slice with a few hundred objects at a few milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

SIZE = 512
"""Side of a synthetic slice in pixels."""


_BICUBIC_STD = 0.80
"""Measured std of bicubic-upsampled unit white noise, to renormalise to unit variance."""


def smooth_field(rng: np.random.Generator, grid: int, n: int = SIZE) -> np.ndarray:
    """Random smooth field, float32 [n, n], zero mean and about unit variance.

    Bicubic upsampling of a (grid + 2)^2 white-noise lattice with Pillow: single-threaded
    and ~0.3 ms, whereas BLAS-based smoothing thrashed its thread pool (and Gaussian
    bases hit float denormals).

    Args:
        rng: random generator.
        grid: lattice cells per axis; features are about ``n / grid`` px wide.
        n: side of the output.
    """
    z = rng.standard_normal((grid + 2, grid + 2), dtype=np.float32)
    img = Image.fromarray(z, mode="F").resize((n, n), Image.BICUBIC, box=(1, 1, grid + 1, grid + 1))
    return np.asarray(img, dtype=np.float32) * np.float32(1.0 / _BICUBIC_STD)


@lru_cache(maxsize=2)
def pixel_grid(n: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(xx, yy) float32 [n, n] pixel-centre coordinates, read-only and cached."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


def _scatter(
    shape: tuple[int, int], ox: np.ndarray, oy: np.ndarray, p: int, vals: list[np.ndarray]
) -> list[np.ndarray]:
    """Add per-patch values [S, p, p] (patch origins ox, oy [S]) into images of ``shape``."""
    h, w = shape
    gx = ox[:, None, None] + np.arange(p)[None, None, :]
    gy = oy[:, None, None] + np.arange(p)[None, :, None]
    inside = (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h) & (vals[0] > 0)
    idx = (gy * w + gx)[inside]
    return [np.bincount(idx, weights=v[inside], minlength=h * w).reshape(h, w).astype(np.float32) for v in vals]


def _size_bins(extent: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Group objects by patch side so small objects do not pay for the largest one."""
    out = []
    edges = (0, 10, 20, 34, 56, 96, 10_000)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.nonzero((extent > lo) & (extent <= hi))[0]
        if sel.size:
            out.append((sel, int(np.ceil(extent[sel].max()))))
    return out


def paint_segments(
    shape: tuple[int, int], p0: np.ndarray, p1: np.ndarray, radius: np.ndarray, value: np.ndarray
) -> np.ndarray:
    """Sum of tubes (capsules) with a cylinder-chord profile.

    Args:
        shape: (H, W) of the output.
        p0, p1: float [S, 2] (x, y) segment end points in pixels; p0 == p1 draws a disc.
        radius: float [S] tube radius in pixels (> 0).
        value: float [S] peak value at the tube axis.

    Returns:
        float32 [H, W]: sum over tubes of ``value * sqrt(1 - (d / r)^2)``, d = distance to
        the axis, with r widened by 0.5 px to mimic partial-volume blur. Overlaps add up.
    """
    out = np.zeros(shape, np.float32)
    if len(radius) == 0:
        return out
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    r = np.asarray(radius, np.float32) + 0.5
    lo = np.floor(np.minimum(p0, p1) - r[:, None] - 1).astype(np.int64)
    extent = (np.abs(p1 - p0).max(axis=1) + 2 * r + 3).astype(np.float32)
    for sel, p in _size_bins(extent):
        ox, oy = lo[sel, 0], lo[sel, 1]
        x = (ox[:, None, None] + np.arange(p)[None, None, :]).astype(np.float32) - p0[sel, 0, None, None]
        y = (oy[:, None, None] + np.arange(p)[None, :, None]).astype(np.float32) - p0[sel, 1, None, None]
        d = (p1[sel] - p0[sel])[:, :, None, None]
        inv = 1.0 / np.maximum((d[:, 0] ** 2 + d[:, 1] ** 2), 1e-6)
        t = np.clip((x * d[:, 0] + y * d[:, 1]) * inv, 0.0, 1.0)
        rs = r[sel, None, None]
        d2 = ((x - t * d[:, 0]) ** 2 + (y - t * d[:, 1]) ** 2) / (rs * rs)
        prof = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)) * np.asarray(value, np.float32)[sel, None, None]
        out += _scatter(shape, ox, oy, p, [prof])[0]
    return out


def paint_ellipses(
    shape: tuple[int, int],
    centre: np.ndarray,
    axes: np.ndarray,
    angle: np.ndarray,
    inner: np.ndarray,
    rim: np.ndarray,
    rim_width: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotated filled ellipses with a rim of another value (bone cortex around marrow).

    Args:
        shape: (H, W) of the output.
        centre: float [S, 2] (x, y) centres; axes: float [S, 2] semi-axes (along, across).
        angle: float [S] rotation of the first axis, radians.
        inner, rim: float [S] values inside and on the rim; rim_width: float [S] pixels.

    Returns:
        (coverage, coverage * value), both float32 [H, W]; composite with
        ``img * (1 - coverage) + weighted``. Edges are anti-aliased over ~1 px.
    """
    centre, axes = np.asarray(centre, np.float32), np.asarray(axes, np.float32)
    cov, val = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if len(centre) == 0:
        return cov, val
    big = axes.max(axis=1)
    lo = np.floor(centre - big[:, None] - 2).astype(np.int64)
    for sel, p in _size_bins(2 * big + 5):
        ox, oy = lo[sel, 0], lo[sel, 1]
        x = (ox[:, None, None] + np.arange(p)[None, None, :]).astype(np.float32) - centre[sel, 0, None, None]
        y = (oy[:, None, None] + np.arange(p)[None, :, None]).astype(np.float32) - centre[sel, 1, None, None]
        c, s = np.cos(angle[sel])[:, None, None], np.sin(angle[sel])[:, None, None]
        u = (x * c + y * s) / axes[sel, 0, None, None]
        v = (-x * s + y * c) / axes[sel, 1, None, None]
        q = np.sqrt(u * u + v * v)
        small = axes[sel].min(axis=1)[:, None, None]
        depth = (1.0 - q) * small  # ~ distance to the outline in pixels
        a = np.clip(depth + 0.5, 0.0, 1.0)
        is_rim = depth < rim_width[sel, None, None]
        v_in = np.where(is_rim, rim[sel, None, None], inner[sel, None, None]).astype(np.float32)
        c_img, v_img = _scatter(shape, ox, oy, p, [a, a * v_in])
        cov += c_img
        val += v_img
    return np.minimum(cov, 1.0), val


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Hermite ramp 3x^2 - 2x^3 of x clipped to [0, 1] (float32)."""
    x = np.clip(x, 0.0, 1.0)
    return (x * x * (3.0 - 2.0 * x)).astype(np.float32)


def vessel_tree(
    rng: np.random.Generator, root: tuple[float, float], base_angle: float, n_trunks: int, depth: int,
    r0: float, length0: float, leave_plane: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random branching tree of tube segments growing from ``root``.

    Each branch is two slightly bent sub-segments; it splits into two children with
    radius x0.6-0.8 and length x0.65-0.9, spreading by 15-40 degrees. With probability
    ``leave_plane`` a child runs out of the slice plane and is drawn only as its round
    cross-section, which is what makes real CT vessels look like dots and short stubs.

    Returns:
        p0, p1 float32 [S, 2] (x, y) and radius float32 [S].
    """
    p0s, p1s, rads = [], [], []
    stack = []
    for k in range(n_trunks):
        spread = (k - (n_trunks - 1) / 2) * (2.2 / max(n_trunks, 1))
        stack.append((root[0], root[1], base_angle + spread + rng.normal(0, 0.25), r0 * rng.uniform(0.8, 1.1),
                      length0 * rng.uniform(0.8, 1.2), 0))
    while stack:
        x, y, ang, r, length, gen = stack.pop()
        for _ in range(2):  # two bent halves look less like straight sticks
            ang += rng.normal(0, 0.2)
            nx, ny = x + np.cos(ang) * length / 2, y + np.sin(ang) * length / 2
            p0s.append((x, y))
            p1s.append((nx, ny))
            rads.append(r)
            x, y = nx, ny
        if gen + 1 < depth and r > 0.7:
            for sign in (-1.0, 1.0):
                child = (x, y, ang + sign * rng.uniform(0.26, 0.7), r * rng.uniform(0.6, 0.8),
                         length * rng.uniform(0.65, 0.9), gen + 1)
                if rng.uniform() >= leave_plane:
                    stack.append(child)
                else:
                    cx, cy = x + np.cos(child[2]) * r * 2, y + np.sin(child[2]) * r * 2
                    p0s.append((cx, cy))
                    p1s.append((cx, cy))
                    rads.append(child[3] * 1.1)
    return np.asarray(p0s, np.float32), np.asarray(p1s, np.float32), np.asarray(rads, np.float32)
