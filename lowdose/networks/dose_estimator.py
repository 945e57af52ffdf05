"""DoseEstimator: reads the dose fraction of a low-dose slice from its noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ._noise_energy import log_noise_energy
from .registry import register_network


@register_network("dose_estimator")
class DoseEstimator(nn.Module):
    """Small CNN regressor of ``log(dose_fraction)`` from the low-dose image alone.

    Quantum noise variance grows roughly as 1/dose, so log(local noise energy) moves linearly with
    log(dose). The network therefore measures it directly: the image minus its 3x3 local mean is
    filtered by a learnt bank of 3x3 high-pass filters, squared, averaged over 4x4 blocks and
    logged. This map, next to the block-averaged image (how much tissue the rays crossed, the other
    factor of the noise level), goes through strided convolutions and a learnt spatially weighted
    mean, so regions where noise is measurable (soft tissue, not edges or clipped air) weigh most;
    the plain mean of the log-energy map joins them before the final regressor.
    There is no normalisation layer: per-image normalisation would divide out the noise amplitude
    being measured.

    With ``in_channels=1`` it reads in-plane noise only: given a 2.5-D slab it takes the centre slice, so a
    single slice, a thick-slice series and a thin one are read alike (differences between neighbouring
    slices, which a single slice does not have, play no part).

    It is a regressor of a continuous log-dose, not a classifier over the training doses, so doses
    between those it was trained on (1/3, 1/8) get answers between theirs. ``forward`` returns
    ``log(dose_fraction)`` (<= 0) of shape ``[B]``, the quantity to train with an L1 or L2 loss;
    ``predict_dose_fraction`` returns the fraction in (0, 1]. With the defaults: 0.1 M parameters,
    0.2 GFLOPs per 512x512 slice.

    Args:
        in_channels: channels of the input slices (1, or 3 for 2.5-D input).
        noise_filters: number of learnt high-pass filters whose log-energy is measured.
        features: widths of the stride-2 convolutions after the 4x4 energy averaging.
        initial_dose_fraction: the output before training; the middle of the expected doses in log
            scale (about 1/5 for 1/2..1/20) gives the regression a short way to go.
    """

    def __init__(
        self,
        in_channels: int = 1,
        noise_filters: int = 16,
        features: Sequence[int] = (32, 64, 128),
        initial_dose_fraction: float = 0.2,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.noise_filter_bank = nn.Conv2d(in_channels, noise_filters, 3, padding=1, bias=False)
        layers, width = [], noise_filters + in_channels
        for f in features:
            layers += [nn.Conv2d(width, f, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
            width = f
        self.features = nn.Sequential(*layers)
        self.pool_weight = nn.Conv2d(width, 1, 1)
        self.regressor = nn.Sequential(nn.Linear(width + noise_filters, 64), nn.LeakyReLU(0.1), nn.Linear(64, 1))
        # log(dose) = -softplus(z) keeps the dose <= 1; the bias puts z where it gives the initial dose.
        target = -math.log(initial_dose_fraction)
        output = cast(nn.Linear, self.regressor[-1])
        nn.init.zeros_(output.weight)
        nn.init.constant_(output.bias, math.log(math.expm1(target)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.in_channels:  # a wider 2.5-D slab: read its centre slice(s) only, in-plane
            first = (x.shape[1] - self.in_channels) // 2
            x = x[:, first : first + self.in_channels]
        log_energy, context = log_noise_energy(x, self.noise_filter_bank)
        h = self.features(torch.cat([log_energy, context], dim=1))
        weight = torch.sigmoid(self.pool_weight(h))
        pooled = (h * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1e-6)
        # The slice's mean log energy also goes straight to the regressor: it is nearly linear in
        # log(dose), which makes the regression quick to learn and smooth between trained doses.
        pooled = torch.cat([pooled, log_energy.mean(dim=(2, 3))], dim=1)
        return -F.softplus(self.regressor(pooled)).squeeze(1)

    @torch.no_grad()
    def predict_dose_fraction(self, x: torch.Tensor) -> torch.Tensor:
        """Dose fraction of each slice, shape ``[B]``, in (0, 1]."""
        return self.forward(x).exp().clamp(1e-6, 1.0)
