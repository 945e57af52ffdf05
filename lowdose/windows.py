"""The display windows of CT reading, one place for the metrics, the figures, the fidelity report and training.

A window is ``(centre, width)`` in HU; HU from ``centre - width/2`` to ``centre + width/2`` span black to white.
The values are the LDCT field's (Eulig et al., ldct-benchmark, Medical Physics 2024).
"""

from __future__ import annotations

WINDOWS: dict[str, tuple[float, float]] = {
    "chest": (-600.0, 1500.0),
    "abdomen": (50.0, 400.0),  # also the soft-tissue window (ALDEN's discriminator, the SSIM loss)
    "head": (40.0, 80.0),
}
ABDOMEN = WINDOWS["abdomen"]
SOFT_TISSUE = ABDOMEN


def window(name_or_window: str | tuple[float, float]) -> tuple[float, float]:
    """``(centre, width)`` of a window given by name (chest, abdomen, head) or as ``(centre, width)``."""
    if isinstance(name_or_window, str):
        return WINDOWS[name_or_window]
    centre, width = name_or_window
    return float(centre), float(width)


def bounds(name_or_window: str | tuple[float, float]) -> tuple[float, float]:
    """``(lowest, highest)`` HU of a window: black and white."""
    centre, width = window(name_or_window)
    return centre - width / 2.0, centre + width / 2.0
