"""The noise-energy map that dose-reading networks start from (the dose estimator, DA-CLIP's dose branch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def log_noise_energy(x: torch.Tensor, filter_bank: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log energy, context)`` at 1/4 resolution of normalised slices ``x`` [B, C, H, W]: the log of the local
    energy of ``filter_bank`` (high-pass filters) applied to ``x`` minus its 3x3 mean, and ``x`` pooled alike.

    The floor, far below CT noise energy, bounds the log where clipped air has none; the offset centres the log
    energy of CT noise in normalised units (std ~0.01 -> about -9) near zero, so the next layers do not start by
    fighting a large constant."""
    local_mean = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    energy = F.avg_pool2d(filter_bank(x - local_mean).square(), 4, ceil_mode=True)
    return torch.log(energy + 1e-8) + 9.0, F.avg_pool2d(x, 4, ceil_mode=True)
