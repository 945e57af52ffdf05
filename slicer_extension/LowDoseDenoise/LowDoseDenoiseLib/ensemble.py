"""The self-ensemble (the server's ``ensemble``): the network's answers averaged over 1, 2, 4 or 8 in-plane flips
and transposes of each slice. 1 is the network alone (the default, and not sent, so servers from before the
ensemble keep working); more removes a little more of the network's own errors for that many times its time
(on held-out data +0.12 dB PSNR with 2, +0.18 dB with 4, +0.24 dB with 8)."""

from __future__ import annotations

from collections.abc import Sequence

ENSEMBLE_SIZES: Sequence[int] = (1, 2, 4, 8)  # the server refuses any other
DEFAULT_ENSEMBLE = 1
_LABELS = {
    1: "Off (fastest)",
    2: "2 symmetries (+0.12 dB, 2x time)",
    4: "4 symmetries (+0.18 dB, 4x time)",
    8: "8 symmetries (+0.24 dB, 8x time)",
}


def check_ensemble(ensemble) -> int:
    """``ensemble`` when it is 1, 2, 4 or 8, as the server accepts it; a bool, a text, a float or None is refused
    too. ValueError naming the allowed sizes else."""
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble not in ENSEMBLE_SIZES:
        raise ValueError(
            f"self-ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))} (the number of flipped or "
            f"turned copies of each slice averaged; 1: off); got {ensemble!r}"
        )
    return ensemble


def ensemble_label(ensemble: int) -> str:
    """The menu's text for a size: "Off (fastest)", "2 symmetries (+0.12 dB, 2x time)"..."""
    return _LABELS[check_ensemble(ensemble)]


def ensemble_choice(text) -> int:
    """The size behind one of the menu's texts ("Off (fastest)" -> 1, "8 symmetries (...)" -> 8); ValueError
    naming the allowed sizes else."""
    word = str(text or "").strip().split(" ", 1)[0]
    if word.lower() == "off":
        return DEFAULT_ENSEMBLE
    return check_ensemble(int(word) if word.isascii() and word.isdigit() else text)


def ensemble_name(ensemble: int) -> str:
    """The size in a volume's name: "x2", "x4", "x8"; "" for 1 (the network alone)."""
    return "" if check_ensemble(ensemble) == 1 else f"x{ensemble}"
