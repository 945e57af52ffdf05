"""The interface of an anatomy encoder: a frozen network that turns CT slices (in HU) into hierarchical features."""

from __future__ import annotations

import abc

import torch

from ..errors import LowdoseError


class AnatomyEncoder(abc.ABC, torch.nn.Module):
    """A frozen anatomy encoder: ``features(hu)`` for [B, 1, H, W] HU slices -> feature maps, fine to coarse."""

    name = "anatomy encoder"

    def __init__(self):
        torch.nn.Module.__init__(self)

    @abc.abstractmethod
    def features(self, hu: torch.Tensor) -> list[torch.Tensor]:
        """Hierarchical features of HU slices ``[B, 1, H, W]``, fine to coarse."""

    def organ_presence(self, hu: torch.Tensor) -> torch.Tensor:
        """Per-slice probabilities ``[B, 11]`` that each anatomy group is in the slice (BioAtt's prior)."""
        raise LowdoseError(
            f"the {self.name} gives no organ-presence probabilities; BioAtt needs lowdose's "
            "anatomy encoder (anatomy.encoder: anatomy_encoder)"
        )

    def describe(self) -> dict:
        return {"name": self.name}

    def freeze(self) -> AnatomyEncoder:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # frozen: always in eval mode (normalisation statistics fixed)
        return super().train(False)
