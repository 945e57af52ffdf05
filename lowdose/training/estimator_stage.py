"""Stage 2 of a denoising run: the dose estimator alone on whole slices, as it reads them at inference.

Stage 1 shows the estimator only the denoiser's patches; this stage trains it on every whole slab of the
simulation pool and stores it in the best checkpoint (its last epoch: the held-out series does not pick it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bundle import atomic_torch_save as atomic_save
from ..bundle import load_checkpoint
from .config import TrainConfig
from .data import PairSampler
from .denoising import DenoisingNetworks, evaluate
from .engine import (
    EpochRecord,
    EpochTiming,
    LogEpochs,
    LossMeter,
    Objective,
    Progress,
    StepLoss,
    Trainer,
    warmup_cosine,
)

log = logging.getLogger("lowdose.train")


class DoseEstimatorObjective(Objective):
    """Log-dose regression (smooth L1) of whole low-dose slabs; batches hold slices of one size."""

    def __init__(
        self,
        model: DenoisingNetworks,
        sampler: PairSampler,
        validation: list[dict],
        batch_size: int,
        normalisation: dict,
        device,
        normal_fraction: float = 0.0,
    ):
        assert model.estimator is not None  # stage 2 trains the dose estimator
        self.model, self.sampler, self.validation, self.batch_size = model, sampler, validation, batch_size
        self.normal_fraction = normal_fraction
        self.estimator: nn.Module = model.estimator
        self.normalisation, self.device = normalisation, device
        self.slices_per_epoch = sum(1 for _ in sampler.whole_slices(0))  # reads the pool once (cached afterwards)
        self.steps_per_epoch = math.ceil(self.slices_per_epoch / batch_size)

    def train_mode(self) -> None:
        self.estimator.train()

    def batches(self, epoch: int) -> Iterator[list]:
        batch: list = []
        for item in self.sampler.whole_slices(1000 + epoch, normal_fraction=self.normal_fraction):
            if batch and item[0].shape != batch[0][0].shape:  # series differ in size: batch alike slices
                yield batch
                batch = []
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def loss(self, batch: list) -> StepLoss:
        low = torch.from_numpy(np.stack([b[0] for b in batch])).to(self.device)
        dose = torch.tensor([b[1] for b in batch], dtype=torch.float32, device=self.device)
        loss = F.smooth_l1_loss(self.estimator(low), dose.log(), beta=0.1)
        return StepLoss(loss, {"dose_loss": loss})

    def validate(self) -> dict:
        figures = evaluate(self.model, self.validation, self.normalisation, self.sampler.channels, self.device)
        return {k: v for k, v in figures.items() if "dose" in k or "auto" in k}

    def progress(self, epoch: int, epochs: int) -> Progress:
        return Progress(f"dose estimator {epoch + 1}/{epochs}", self.slices_per_epoch, "slice")

    def progress_units(self, batch: list) -> int:
        return len(batch)

    def record(self, epoch: int, meter: LossMeter, figures: dict, timing: EpochTiming) -> EpochRecord:
        return EpochRecord(epoch + 1, {"dose_loss": meter.mean("dose_loss")}, {}, figures)


def train_estimator_stage(
    config: TrainConfig,
    out: Path,
    model: DenoisingNetworks,
    sampler: PairSampler,
    validation: list[dict],
    normalisation: dict,
    device,
    progress: bool,
) -> dict:
    """Stage 2 on the best checkpoint's denoiser and estimator; the estimator is written back into that
    checkpoint. Returns the stage's history: per-epoch records, slices per epoch, CPU and wall minutes."""
    estimator = model.estimator
    assert estimator is not None  # stage 2 runs only for a network with a dose estimator
    best_path = out / "checkpoint_best.pt"
    best_state = load_checkpoint(best_path, map_location=device)
    model.network.load_state_dict(best_state["network"])  # the exported denoiser, for val_psnr_abdomen_auto
    if best_state.get("dose_estimator") is not None:
        estimator.load_state_dict(best_state["dose_estimator"])
    optimiser = torch.optim.AdamW(
        estimator.parameters(), lr=config.optim.estimator_learning_rate, weight_decay=config.optim.weight_decay
    )
    objective = DoseEstimatorObjective(
        model,
        sampler,
        validation,
        config.optim.estimator_batch_size,
        normalisation,
        device,
        config.optim.estimator_normal_fraction,
    )
    epochs = config.optim.estimator_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(epochs * objective.steps_per_epoch))
    records: list[dict] = []
    trainer = Trainer(
        objective,
        optimiser,
        scheduler,
        parameters=estimator.parameters(),
        clip_grad_norm=1.0,
        hooks=[LogEpochs(records, log, "dose estimator ")],
        progress=progress,
    )
    trainer.fit(0, epochs)
    best_state["dose_estimator"] = estimator.state_dict()
    atomic_save(best_state, best_path)
    cpu_minutes, wall_minutes = trainer.budget.minutes()
    return {
        "epochs": records,
        "slices_per_epoch": objective.slices_per_epoch,
        "cpu_minutes": cpu_minutes,
        "wall_minutes": wall_minutes,
    }
