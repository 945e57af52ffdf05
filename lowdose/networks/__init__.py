"""Denoising networks for low-dose CT, one per module, found by a short name.

Every network takes normalised CT slices ``[B, in_channels, H, W]`` of any H, W and returns
``[B, 1, H, W]`` (the centre slice when ``in_channels`` > 1), except ``dose_estimator``, which
returns ``log(dose_fraction)`` of shape ``[B]``.

    >>> net = build_network("dose_unet", in_channels=3)
    >>> round(count_gflops(net), 1)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .alden_discriminator import AnatomyAwareDiscriminator
from .anatomy_encoder import AnatomyUNet
from .da_clip import DoseAnatomyEmbedding, DoseAnatomyEncoder
from .dose_diffusion import DoseDiffusion
from .dose_estimator import DoseEstimator
from .dose_unet import DoseAwareUNet
from .esaunet import ESAUNet
from .macnet import MACNet
from .redcnn import REDCNN
from .registry import UnknownNetworkError, available_networks, build_network, register_network


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_gflops(model: nn.Module, input_shape: Sequence[int] | None = None, **forward_kwargs) -> float:
    """GFLOPs of one forward pass, counting a multiply-accumulate as 2 FLOPs.

    ``input_shape`` defaults to one 512x512 slice, ``(1, model.in_channels, 512, 512)``.
    Tensors in ``forward_kwargs`` (e.g. ``dose_fraction``) are passed to ``forward``.
    The pass runs on a copy of the model on the meta device, so even RED-CNN costs milliseconds;
    only convolutions and matrix products are counted (the convention of the published figures).
    """
    if input_shape is None:
        input_shape = (1, getattr(model, "in_channels", 1), 512, 512)
    meta_model = copy.deepcopy(model).to("meta")
    x = torch.empty(tuple(input_shape), device="meta")
    kwargs = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in forward_kwargs.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(x, **kwargs)
    return counter.get_total_flops() / 1e9


__all__ = [
    "AnatomyAwareDiscriminator",
    "AnatomyUNet",
    "DoseAnatomyEmbedding",
    "DoseAnatomyEncoder",
    "DoseAwareUNet",
    "DoseDiffusion",
    "DoseEstimator",
    "ESAUNet",
    "MACNet",
    "REDCNN",
    "UnknownNetworkError",
    "available_networks",
    "build_network",
    "count_gflops",
    "count_parameters",
    "register_network",
]
