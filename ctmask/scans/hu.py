"""Hounsfield units to the pixels a model sees: the rule every reader of HU shares."""

from __future__ import annotations

import numpy as np

from ctmask.core.preprocess import window_hu

DEFAULT_HU_OFFSET = 1024.0
"""What 16-bit unsigned images add to HU (HU + 1024 >= 0 for anything above -1024 HU)."""

AIR_HU = -1000.0
"""What padding pixels (PixelPaddingValue) become."""

MIN_TISSUE_HU = -1024.0
"""Below this no tissue or air exists: such values are scanners' markers of pixels outside the
reconstruction circle (padding such as -2000 or -3024, kept by converters like dcm2niix even
where the DICOM said ``PixelPaddingValue``). They are rendered as air, as DICOM padding is."""


def render_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU -> [0, 1] with ``window``; values below :data:`MIN_TISSUE_HU` are taken as air first."""
    hu = np.asarray(hu)
    below = hu < MIN_TISSUE_HU
    if below.any():
        hu = np.where(below, AIR_HU, hu)
    return window_hu(hu, *window)
