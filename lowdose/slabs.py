"""2.5-D slabs of a CT volume (a slice and its neighbours) and the slices that hold body, for training and inference."""

from __future__ import annotations

import numpy as np

from .volume import CTVolume

# Above this is body (soft tissue, bone, fat, lung parenchyma), below it air and scanner padding.
BODY_HU = -500.0


def slab(hu: np.ndarray, index: int, channels: int) -> np.ndarray:
    """Slices ``index - channels//2 .. index + channels//2`` of a [z, y, x] array, ends repeated."""
    half = channels // 2
    picks = np.clip(np.arange(index - half, index + half + 1), 0, hu.shape[0] - 1)
    return hu[picks]


def body_slices(volume: CTVolume, min_fraction: float) -> list[int]:
    """Slices in which at least ``min_fraction`` of the pixels are body (not air or padding)."""
    fraction = (volume.hu > BODY_HU).mean(axis=(1, 2))
    return [int(k) for k in np.flatnonzero(fraction >= min_fraction)]
