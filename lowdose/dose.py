"""Dose fractions as users write them: 0.25, 1/4, 25% or auto (estimate it from the image)."""

from __future__ import annotations


def parse_dose(value) -> float | str:
    """``auto`` or a dose fraction in (0, 1], given as 0.25, "1/4" or "25%"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return "auto"
    try:
        if isinstance(value, str):
            text = value.strip()
            if text.endswith("%"):
                dose = float(text[:-1]) / 100
            elif "/" in text:
                num, den = text.split("/", 1)
                dose = float(num) / float(den)
            else:
                dose = float(text)
        else:
            dose = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"dose must be auto or a fraction such as 0.25, 1/4 or 25%; got {value!r}") from None
    if not 0 < dose <= 1:
        raise ValueError(f"dose fraction must be in (0, 1]; got {value!r}")
    return dose
