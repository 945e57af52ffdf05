"""The dose of a scan as the module asks for it: "auto" (the model estimates it from the image) or a fraction
of a normal dose, chosen from a menu (``DOSE_CHOICES``) or typed ("0.3", "1/4", "25%")."""

from __future__ import annotations

from collections.abc import Sequence

DOSE_CHOICES: Sequence[str] = ("auto", "1/2", "1/3", "1/4", "1/5", "1/6", "1/8", "1/10", "1/20")


def parse_dose(text) -> str | float:
    """ "auto" or a dose fraction in (0, 1] from 0.25, "1/4", "25%" (what the server accepts); ValueError else.

    Anything after the first space is ignored, so a menu text such as "1/4 (25 % of normal dose)" is read too.
    """
    if text is None:
        return "auto"
    value = str(text).strip().split(" ", 1)[0].lower()
    if value in ("", "auto"):
        return "auto"
    try:
        if value.endswith("%"):
            dose = float(value[:-1]) / 100
        elif "/" in value:
            num, den = value.split("/", 1)
            dose = float(num) / float(den)
        else:
            dose = float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"dose must be auto or a fraction such as 0.25, 1/4 or 25%; got {text!r}") from None
    if not 0 < dose <= 1:
        raise ValueError(f"dose fraction must be in (0, 1]; got {text!r}")
    return dose


def dose_label(choice: str) -> str:
    """The dose menu's text for a choice: "auto (estimated from the image)", "1/4 (25 % of normal dose)"."""
    dose = parse_dose(choice)
    if isinstance(dose, str):
        return "auto (estimated from the image)"
    return f"{choice} ({100 * dose:.3g} % of normal dose)"


def dose_choice(text: str) -> str:
    """What the user chose in the dose menu: the choice behind one of its texts, else what was typed."""
    return {dose_label(choice): choice for choice in DOSE_CHOICES}.get(text, str(text).strip())
