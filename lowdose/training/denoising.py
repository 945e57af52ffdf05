"""The denoising objective: a network (and its dose estimator) learns the normal-dose slice from the low-dose
slab, with pixel MSE + windowed SSIM and any extra terms plugged in (the anatomy-aware losses); validation
PSNR/SSIM on fixed whole slices."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bundle import hu_to_input, output_to_hu
from ..metrics import psnr, ssim
from ..networks.dose_estimator import DoseEstimator
from ..windows import bounds
from .config import OptimConfig
from .data import PairSampler
from .engine import EpochRecord, EpochTiming, LossMeter, Objective, StepLoss


class DenoisingTerm(Protocol):
    """An extra loss term trained with a denoiser (ASCON's MAC loss, ALDEN's adversarial and semantic losses)."""

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the term's own networks that the denoiser's optimiser trains (MAC-Net)."""

    def generator_losses(
        self, prediction: torch.Tensor, normal: torch.Tensor, low: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Weighted terms to add to the pixel loss, by history name (``mac_loss``, ...)."""


@dataclasses.dataclass
class DenoisingNetworks:
    """What a denoising run trains and ships: the network, its dose estimator (or None), whether the network
    is dose-conditioned, and BioAtt's organ prior (whole low-dose slabs -> organ probabilities) when it has one."""

    network: nn.Module
    estimator: DoseEstimator | None
    conditioned: bool
    organ_prior: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(
        self,
        low: torch.Tensor,
        dose: torch.Tensor | None,
        organ_probabilities: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's output; BioAtt networks also get the slices' organ probabilities, region-conditioned
        ones their body region."""
        extra: dict = {} if organ_probabilities is None else {"organ_probabilities": organ_probabilities}
        if region is not None:
            extra["region"] = region
        if self.conditioned or extra:
            return self.network(low, dose if self.conditioned else None, **extra)
        return self.network(low)

    def parameters(self, train_estimator: bool = True) -> list[nn.Parameter]:
        """What the optimiser trains: the network, and the dose estimator unless it is held as it was."""
        estimator = list(self.estimator.parameters()) if self.estimator and train_estimator else []
        return list(self.network.parameters()) + estimator

    def train(self, mode: bool = True) -> None:
        self.network.train(mode)
        if self.estimator is not None:
            self.estimator.train(mode)

    def state(self) -> dict:
        """The weights a checkpoint keeps: ``network`` and ``dose_estimator`` (None without one)."""
        return {
            "network": self.network.state_dict(),
            "dose_estimator": self.estimator.state_dict() if self.estimator else None,
        }


def forward_example(network_kwargs: dict) -> dict:
    """Example conditioning inputs for one slice (for counting FLOPs): a dose, BioAtt's organ probabilities."""
    example = {}
    if network_kwargs.get("dose_conditioning"):
        example["dose_fraction"] = torch.tensor([0.25])
    if network_kwargs.get("organ_attention"):
        example["organ_probabilities"] = torch.full((1, int(network_kwargs["organ_attention"])), 0.5)
    return example


def _abdomen_window(normalisation: dict) -> tuple[float, float]:
    """The abdomen window's (C50/W400) lowest and highest value in the network's normalised units."""
    low_hu, high_hu = bounds("abdomen")
    return low_hu / normalisation["scale_hu"], high_hu / normalisation["scale_hu"]


def windowed_ssim_loss(prediction: torch.Tensor, target: torch.Tensor, normalisation: dict) -> torch.Tensor:
    """1 - SSIM on the abdomen window (C50/W400) scaled to [0, 1], as the field scores images."""
    from monai.losses import SSIMLoss  # monai.losses takes seconds to import: only when a run needs it

    lo, hi = _abdomen_window(normalisation)
    width = hi - lo

    def window(t):
        return ((t - lo) / width).clamp(0, 1)

    return SSIMLoss(spatial_dims=2, data_range=1.0)(window(prediction), window(target))


def soft_tissue_weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weight: float, normalisation: dict
) -> torch.Tensor:
    """MSE whose pixels count ``1 + weight`` where the target lies in the soft-tissue window (C50/W400) and 1
    elsewhere, normalised by the mean weight (plain MSE when ``weight`` is 0)."""
    if weight == 0:
        return F.mse_loss(prediction, target)
    lo, hi = _abdomen_window(normalisation)
    pixels = 1.0 + weight * ((target >= lo) & (target <= hi)).to(prediction.dtype)
    return (pixels * (prediction - target) ** 2).sum() / pixels.sum()


@dataclasses.dataclass
class PairBatch:
    """Training pairs on the device, normalised: low-dose slabs, normal-dose centre slices, doses (NaN when
    unknown), BioAtt's organ probabilities of each patch's whole slice, and its slice's one-hot body region
    (region-conditioned DA-Diff)."""

    low: torch.Tensor
    normal: torch.Tensor
    dose: torch.Tensor
    organ_probabilities: torch.Tensor | None = None
    region: torch.Tensor | None = None


def pair_batches(
    items: list[dict], order: np.ndarray, batch_size: int, steps: int, device, with_prior: bool
) -> Iterator[PairBatch]:
    """``steps`` batches of the epoch's patches in ``order`` (fewer when the patches run out)."""

    def stacked(batch, key):
        return torch.from_numpy(np.stack([b[key] for b in batch])).to(device)

    for step in range(steps):
        batch = [items[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        if not batch:
            return
        yield PairBatch(
            stacked(batch, "low"),
            stacked(batch, "normal"),
            stacked(batch, "dose"),
            stacked(batch, "organ_probabilities") if with_prior else None,
            stacked(batch, "region") if "region" in batch[0] else None,
        )


class DenoisingObjective(Objective):
    """Low-dose slab -> normal-dose slice: MSE (+ windowed SSIM) on patches the sampler simulates each epoch,
    the dose estimator's log-dose loss on the same patches, and the plugged-in terms."""

    def __init__(
        self,
        model: DenoisingNetworks,
        sampler: PairSampler,
        validation: list[dict],
        optim: OptimConfig,
        normalisation: dict,
        device,
        seed: int,
        terms: Sequence[DenoisingTerm] = (),
        slice_prior: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.model, self.sampler, self.validation, self.optim = model, sampler, validation, optim
        self.normalisation, self.device, self.seed = normalisation, device, seed
        self.terms, self.slice_prior = list(terms), slice_prior
        self.channels = sampler.channels
        self.steps_per_epoch = math.ceil(sampler.slices_per_epoch * sampler.patches_per_slice / optim.batch_size)

    def train_mode(self) -> None:
        self.model.train()

    def batches(self, epoch: int) -> Iterator[PairBatch]:
        items = self.sampler.epoch(epoch, slice_prior=self.slice_prior)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(items))
        return pair_batches(
            items, order, self.optim.batch_size, self.steps_per_epoch, self.device, self.slice_prior is not None
        )

    def predict(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted normal-dose slices of a batch and their pixel loss (MSE, soft tissue weighted)."""
        prediction = self.model(batch.low, batch.dose, batch.organ_probabilities)
        return prediction, soft_tissue_weighted_mse(
            prediction, batch.normal, self.optim.soft_tissue_weight, self.normalisation
        )

    def loss(self, batch: PairBatch) -> StepLoss:
        prediction, loss = self.predict(batch)
        if self.optim.ssim_weight > 0:
            loss = loss + self.optim.ssim_weight * windowed_ssim_loss(prediction, batch.normal, self.normalisation)
        total, figures = loss, {"loss": loss}
        for term in self.terms:
            for name, value in term.generator_losses(prediction, batch.normal, batch.low).items():
                total = total + value
                figures[name] = value
        estimator = self.model.estimator
        if estimator is not None and torch.isfinite(batch.dose).all():
            dose_loss = F.smooth_l1_loss(estimator(batch.low), batch.dose.log(), beta=0.1)
            total = total + self.optim.dose_loss_weight * dose_loss
            figures["dose_loss"] = dose_loss
        return StepLoss(total, figures, {"prediction": prediction, "normal": batch.normal})

    def validate(self) -> dict:
        return evaluate(self.model, self.validation, self.normalisation, self.channels, self.device)

    def record(self, epoch: int, meter: LossMeter, figures: dict, timing: EpochTiming) -> EpochRecord:
        losses = {
            "loss": meter.mean("loss"),
            "dose_loss": meter.mean("dose_loss") if "dose_loss" in meter else None,
            **{name: meter.mean(name) for name in meter.values if name not in ("loss", "dose_loss")},
        }
        timings = {
            "simulate_seconds": round(timing.prepare_seconds, 1),
            "epoch_seconds": round(timing.epoch_seconds, 1),
        }
        return EpochRecord(epoch + 1, losses, timings, figures, timing.cpu_minutes, timing.wall_minutes)


@torch.inference_mode()
def evaluate(model: DenoisingNetworks, validation: list[dict], normalisation: dict, channels: int, device) -> dict:
    """PSNR/SSIM (abdomen window) of the network on the fixed validation slices.

    A dose-conditioned network is scored with the true dose (``val_psnr_abdomen``, what selects the best
    epoch) and with the dose its estimator predicts (``val_psnr_abdomen_auto``, what users get by default).
    """
    if not validation:
        return {}
    model.train(False)

    def denoise(low, dose, centre_hu, region):
        prediction = model(low, dose, model.organ_prior(low) if model.organ_prior else None, region)
        hu = output_to_hu(prediction[0, 0].float().cpu().numpy(), normalisation)
        return np.where(centre_hu > normalisation["hu_max"], centre_hu, hu)  # metal kept as it was

    psnrs, ssims, auto_psnrs, input_psnrs, dose_errors = [], [], [], [], []
    for item in validation:
        low = torch.from_numpy(hu_to_input(item["low_hu"], normalisation))[None].to(device)
        estimated = model.estimator.predict_dose_fraction(low) if model.estimator is not None else None
        if estimated is not None:
            dose_errors.append(abs(float(estimated) - item["dose"]) / item["dose"])
        centre_hu = item["low_hu"][channels // 2]
        region = torch.from_numpy(item["region"])[None].to(device) if "region" in item else None
        hu = denoise(low, torch.tensor([item["dose"]], device=device), centre_hu, region)
        psnrs.append(psnr(item["normal_hu"], hu))
        ssims.append(ssim(item["normal_hu"], hu))
        if model.conditioned and estimated is not None:
            auto_psnrs.append(psnr(item["normal_hu"], denoise(low, estimated, centre_hu, region)))
        input_psnrs.append(psnr(item["normal_hu"], centre_hu))
    figures = {
        "val_psnr_abdomen": float(np.mean(psnrs)),
        "val_ssim_abdomen": float(np.mean(ssims)),
        "val_input_psnr_abdomen": float(np.mean(input_psnrs)),
    }
    if auto_psnrs:
        figures["val_psnr_abdomen_auto"] = float(np.mean(auto_psnrs))
    if dose_errors:
        figures["val_dose_median_rel_error"] = float(np.median(dose_errors))
    return figures
