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


# Immerkaer's noise-estimation mask (Computer Vision and Image Understanding 64:1996), scaled to unit norm so
# white noise of std s gives responses of std s; it cancels constant, linear and quadratic image content.
_SECOND_DIFFERENCE = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]) / 6.0
SOFT_TISSUE = (-0.15, 0.25)  # normalised units (HU / 1000): fat-to-soft-tissue, where the noise is measured
_MIN_PIXELS = 64


def measured_noise(centre: torch.Tensor) -> torch.Tensor:
    """``[B, 2]``: the noise of normalised slices ``centre`` [B, 1, H, W] as a network can be conditioned on it.

    Column 0: log of the fine-scale noise std (robust: median absolute second difference / 0.6745, over
    pixels whose 7x7 mean is soft tissue, else over all unclipped pixels), 0 at 10 HU. Column 1: log of its ratio
    to the same measure at half resolution, the noise texture (0 for white noise, lower for a smoother kernel's
    noise). The median ignores the anatomy's edges, which cover far fewer pixels than uniform tissue; what
    remains is a slice's noise level, which relative dose alone does not give (sources differ by 2x at full dose).
    """
    kernel = _SECOND_DIFFERENCE.to(centre)[None, None]
    smooth = F.avg_pool2d(centre, 7, stride=1, padding=3, count_include_pad=False)
    fine = _masked_median_abs(F.conv2d(centre, kernel), smooth[..., 1:-1, 1:-1])
    half = F.avg_pool2d(centre, 2)  # averaging 2x2 halves white noise's std: times 2 keeps white noise's ratio 1
    coarse = _masked_median_abs(2.0 * F.conv2d(half, kernel), F.avg_pool2d(smooth, 2)[..., 1:-1, 1:-1])
    sigma, sigma_coarse = fine / 0.6745, coarse / 0.6745
    floor = 1e-4  # 0.1 HU: clipped or constant images have no noise to measure
    return torch.stack([torch.log((sigma + floor) / 0.01), torch.log((sigma + floor) / (sigma_coarse + floor))], 1)


def _masked_median_abs(response: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """Per slice, the median of ``|response|`` over soft-tissue pixels of ``smooth`` (over unclipped pixels
    when fewer than _MIN_PIXELS are soft tissue, over all when those are too few)."""
    values = response.abs().flatten(1)
    smooth = smooth.flatten(1)
    soft = (smooth > SOFT_TISSUE[0]) & (smooth < SOFT_TISSUE[1])
    unclipped = smooth > -0.95  # not air (nor padding)
    use_soft = soft.sum(1, keepdim=True) >= _MIN_PIXELS
    use_unclipped = unclipped.sum(1, keepdim=True) >= _MIN_PIXELS
    mask = torch.where(use_soft, soft, torch.where(use_unclipped, unclipped, torch.ones_like(soft)))
    return torch.nanmedian(torch.where(mask, values, torch.full_like(values, float("nan"))), dim=1).values
