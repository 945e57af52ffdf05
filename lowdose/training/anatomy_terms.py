"""The anatomy-aware plug-in of a denoising run: what a config's ``anatomy`` section switches on.

``AnatomyTerms`` plugs into the training engine in three places:

- as a loss term of the denoising objective (``generator_losses``: ASCON's MAC loss, ALDEN's semantic
  contrastive loss and adversarial loss, each already weighted) whose networks the denoiser's optimiser
  trains (``generator_parameters``: MAC-Net);
- as a hook after each optimiser step (``after_step``: MAC-Net's EMA target, one step of ALDEN's
  discriminator with its own optimiser);
- for BioAtt: the network's ``organ_attention`` slots (``network_kwargs``), the organ prior of whole slices
  that training patches carry and validation reads (``slice_organ_probabilities``, ``organ_probabilities``),
  and the anatomy encoder shipped in the bundle (``bundle_extras``).

Its trainable state (MAC-Net, the discriminator and its optimiser) goes into the run's checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..anatomy import AnatomyEncoder, load_anatomy_encoder
from ..anatomy.encoders import LowdoseAnatomyEncoder
from ..bundle import output_to_hu
from ..errors import LowdoseError
from .anatomy_losses import AnatomyAwareAdversary, MACLoss, SemanticContrastiveLoss
from .config import AnatomyConfig
from .engine import Hook, StepLoss


class AnatomyTerms(nn.Module, Hook):
    """The anatomy-aware terms of one training run: the frozen encoder, MAC-Net, the discriminator."""

    def __init__(self, config: AnatomyConfig, normalisation: dict, device):
        super().__init__()
        self.config, self.normalisation, self.device = config, normalisation, device
        self.encoder = load_anatomy_encoder(config.encoder, device) if config.needs_encoder else None
        if config.bioatt:  # fail now, not after the first epoch, when the encoder gives no organ presence
            with torch.no_grad():
                self.num_organs = self.loaded_encoder.organ_presence(torch.zeros(1, 1, 64, 64, device=device)).shape[1]
        self.mac = MACLoss().to(device) if config.mac_weight > 0 else None
        self.semantic = SemanticContrastiveLoss(self.encoder) if config.semantic_contrastive_weight > 0 else None
        self.adversary = None
        self.discriminator_optimiser = None
        if config.adversarial_weight > 0:
            with torch.no_grad():
                channels = [f.shape[1] for f in self.loaded_encoder.features(torch.zeros(1, 1, 64, 64, device=device))]
            self.adversary = AnatomyAwareAdversary(self.encoder, channels).to(device)
            self.discriminator_optimiser = torch.optim.AdamW(
                self.adversary.discriminator.parameters(), lr=config.discriminator_learning_rate, betas=(0.5, 0.999)
            )
        self._normal_features: list[torch.Tensor] | None = None

    @property
    def loaded_encoder(self) -> AnatomyEncoder:
        """The anatomy encoder, for the terms that read it (it is loaded whenever one of them is on)."""
        assert self.encoder is not None  # config.needs_encoder: BioAtt, the semantic or the adversarial term
        return self.encoder

    def network_kwargs(self, kwargs: dict) -> dict:
        """The denoiser's arguments with BioAtt's attention slots (one per organ group) when BioAtt is on."""
        return {**kwargs, "organ_attention": self.num_organs} if self.config.bioatt else dict(kwargs)

    def trainable_state(self) -> dict:
        """What a checkpoint keeps to resume: MAC-Net (online, target, predictor), the discriminator and its
        optimiser."""
        state = {}
        if self.mac is not None:
            state["mac"] = self.mac.state_dict()
        if self.adversary is not None:
            assert self.discriminator_optimiser is not None  # made with the adversary
            state["discriminator"] = self.adversary.discriminator.state_dict()
            state["discriminator_optimiser"] = self.discriminator_optimiser.state_dict()
        return state

    def load_trainable_state(self, state: dict) -> None:
        if self.mac is not None and "mac" in state:
            self.mac.load_state_dict(state["mac"])
        if self.adversary is not None and "discriminator" in state:
            assert self.discriminator_optimiser is not None  # made with the adversary
            self.adversary.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimiser.load_state_dict(state["discriminator_optimiser"])

    def bundle_extras(self) -> dict:
        """What the shipped checkpoint needs besides the denoiser: BioAtt reads the encoder at inference."""
        return {"anatomy_encoder": self.encoder_for_bundle()} if self.config.bioatt else {}

    def encoder_for_bundle(self) -> dict:
        """The anatomy encoder as a BioAtt bundle ships it (its organ presence is needed at inference)."""
        if not isinstance(self.encoder, LowdoseAnatomyEncoder):
            raise LowdoseError("BioAtt bundles ship lowdose's anatomy encoder; set anatomy.encoder to one")
        return {
            "kwargs": self.encoder.kwargs,
            "normalisation": dict(self.encoder.normalisation),
            "source": self.encoder.folder.name,
            "state": self.encoder.network.state_dict(),
        }

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the generator (MAC-Net's online network and predictor)."""
        return [] if self.mac is None else list(self.mac.online.parameters()) + list(self.mac.predictor.parameters())

    def hu(self, x: torch.Tensor) -> torch.Tensor:
        return output_to_hu(x, self.normalisation)

    @torch.no_grad()
    def slice_organ_probabilities(self, hu: np.ndarray) -> np.ndarray:
        """BioAtt's prior of one whole low-dose slice (HU, [H, W]): what training patches of it carry."""
        slice_hu = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None].to(self.device)
        return self.loaded_encoder.organ_presence(slice_hu)[0].cpu().numpy()

    @torch.no_grad()
    def organ_probabilities(self, low: torch.Tensor) -> torch.Tensor:
        """BioAtt's prior: organ-presence probabilities of whole low-dose centre slices (validation, as at
        inference)."""
        centre = low[:, low.shape[1] // 2 : low.shape[1] // 2 + 1]
        return self.loaded_encoder.organ_presence(self.hu(centre))

    def generator_losses(self, prediction: torch.Tensor, normal: torch.Tensor, low: torch.Tensor) -> dict:
        """Weighted terms to add to the pixel loss, by history name (each already multiplied by its weight)."""
        terms = {}
        normal_features: list[torch.Tensor] | None = None
        if self.semantic is not None or self.adversary is not None:
            with torch.no_grad():
                normal_features = self.loaded_encoder.features(self.hu(normal))
        if self.mac is not None:
            terms["mac_loss"] = self.config.mac_weight * self.mac(prediction, normal)
        if self.semantic is not None:
            centre = low[:, low.shape[1] // 2 : low.shape[1] // 2 + 1]
            terms["semantic_contrastive_loss"] = self.config.semantic_contrastive_weight * self.semantic(
                self.hu(prediction), self.hu(normal), self.hu(centre), normal_features
            )
        if self.adversary is not None:
            assert normal_features is not None  # computed above whenever the adversary is on
            terms["adversarial_loss"] = self.config.adversarial_weight * self.adversary.generator_loss(
                self.hu(prediction), normal_features
            )
        self._normal_features = normal_features
        return terms

    def after_step(self, step: StepLoss) -> dict[str, float]:
        """EMA update of MAC-Net's target; one discriminator step on the step's prediction. Returns the
        discriminator's loss."""
        figures = {}
        if self.mac is not None:
            self.mac.update_target()
        if self.adversary is not None:
            assert self.discriminator_optimiser is not None  # made with the adversary
            assert self._normal_features is not None  # kept by generator_losses of this step
            prediction, normal = step.outputs["prediction"].detach(), step.outputs["normal"]
            loss = self.adversary.discriminator_loss(self.hu(prediction), self.hu(normal), self._normal_features)
            self.discriminator_optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.discriminator_optimiser.step()
            figures["discriminator_loss"] = float(loss.detach())
        return figures
