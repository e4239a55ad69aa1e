"""Lesions of the synthetic CT generator: ground-glass opacity (GGO) and consolidation.

Part of :mod:`ctmask.data.synth`. Lesions are smooth, perturbed ellipses clipped to one
lung. GGO is *added* to the parenchyma (vessels stay visible through the haze, edges fade
over ~10 px); consolidation *replaces* everything (vessels vanish, edges are sharp) and
may show air bronchograms. Class patterns:

* COVID-19: bilateral, subpleural, multifocal GGO (2-7 patches), small consolidation in
  ~30%.
* common pneumonia: one large unilateral lobar/segmental consolidation, a GGO halo in
  ~50%.
* about 5% of each lesion class are atypical (unilateral COVID, large COVID
  consolidation, pneumonia with a big halo and a small core) so the classes overlap.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctmask.data.synth_anatomy import Anatomy
from ctmask.data.synth_shapes import paint_segments, pixel_grid, smooth_field, smoothstep, vessel_tree

MIN_LESION_PIXELS = 100
"""Components of at most this many pixels are not instances (as in the CNCB set)."""

AIR_BRONCHUS_HU = -920.0


class LesionCanvas:
    """Accumulates lesions of one slice, then composites them into the HU image.

    Attributes (all [H, W]):
        ggo_delta: float32 HU added to the parenchyma by GGO.
        ggo: bool GGO mask; cons_alpha / cons_value: float32 consolidation coverage and HU;
        cons: bool consolidation mask; air: float32 air-bronchogram coverage in [0, 1].
    """

    def __init__(self, anatomy: Anatomy, rng: np.random.Generator):
        self.anat = anatomy
        shape = anatomy.hu.shape
        self.ggo_delta = np.zeros(shape, np.float32)
        self.ggo = np.zeros(shape, bool)
        self.cons_alpha = np.zeros(shape, np.float32)
        self.cons_value = np.zeros(shape, np.float32)
        self.cons = np.zeros(shape, bool)
        self.air = np.zeros(shape, np.float32)
        self.shape_noise = smooth_field(rng, 22)  # irregular outlines
        self.texture = smooth_field(rng, 40)  # patchy density inside lesions

    def _field(self, centre, axes, angle, amp, lung_idx, cut=None):
        """Local window, signed field f (> 0 inside, ~ normalised depth) and lung mask there."""
        xx, yy = pixel_grid()
        reach = max(axes) * (1 + amp) + 12
        h, w = self.ggo.shape
        x0, x1 = int(max(0, centre[0] - reach)), int(min(w, centre[0] + reach + 1))
        y0, y1 = int(max(0, centre[1] - reach)), int(min(h, centre[1] + reach + 1))
        win = (slice(y0, y1), slice(x0, x1))
        dx, dy = xx[win] - centre[0], yy[win] - centre[1]
        c, s = np.cos(angle), np.sin(angle)
        u, v = (dx * c + dy * s) / axes[0], (-dx * s + dy * c) / axes[1]
        f = 1.0 - np.sqrt(u * u + v * v) + amp * self.shape_noise[win]
        if cut is not None:  # fissure: a straight border through (px, py) with normal (nx, ny)
            (px, py), (nx, ny), scale = cut
            f = np.minimum(f, ((xx[win] - px) * nx + (yy[win] - py) * ny) / scale)
        return win, f, self.anat.lung_id[win] == lung_idx

    def area(self, centre, axes, angle, amp, lung_idx, cut=None) -> int:
        """Pixels a lesion with these parameters would cover inside its lung."""
        _, f, lung = self._field(centre, axes, angle, amp, lung_idx, cut)
        return int(np.count_nonzero((f > 0) & lung))

    def add_ggo(self, centre, axes, angle, lung_idx, target_hu, edge=0.35, amp=0.25, cut=None):
        """Add a hazy patch whose core reaches ``target_hu`` (about -700..-350 HU)."""
        win, f, lung = self._field(centre, axes, angle, amp, lung_idx, cut)
        alpha = smoothstep(f / edge + 0.5) * lung
        target = target_hu + 45.0 * self.texture[win]
        delta = alpha * np.maximum(target - self.anat.parenchyma[win], 0.0)
        np.maximum(self.ggo_delta[win], delta, out=self.ggo_delta[win])
        self.ggo[win] |= (f > 0) & lung

    def add_consolidation(self, centre, axes, angle, lung_idx, target_hu, edge=0.06, amp=0.15, cut=None):
        """Add a dense region (about -100..+50 HU) with a sharp outline."""
        win, f, lung = self._field(centre, axes, angle, amp, lung_idx, cut)
        alpha = smoothstep(f / edge + 0.5) * lung
        value = target_hu + 25.0 * self.texture[win]
        newer = alpha > self.cons_alpha[win]
        self.cons_value[win] = np.where(newer, value, self.cons_value[win])
        np.maximum(self.cons_alpha[win], alpha, out=self.cons_alpha[win])
        self.cons[win] |= (f > 0) & lung

    def add_air_bronchogram(self, rng, root, angle, length):
        """Branching air-filled bronchi; only visible where consolidation is dense."""
        p0, p1, r = vessel_tree(rng, root, angle, int(rng.integers(1, 3)), int(rng.integers(2, 4)),
                                rng.uniform(1.6, 2.6), length)
        tubes = paint_segments(self.air.shape, p0, p1, r, np.ones(len(r), np.float32))
        np.maximum(self.air, np.minimum(tubes, 1.0), out=self.air)

    def render(self, hu: np.ndarray) -> np.ndarray:
        """Composite the lesions into a copy of the anatomy HU; float32 [H, W]."""
        hu = hu + self.ggo_delta
        a = self.cons_alpha
        hu = hu * (1.0 - a) + a * self.cons_value
        air = self.air * (a > 0.9)  # bronchi are seen only against dense consolidation
        return hu * (1.0 - air) + air * AIR_BRONCHUS_HU

    def label_mask(self) -> np.ndarray:
        """uint8 [H, W]: 0 background, 1 lung, 2 GGO, 3 consolidation (consolidation wins).

        Components of at most :data:`MIN_LESION_PIXELS` pixels (slivers left where a
        consolidation splits a GGO ring) are relabelled as lung so every labelled lesion is
        an instance.
        """
        mask = (self.anat.lung_id > 0).astype(np.uint8)
        mask[self.ggo] = 2
        mask[self.cons] = 3
        for value in (2, 3):
            comp, n = ndimage.label(mask == value, structure=np.ones((3, 3), bool))
            if n:
                small = np.nonzero(np.bincount(comp.ravel())[1:] <= MIN_LESION_PIXELS)[0] + 1
                if small.size:
                    mask[np.isin(comp, small)] = 1
        return mask


def _pleural_point(anat: Anatomy, lung_idx: int, phi: float):
    """Last lung pixel on the ray from the lung centre at angle ``phi``, or None."""
    cx, cy = anat.lung_centres[lung_idx - 1]
    s = np.arange(0, 300, 1.0)
    px = np.clip(np.round(cx + s * np.cos(phi)).astype(int), 0, anat.lung_id.shape[1] - 1)
    py = np.clip(np.round(cy + s * np.sin(phi)).astype(int), 0, anat.lung_id.shape[0] - 1)
    inside = anat.lung_id[py, px] == lung_idx
    hits = np.nonzero(inside)[0]
    if hits.size == 0:
        return None
    outside_after = np.nonzero(~inside[hits[0]:])[0]
    last = hits[0] + (outside_after[0] - 1 if outside_after.size else len(inside) - hits[0] - 1)
    return float(px[last]), float(py[last])


def _lateral_angle(lung_idx: int) -> float:
    """Direction from a lung's centre to its lateral chest wall."""
    return np.pi if lung_idx == 1 else 0.0


def _place(rng, canvas, lung_idx, radius, depth, spread, min_area, tries=6):
    """Subpleural placement: centre ``depth`` x short axis inside the pleura, elongated along it.

    Returns (centre, axes, angle) or None when no try covers ``min_area`` lung pixels.
    """
    for _ in range(tries):
        phi = _lateral_angle(lung_idx) + rng.normal(0.0, spread)
        phi += 0.35 if lung_idx == 2 else -0.35  # posterior predominance
        edge = _pleural_point(canvas.anat, lung_idx, phi)
        if edge is None:
            continue
        axes = (radius * rng.uniform(0.9, 1.3), radius * rng.uniform(0.6, 0.95))
        d = depth * axes[1]
        centre = (edge[0] - d * np.cos(phi), edge[1] - d * np.sin(phi))
        angle = phi + np.pi / 2
        if canvas.area(centre, axes, angle, 0.25, lung_idx) >= min_area:
            return centre, axes, angle
    return None


def draw_covid(rng: np.random.Generator, canvas: LesionCanvas) -> None:
    """Bilateral peripheral multifocal GGO, sometimes with small consolidations."""
    n = int(rng.integers(2, 8))
    unilateral = rng.uniform() < 0.05
    first = int(rng.integers(1, 3))
    lungs = [first] * n if unilateral else [first, 3 - first] + list(rng.integers(1, 3, n - 2))
    with_cons = rng.uniform() < 0.3
    big_cons = rng.uniform() < 0.04  # atypical: a pneumonia-sized dense core
    n_cons = int(rng.integers(1, 3)) if with_cons else 0
    for i, lung_idx in enumerate(lungs):
        radius = 12 + 33 * rng.uniform() ** 1.3
        if i < n_cons or (big_cons and i == 0):
            radius = max(radius, 20.0)
        spot = _place(rng, canvas, lung_idx, radius, rng.uniform(0.15, 0.7), 0.9, 220)
        if spot is None:
            continue
        centre, axes, angle = spot
        canvas.add_ggo(centre, axes, angle, lung_idx, rng.uniform(-680, -420), edge=rng.uniform(0.25, 0.45))
        if i < n_cons or (big_cons and i == 0):
            scale = rng.uniform(0.65, 0.85) if big_cons and i == 0 else rng.uniform(0.35, 0.6)
            core = (max(axes[0] * scale, 9.0), max(axes[1] * scale, 8.0))
            canvas.add_consolidation(centre, core, angle, lung_idx, rng.uniform(-100, 40))


def draw_pneumonia(rng: np.random.Generator, canvas: LesionCanvas) -> None:
    """One large unilateral lobar/segmental consolidation, a GGO halo in ~50%."""
    lung_idx = int(rng.integers(1, 3))
    atypical = rng.uniform() < 0.05  # small dense core inside a large halo
    radius = rng.uniform(25, 38) if atypical else rng.uniform(35, 90)
    spot = _place(rng, canvas, lung_idx, radius, rng.uniform(0.2, 0.6), 1.3, 400)
    if spot is None:  # tiny lung after all tries: fall back to its centre
        spot = (canvas.anat.lung_centres[lung_idx - 1], (radius, radius * 0.8), rng.uniform(0, np.pi))
    centre, axes, angle = spot
    cut = None
    if rng.uniform() < 0.5:  # lobar: one straight border along a fissure
        normal_angle = angle + np.pi / 2 + rng.normal(0, 0.5)
        nx, ny = np.cos(normal_angle), np.sin(normal_angle)
        off = rng.uniform(0.1, 0.5) * axes[1]
        cut = ((centre[0] - off * nx, centre[1] - off * ny), (nx, ny), axes[1])
    if atypical or rng.uniform() < 0.5:
        grow = rng.uniform(1.6, 2.0) if atypical else rng.uniform(1.2, 1.5)
        canvas.add_ggo(centre, (axes[0] * grow, axes[1] * grow), angle, lung_idx,
                       rng.uniform(-650, -450), edge=0.4, cut=cut)
    canvas.add_consolidation(centre, axes, angle, lung_idx, rng.uniform(-90, 40),
                             edge=rng.uniform(0.03, 0.07), cut=cut)
    if rng.uniform() < 0.6:
        hx, hy = canvas.anat.hilum[lung_idx - 1]
        toward = np.arctan2(centre[1] - hy, centre[0] - hx)
        root = (centre[0] - 0.6 * axes[0] * np.cos(toward), centre[1] - 0.6 * axes[0] * np.sin(toward))
        canvas.add_air_bronchogram(rng, root, toward, 0.5 * max(axes))
