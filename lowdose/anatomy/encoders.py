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

import abc
import json
from pathlib import Path

import torch

from ..errors import LowdoseError
from .groups import ANATOMY_GROUPS


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
        raise LowdoseError(f"the {self.name} gives no organ-presence probabilities; BioAtt needs lowdose's "
                           "anatomy encoder (anatomy.encoder: anatomy_encoder)")

    def describe(self) -> dict:
        return {"name": self.name}

    def freeze(self) -> "AnatomyEncoder":
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # frozen: always in eval mode (normalisation statistics fixed)
        return super().train(False)


class LowdoseAnatomyEncoder(AnatomyEncoder):
    """lowdose's own anatomy encoder (``AnatomyUNet``) from its bundle."""

    def __init__(self, bundle: str | Path = "anatomy_encoder"):
        super().__init__()
        from ..bundle import find_bundle, load_checkpoint
        from ..networks import build_network

        folder = find_bundle(bundle)
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        if meta.get("lowdose_kind") != "anatomy_encoder":
            raise LowdoseError(f"{folder}: not an anatomy encoder bundle (it is a {meta.get('lowdose_kind', 'denoiser')})")
        self.network = build_network(meta["network"]["name"], **meta["network"]["kwargs"])
        state = load_checkpoint(folder / "models" / "model.pt")
        try:
            self.network.load_state_dict(state["network"])
        except (OSError, RuntimeError, KeyError) as exc:
            raise LowdoseError(f"{folder}: damaged anatomy encoder bundle ({str(exc).splitlines()[0]})") from None
        self.normalisation = meta["normalisation"]
        self.groups = {int(k): v for k, v in meta.get("groups", ANATOMY_GROUPS).items()}
        self.folder, self.metadata = folder, meta
        self.name = f"lowdose anatomy encoder ({folder.name})"
        self.freeze()

    @property
    def kwargs(self) -> dict:
        return dict(self.metadata["network"]["kwargs"])

    def _input(self, hu: torch.Tensor) -> torch.Tensor:
        from ..bundle import hu_to_input

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
        return {"name": self.name, "bundle": str(self.folder), "groups": len(self.groups),
                "validation": self.metadata.get("validation", {})}


def load_anatomy_encoder(spec: str = "anatomy_encoder", device: str | torch.device = "cpu") -> AnatomyEncoder:
    """The anatomy encoder a config names: a lowdose bundle (name or folder), ``totalsegmentator[:fast|:full]``
    or ``timm:<model name>:<checkpoint file>``; frozen, on ``device``."""
    spec = str(spec)
    if spec == "totalsegmentator" or spec.startswith("totalsegmentator:"):
        from .external import TotalSegmentatorEncoder

        mode = spec.partition(":")[2] or "fast"
        if mode not in ("fast", "full"):
            raise LowdoseError(f"anatomy encoder {spec!r}: use totalsegmentator, totalsegmentator:fast or totalsegmentator:full")
        encoder = TotalSegmentatorEncoder(fast=mode == "fast")
    elif spec.startswith("timm:"):
        from .external import TimmEncoder

        _, model_name, checkpoint = (spec.split(":", 2) + ["", ""])[:3]
        if not model_name or not checkpoint:
            raise LowdoseError(f"anatomy encoder {spec!r}: write timm:<model name>:<checkpoint file>, "
                               "e.g. timm:resnet18:/data/weights/resnet18.pth")
        encoder = TimmEncoder(model_name, checkpoint)
    else:
        encoder = LowdoseAnatomyEncoder(spec)
    return encoder.freeze().to(device)
