"""The denoising strength, as on clinical deep-learning reconstructions: "low", "medium" (the default) or
"high", or a number in [0, 1]: the fraction of the network's noise removal applied (low 0.4, medium 0.7,
high 1.0); the rest of the original noise is kept, so the image keeps a natural texture."""

from __future__ import annotations

import math
from collections.abc import Sequence

STRENGTH_CHOICES: Sequence[str] = ("low", "medium", "high")
STRENGTH_FRACTIONS = {"low": 0.4, "medium": 0.7, "high": 1.0}
DEFAULT_STRENGTH = "medium"


def parse_strength(text) -> str | float:
    """ "low", "medium" or "high" (any case, so the menu's "Medium" too), or a number in [0, 1]
    ("0.5", "50%"), as the server accepts it; "medium" for nothing. ValueError with the reason else."""
    if text is None:
        return DEFAULT_STRENGTH
    if isinstance(text, bool):
        raise ValueError(f"denoising strength must be low, medium, high or a number from 0 to 1; got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        word = str(text).strip().split(" ", 1)[0].lower()
        if word == "":
            return DEFAULT_STRENGTH
        if word in STRENGTH_FRACTIONS:
            return word
        try:
            value = float(word[:-1]) / 100 if word.endswith("%") else float(word)
        except ValueError:
            raise ValueError(
                f"denoising strength must be low, medium or high (or a number from 0 to 1, the share of the "
                f"noise removed); got {text!r}"
            ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"denoising strength must be from 0 (no noise removed) to 1 (all the noise the model finds, "
            f"like High); got {text!r}"
        )
    return value


def strength_fraction(strength) -> float:
    """The fraction of the noise removal applied for a strength (a name or a number); ValueError when bad."""
    value = parse_strength(strength)
    return STRENGTH_FRACTIONS[value] if isinstance(value, str) else value


def strength_name(strength) -> str:
    """A short name for a strength, for volume names and status lines: "low", "medium", "high", or the number
    ("0.5") when it is none of them."""
    value = parse_strength(strength)
    if isinstance(value, str):
        return value
    for name, fraction in STRENGTH_FRACTIONS.items():
        if abs(fraction - value) < 1e-6:
            return name
    return f"{value:g}"


def strength_label(choice: str) -> str:
    """The strength menu's text for a choice: "Low", "Medium", "High" (``parse_strength`` reads it back)."""
    return choice.capitalize()
