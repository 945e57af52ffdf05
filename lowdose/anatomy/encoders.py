"""Pluggable anatomy encoders: frozen networks that turn CT slices (in HU) into hierarchical features.

ALDEN's discriminator and semantic contrastive loss and BioAtt's attention read anatomy through one
interface, ``AnatomyEncoder``, so the encoder is the user's choice (``anatomy.encoder`` in a training
config, see ``load_anatomy_encoder``):

- ``anatomy_encoder`` (default) or any bundle folder: lowdose's own small encoder (``lowdose train`` of a
  ``task: anatomy_encoder`` config), trained on TotalSegmentator label maps;
- ``totalsegmentator`` / ``totalsegmentator:full``: the encoder of the user's installed TotalSegmentator
  nnU-Net (fast or full-resolution ``total`` model);
- ``timm:<model name>:<checkpoint file>``: any timm backbone from a local checkpoint.

Encoders take HU and apply their own normalisation, so a denoiser's normalisation never leaks into them.
Their weights are frozen; gradients still flow to the input, which is what a loss on features needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch

from ..bundle import Bundle, hu_to_input, load_checkpoint
from ..errors import LowdoseError
from ..networks import build_network
from ..networks.anatomy_encoder import AnatomyUNet
from .base import AnatomyEncoder
from .external import TimmEncoder, TotalSegmentatorEncoder
from .groups import ANATOMY_GROUPS

__all__ = ["AnatomyEncoder", "LowdoseAnatomyEncoder", "TimmEncoder", "TotalSegmentatorEncoder", "load_anatomy_encoder"]


class LowdoseAnatomyEncoder(AnatomyEncoder):
    """lowdose's own anatomy encoder (``AnatomyUNet``) from its bundle."""

    def __init__(self, bundle: str | Path = "anatomy_encoder"):
        super().__init__()
        found = Bundle.find(bundle)
        folder = found.folder
        if found.metadata.get("lowdose_kind") != "anatomy_encoder":
            raise LowdoseError(
                f"{folder}: not an anatomy encoder bundle (it is a "
                f"{found.metadata.get('lowdose_kind', 'denoiser')})"
            )
        # An anatomy encoder bundle's network is the registry's AnatomyUNet.
        self.network = cast(AnatomyUNet, build_network(found.network_name, **found.network_kwargs))
        state = load_checkpoint(found.weights)
        try:
            self.network.load_state_dict(state["network"])
        except (OSError, RuntimeError, KeyError) as exc:
            raise LowdoseError(f"{folder}: damaged anatomy encoder bundle ({str(exc).splitlines()[0]})") from None
        self.normalisation = found.metadata["normalisation"]
        self.groups = found.groups or dict(ANATOMY_GROUPS)
        self.folder, self.metadata, self.bundle = folder, found.metadata, found
        self.name = f"lowdose anatomy encoder ({folder.name})"
        self.freeze()

    @property
    def kwargs(self) -> dict:
        return self.bundle.network_kwargs

    def _input(self, hu: torch.Tensor) -> torch.Tensor:
        return hu_to_input(hu, self.normalisation)

    def features(self, hu: torch.Tensor) -> list[torch.Tensor]:
        return self.network.features(self._input(hu))

    def organ_presence(self, hu: torch.Tensor) -> torch.Tensor:
        return self.network.organ_presence(self._input(hu))

    def segment(self, hu: torch.Tensor) -> torch.Tensor:
        """Group labels ``[B, H, W]`` (0 background, 1..11 as ``ANATOMY_GROUPS``)."""
        logits, _ = self.network(self._input(hu))
        return logits.argmax(dim=1)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "bundle": str(self.folder),
            "groups": len(self.groups),
            "validation": self.metadata.get("validation", {}),
        }


def load_anatomy_encoder(spec: str = "anatomy_encoder", device: str | torch.device = "cpu") -> AnatomyEncoder:
    """The anatomy encoder a config names: a lowdose bundle (name or folder), ``totalsegmentator[:fast|:full]``
    or ``timm:<model name>:<checkpoint file>``; frozen, on ``device``."""
    spec = str(spec)
    if spec == "totalsegmentator" or spec.startswith("totalsegmentator:"):
        mode = spec.partition(":")[2] or "fast"
        if mode not in ("fast", "full"):
            raise LowdoseError(
                f"anatomy encoder {spec!r}: use totalsegmentator, totalsegmentator:fast or totalsegmentator:full"
            )
        encoder: AnatomyEncoder = TotalSegmentatorEncoder(fast=mode == "fast")
    elif spec.startswith("timm:"):
        _, model_name, checkpoint = (spec.split(":", 2) + ["", ""])[:3]
        if not model_name or not checkpoint:
            raise LowdoseError(
                f"anatomy encoder {spec!r}: write timm:<model name>:<checkpoint file>, "
                "e.g. timm:resnet18:/data/weights/resnet18.pth"
            )
        encoder = TimmEncoder(model_name, checkpoint)
    else:
        encoder = LowdoseAnatomyEncoder(spec)
    return encoder.freeze().to(device)
