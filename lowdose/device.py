"""The torch device a user asked for: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from .errors import LowdoseError


def pick_device(device: str = "auto") -> torch.device:
    """cuda when asked or available (auto), else cpu; a clear error if cuda is asked but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowdoseError("--device cuda: no CUDA GPU is available on this machine (use auto or cpu)")
    return torch.device(device)
