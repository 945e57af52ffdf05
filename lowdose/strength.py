"""Denoising strength as radiologists know it from clinical deep-learning reconstructions: low, medium, high.

The strength is the fraction of the network's noise removal that is applied: the output is
``input + strength * (denoised - input)``, so what is not removed is the scan's own noise with its own texture.
High (1.0) is the network's full output; medium (0.7, the default of the command line, the server and the
Slicer module) leaves about a normal-dose noise level on a quarter-dose scan, with a natural texture instead
of the smooth, "plastic" look; low (0.4) keeps more of the original texture.
"""

from __future__ import annotations

STRENGTHS = {"low": 0.4, "medium": 0.7, "high": 1.0}
DEFAULT_STRENGTH = "medium"  # what a radiologist gets unless they ask for another level


def parse_strength(value) -> float:
    """The strength fraction of ``low``, ``medium``, ``high`` or a number in [0, 1] (0 = the input unchanged)."""
    if isinstance(value, str) and value.strip().lower() in STRENGTHS:
        return STRENGTHS[value.strip().lower()]
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        strength = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be low, medium, high or a number in [0, 1]; got {value!r}") from None
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (1 = the network's full noise removal); got {value!r}")
    return strength


def strength_label(strength: float) -> str:
    """``low``, ``medium`` or ``high`` for those levels, else the number (for series descriptions)."""
    for name, level in STRENGTHS.items():
        if abs(strength - level) < 1e-9:
            return name
    return f"{strength:.2g}"
