"""Normal chest anatomy of a synthetic axial CT slice, in Hounsfield units.

Part of :mod:`ctmask.data.synth`. Coordinates are image pixels, x to the right, y down;
the patient lies supine, so anterior is up (small y), posterior down, and the patient's
right lung is on the image left (radiological convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctmask.data.synth_shapes import SIZE, paint_ellipses, paint_segments, pixel_grid, smooth_field, vessel_tree

AIR_HU = -1000.0
SOFT_HU = 40.0
FAT_HU = -100.0
PARENCHYMA_HU = -860.0
VESSEL_MAX_DELTA = 920.0  # vessel blood (~ +40 HU) minus parenchyma; partial volume lowers it


@dataclass
class Anatomy:
    """A lesion-free slice and the geometry lesion placement needs.

    Attributes:
        hu: float32 [H, W] HU without lesions and noise.
        parenchyma: float32 [H, W] lung tissue HU without vessels (valid where ``lung_id``).
        vessels: float32 [H, W] HU added by vessels inside the lungs (>= 0).
        lung_id: uint8 [H, W] 0 outside the lungs, 1 image-left lung, 2 image-right lung.
        lung_centres: ((x, y), (x, y)) of lung 1 and lung 2.
        hilum: ((x, y), (x, y)) hilum points of lung 1 and lung 2.
        body_box: (xmin, ymin, xmax, ymax) of the body, pixels, max exclusive.
    """

    hu: np.ndarray
    parenchyma: np.ndarray
    vessels: np.ndarray
    lung_id: np.ndarray
    lung_centres: tuple[tuple[float, float], tuple[float, float]]
    hilum: tuple[tuple[float, float], tuple[float, float]]
    body_box: tuple[int, int, int, int]


def _boxy_r2(xx, yy, cx, cy, ax, ay, k):
    """Squared normalised radius of a rounded-rectangle-like ellipse (k > 0 squares it off)."""
    u = (xx - cx) / ax
    v = (yy - cy) / ay
    u2, v2 = u * u, v * v
    return u2 + v2 + k * u2 * v2


def _contour_point(cx, cy, ax, ay, k, t, phi):
    """Point at angle ``phi`` on the level set r2 = t^2 of :func:`_boxy_r2`."""
    c, s = np.cos(phi), np.sin(phi)
    cc = (c * s) ** 2
    s2 = t * t if cc < 1e-9 else (-1.0 + np.sqrt(1.0 + 4.0 * k * cc * t * t)) / (2.0 * k * cc)
    rad = np.sqrt(s2)
    return cx + ax * rad * c, cy + ay * rad * s


def _bones(rng, cx, cy, a, b, k, rib_t):
    """Ellipse parameters of ribs, sternum and one vertebra (centre, axes, angle, inner, rim, width)."""
    items = []
    for side in (1.0, -1.0):
        n = int(rng.integers(6, 10))
        angles = np.linspace(np.deg2rad(-70), np.deg2rad(78), n) + rng.normal(0, 0.05, n)
        for phi in angles:
            phi = phi if side > 0 else np.pi - phi
            x, y = _contour_point(cx, cy, a, b, k, rib_t + rng.normal(0, 0.01), phi)
            tangent = np.arctan2(np.sin(phi) / b, np.cos(phi) / a) + np.pi / 2
            along, across = rng.uniform(7, 14), rng.uniform(3.8, 5.5)
            items.append(((x, y), (along, across), tangent, rng.uniform(150, 280), rng.uniform(650, 800), 1.8))
    sx, sy = _contour_point(cx, cy, a, b, k, rib_t, -np.pi / 2)
    items.append(((sx, sy + 2), (rng.uniform(12, 19), rng.uniform(5, 7)), 0.0, 250.0, 700.0, 2.0))
    rv = b * rng.uniform(0.11, 0.14)
    vy = cy + b * rng.uniform(0.40, 0.45)
    items += [
        ((cx, vy), (rv * 1.1, rv), 0.0, rng.uniform(180, 280), 650.0, 2.5),  # vertebral body
        ((cx, vy + 1.45 * rv), (0.66 * rv, 0.56 * rv), 0.0, 30.0, 650.0, 3.0),  # arch around the canal
        ((cx, vy + 2.3 * rv), (0.75 * rv, 0.2 * rv), np.pi / 2, 300.0, 650.0, 2.0),  # spinous process
        ((cx - 0.95 * rv, vy + 1.2 * rv), (0.6 * rv, 0.22 * rv), 0.4, 300.0, 650.0, 2.0),  # transverse
        ((cx + 0.95 * rv, vy + 1.2 * rv), (0.6 * rv, 0.22 * rv), -0.4, 300.0, 650.0, 2.0),
    ]
    return items, (cx, vy, rv)


def _vessels(rng, shape, lung_id, hila, lateral_angles):
    """Vessel HU map: two branching trees from the hila plus cross-sectional dots."""
    p0s, p1s, rads = [], [], []
    for (hx, hy), ang in zip(hila, lateral_angles):
        p0, p1, r = vessel_tree(rng, (hx, hy), ang, int(rng.integers(3, 6)), 6,
                                rng.uniform(2.6, 3.8), rng.uniform(20, 30), leave_plane=0.4)
        p0s.append(p0), p1s.append(p1), rads.append(r)
    # Cross-sectional vessels: denser and thicker near the hila, as in real lungs.
    cand = rng.uniform(0, SIZE - 1, size=(1500, 2)).astype(np.float32)
    inside = lung_id[cand[:, 1].astype(int), cand[:, 0].astype(int)] > 0
    cand = cand[inside]
    d = np.min([np.hypot(cand[:, 0] - hx, cand[:, 1] - hy) for hx, hy in hila], axis=0)
    keep = rng.uniform(size=len(cand)) < np.exp(-d / 90.0) * 0.8 + 0.2
    cand, d = cand[keep][:220], d[keep][:220]
    r_dots = np.clip(rng.uniform(0.6, 1.6, len(cand)) * (1.7 - d / 150.0), 0.5, 3.0)
    # Oblique vessels: short stubs rather than perfect discs.
    tips = cand + rng.normal(0, 1.5, cand.shape).astype(np.float32) * (rng.uniform(size=(len(cand), 1)) < 0.5)
    p0s.append(cand), p1s.append(tips), rads.append(r_dots)
    p0, p1, r = (np.concatenate(v).astype(np.float32) for v in (p0s, p1s, rads))
    value = VESSEL_MAX_DELTA * np.minimum(1.0, r / 2.2)  # thin vessels: partial volume
    return np.minimum(paint_segments(shape, p0, p1, r, value), VESSEL_MAX_DELTA)


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a random normal chest slice (body, fat, lungs, vessels, airways, bones, table)."""
    xx, yy = pixel_grid()
    shape = xx.shape
    a = rng.uniform(185, 232)
    b = a * rng.uniform(0.66, 0.8)
    cx = 256 + rng.normal(0, 8)
    cy = min(256 + rng.normal(0, 10), SIZE - 22 - b)  # leave room for the table
    k = rng.uniform(0.3, 0.8)
    level = rng.uniform()  # cranio-caudal position: 0 upper chest, 1 lung bases

    body_r2 = _boxy_r2(xx, yy, cx, cy, a, b, k) * (1 + 0.03 * smooth_field(rng, 6))
    body = body_r2 < 1.0
    fat_in = rng.uniform(0.86, 0.93)
    hu = np.full(shape, AIR_HU, np.float32)
    tissue = SOFT_HU + 12 * smooth_field(rng, 24)
    fat = (body_r2 > fat_in**2) & (body_r2 < 0.975**2)
    fat |= (smooth_field(rng, 18) > 1.1) & (body_r2 < fat_in**2)  # mediastinal/intermuscular fat
    np.copyto(hu, np.where(fat, FAT_HU + 15 * smooth_field(rng, 30), tissue), where=body)

    # Lungs: boxy ellipses cut by the chest wall, mediastinum, heart, spine and aorta.
    pleura = fat_in - rng.uniform(0.06, 0.09)
    lung_field = smooth_field(rng, 8)
    hs = 0.6 + 0.6 * level
    heart = _boxy_r2(xx, yy, cx + 0.12 * a, cy - 0.12 * b, 0.3 * a * hs, 0.38 * b * hs, 0.0) < 1.0
    bone_items, (vx, vy, rv) = _bones(rng, cx, cy, a, b, k, pleura + 0.035)
    spine = (xx - vx) ** 2 + (yy - vy) ** 2 < (rv + 10) ** 2
    aorta = (xx - (cx + 1.3 * rv)) ** 2 + (yy - (vy - 1.6 * rv)) ** 2 < (0.09 * b) ** 2
    medw = a * rng.uniform(0.05, 0.1)
    blocked = (body_r2 >= pleura**2) | heart | spine | aorta | (np.abs(xx - cx) < medw)
    lung_id = np.zeros(shape, np.uint8)
    centres, hila, lateral = [], [], []
    for idx, side in ((1, -1.0), (2, 1.0)):
        lx = cx + side * a * rng.uniform(0.40, 0.45)
        ly = cy - b * rng.uniform(0.0, 0.08)
        ax = a * rng.uniform(0.33, 0.38) * (1.04 if side < 0 else 1.0)
        ay = b * rng.uniform(0.62, 0.74)
        lung = _boxy_r2(xx, yy, lx, ly, ax, ay, rng.uniform(0.2, 0.7)) * (1 + 0.06 * lung_field) < 1.0
        if side < 0 and level > 0.75:  # liver dome rising into the right base
            dome = (level - 0.75) * 4
            lung &= _boxy_r2(xx, yy, lx + 0.1 * ax, ly + ay, ax * dome, ay * 0.6 * dome, 0.0) >= 1.0
        lung_id[lung & ~blocked] = idx
        centres.append((float(lx), float(ly)))
        hila.append((float(lx - side * ax * 0.7), float(ly + ay * rng.uniform(-0.1, 0.15))))
        lateral.append(0.0 if side > 0 else np.pi)
    in_lung = lung_id > 0

    ys = yy[:, 0]
    gradient = 45.0 * np.clip((ys - cy) / b, -1, 1)[:, None]  # dependent (posterior) density
    parenchyma = (PARENCHYMA_HU + 20 * lung_field + gradient).astype(np.float32)
    vessels = _vessels(rng, shape, lung_id, hila, lateral) * in_lung
    np.copyto(hu, parenchyma + vessels, where=in_lung)

    air_items = _airways(rng, lung_id, hila, level, (cx, cy, b, medw), (vy, rv))
    _composite(hu, air_items)
    _composite(hu, bone_items)

    _table(hu, rng, xx, yy, (cx, cy, a, b))

    rows, cols = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return Anatomy(hu, parenchyma, vessels, lung_id, tuple(centres), tuple(hila), box)


def _airways(rng: np.random.Generator, lung_id: np.ndarray, hila: list, level: float, chest: tuple,
             spine: tuple) -> list:
    """Airways: bronchi near the hila (dark lumen, thin wall) and the trachea / main bronchi, as
    :func:`_composite` items."""
    cx, cy, b, medw = chest
    vy, rv = spine
    air_items = []
    for hx, hy in hila:
        for _ in range(int(rng.integers(3, 6))):
            r = rng.uniform(2.0, 5.0)
            bx, by = hx + rng.normal(0, 22), hy + rng.normal(0, 28)
            if lung_id[int(np.clip(by, 0, SIZE - 1)), int(np.clip(bx, 0, SIZE - 1))]:  # not in the heart
                air_items.append(((bx, by), (r, r * rng.uniform(0.8, 1)), rng.uniform(0, np.pi), -980.0, -250.0, 1.2))
    if level < 0.35:
        r = rng.uniform(8, 11)
        air_items.append(((cx, cy - 0.12 * b), (r, r * 0.9), 0.0, -990.0, SOFT_HU, 2.0))
    else:
        for side in (-1, 1):
            r = rng.uniform(5, 7)
            air_items.append(((cx + side * (medw + 4), vy - 2.2 * rv), (r, r), 0.0, -990.0, SOFT_HU, 1.5))
    return air_items


def _table(hu: np.ndarray, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, chest: tuple) -> None:
    """The patient table below the back: two thin curved shells around foam, drawn into ``hu``."""
    cx, cy, a, b = chest
    top = int(cy + b * 1.02 + rng.uniform(3, 9))
    curve = rng.uniform(0.0, 2e-4)
    band = slice(top, min(SIZE, top + 16))
    offset = yy[band] - (top + curve * (xx[band] - cx) ** 2)
    width_ok = np.abs(xx[band] - cx) < a * 1.15
    shell = ((np.abs(offset - 1) < 1.2) | (np.abs(offset - 9) < 1.0)) & width_ok
    hu[band] = np.where(shell, 150.0, np.where(width_ok & (offset > 1) & (offset < 9), -850.0, hu[band]))


def _composite(hu: np.ndarray, items: list) -> None:
    """Paint (centre, axes, angle, inner, rim, rim_width) ellipses over ``hu`` in place."""
    if not items:
        return
    cols = list(zip(*items))
    cov, val = paint_ellipses(hu.shape, np.asarray(cols[0]), np.asarray(cols[1]),
                              np.asarray(cols[2], np.float32), np.asarray(cols[3], np.float32),
                              np.asarray(cols[4], np.float32), np.asarray(cols[5], np.float32))
    hu *= 1.0 - cov
    hu += val
