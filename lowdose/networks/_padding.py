"""Padding to a multiple of a network's total stride, and cropping back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom and right of ``[B, C, H, W]`` so H and W divide by ``multiple``; also return (H, W).

    Reflection keeps the noise texture at the border (zeros would look like a hard edge to the
    network); replication is the fallback for images smaller than the padding.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (height, width)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo ``pad_to_multiple``."""
    return x[..., : size[0], : size[1]]
