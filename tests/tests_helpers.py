"""Helpers shared by several test modules."""

from __future__ import annotations

import numpy as np


def ranked_rows(n_images=3, n=16, seed=0, pad=0):
    """Score-descending rows with well-separated scores and random deltas; ``pad`` zero rows."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_images, n, 5), np.float32)
    for i in range(n_images):
        scores = np.sort(rng.uniform(0.05, 0.95, n - pad))[::-1]
        rows[i, : n - pad, 0] = scores
        rows[i, : n - pad, 1:] = rng.normal(0, 1, (n - pad, 4))
    return rows
