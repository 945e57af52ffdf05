"""Self-ensemble: a network applied to a slice's in-plane flips and transposes, the answers averaged.

A CT slice's noise has no preferred in-plane direction the network should keep, but a trained network's
errors do; averaging its answers over the symmetries of the square (Timofte et al., "Seven ways to improve
example-based single image super resolution", CVPR 2016) cancels part of them. On the held-out test cases
of ``benchmarks/denoising.py`` (one slice per call, true dose) dose_unet gained 0.12, 0.18 and 0.24 dB PSNR on
average with 2, 4 and 8, on every one of the 60 cases, for that many times the compute
(``benchmarks/results/self_ensemble.md``). Slabs (2.5-D inputs) are transformed in-plane only, so their slice
order is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI and the cohort settings import this module for its sizes: no torch at start-up
    import torch

ENSEMBLE_SIZES = (1, 2, 4, 8)


def parse_ensemble(value) -> int:
    """The number of in-plane symmetries averaged: 1 (the network alone), 2, 4 or 8."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}; got {value!r}") from None
    if size not in ENSEMBLE_SIZES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}; got {value!r}")
    return size


def _transform(x: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` (0-7) of the square applied to the last two axes: bit 0 flips x, bit 1 y, bit 2 transposes."""
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x.transpose(-1, -2) if k & 4 else x


def _inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-2)
    return x.flip(-1) if k & 1 else x


def self_ensemble(apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 1) -> torch.Tensor:
    """The mean of ``apply`` over the first ``size`` in-plane symmetries of ``x`` [B, C, H, W], each answer
    mapped back (``size`` 1: ``apply(x)``)."""
    size = parse_ensemble(size)
    total = apply(x)
    for k in range(1, size):
        total = total + _inverse(apply(_transform(x, k).contiguous()), k)
    return total / size if size > 1 else total
