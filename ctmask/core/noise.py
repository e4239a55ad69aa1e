"""The noise floor: how many of a model's class calls change under invisible input noise.

Slices enter the model as lung-windowed grayscale in [0, 1], from 8-bit PNGs or windowed
DICOM. Uniform noise of +-0.25 of one 8-bit gray level (``0.25 / 255``) is below the PNG's own
quantisation; +-1 gray level is one step of it. A call that such noise changes was never a
stable decision of the model, and no reduced-precision build can be expected to keep it.
``evaluate``, ``parity`` and the precision passes report these counts next to accuracy and
agreement.

The noise of a slice depends on (seed, level, the slice's index) only, so the counts do not
depend on the batch size or on how the slices are split into batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NOISE_GRAY_LEVELS: tuple[float, ...] = (0.25, 1.0)
"""Amplitudes of the noise-floor measurements, in 8-bit gray levels (1/255 of the input range)."""


def add_gray_noise(images: np.ndarray, gray_levels: float, seed: int = 0, start: int = 0) -> np.ndarray:
    """``images`` [B, ...] in [0, 1] plus uniform noise of +-``gray_levels`` / 255, clipped to [0, 1].

    Slice ``i`` of the batch gets the noise of global index ``start + i``: generator seeded by
    ``(seed, round(gray_levels * 1000), start + i)``. Returns float32.
    """
    amp = gray_levels / 255.0
    out = np.empty(images.shape, dtype=np.float32)
    for i in range(len(images)):
        rng = np.random.default_rng((seed, int(round(gray_levels * 1000)), start + i))
        out[i] = images[i] + rng.uniform(-amp, amp, images.shape[1:])
    return np.clip(out, 0.0, 1.0, out=out)


class NoiseFloor:
    """Accumulates, batch by batch, the calls changed by input noise at each level.

    Usage: ``floor.add(clean_logits, {level: noisy_logits})`` per batch, then
    :meth:`to_dict`. ``max_abs_logits`` is the largest logit change seen at each level.
    """

    def __init__(self, levels: tuple[float, ...] = NOISE_GRAY_LEVELS, seed: int = 0):
        self.levels = tuple(levels)
        self.seed = seed
        self.n = 0
        self.changed = {lv: 0 for lv in self.levels}
        self.max_abs = {lv: 0.0 for lv in self.levels}
        self.indices: dict[float, list[int]] = {lv: [] for lv in self.levels}

    def measure(self, logits_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                clean_logits: np.ndarray) -> None:
        """Run ``logits_of`` on the noisy copies of one batch ``images`` and record the changes."""
        noisy = {lv: logits_of(add_gray_noise(images, lv, self.seed, self.n)) for lv in self.levels}
        self.add(clean_logits, noisy)

    def add(self, clean_logits: np.ndarray, noisy_logits: dict[float, np.ndarray]) -> None:
        clean = np.asarray(clean_logits, dtype=np.float64)
        for lv in self.levels:
            noisy = np.asarray(noisy_logits[lv], dtype=np.float64)
            moved = noisy.argmax(-1) != clean.argmax(-1)
            self.changed[lv] += int(moved.sum())
            self.indices[lv] += [self.n + int(i) for i in np.flatnonzero(moved)]
            if len(clean):
                self.max_abs[lv] = max(self.max_abs[lv], float(np.abs(noisy - clean).max()))
        self.n += len(clean)

    def to_dict(self) -> dict:
        """``{"seed", "n", "levels": [{"gray_levels", "changed_calls", "fraction", "max_abs_logits",
        "changed_indices"}]}``."""
        return {"seed": self.seed, "n": self.n, "levels": [
            {"gray_levels": lv, "changed_calls": self.changed[lv],
             "fraction": self.changed[lv] / self.n if self.n else 0.0,
             "max_abs_logits": self.max_abs[lv], "changed_indices": self.indices[lv]} for lv in self.levels]}


def describe_noise_floor(floor: dict) -> str:
    """One line: ``noise floor: 18 of 625 calls change under +-0.25 gray level, 26 under +-1``."""
    parts = [f"{lv['changed_calls']} of {floor['n']} calls change under +-{lv['gray_levels']:g} gray level"
             if i == 0 else f"{lv['changed_calls']} under +-{lv['gray_levels']:g}"
             for i, lv in enumerate(floor["levels"])]
    return "noise floor: " + ", ".join(parts) + " of input noise"
