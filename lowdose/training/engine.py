"""The training engine: the one loop of optimiser steps that every lowdose training runs in.

What is learnt plugs in as an ``Objective`` (its batches, its loss, its validation figures, its epoch record);
what happens around the steps plugs in as ``Hook``s (after each optimiser step: an EMA target, a
discriminator's own step; after each epoch: checkpoints, history, log lines). Denoisers (pixel loss plus
anatomy-aware terms), the dose estimator's second stage and the anatomy encoder's segmentation all train here.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators, for a run that repeats bit for bit on a CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Learning-rate factor of a step: linear warm-up, then a cosine from 1 down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor  # a plain function: LambdaLR then keeps none of it in its state_dict


@dataclasses.dataclass
class StepLoss:
    """One batch's loss: ``total`` is minimised; ``figures`` (scalars by history name, e.g. ``loss``,
    ``dose_loss``, ``mac_loss``) are averaged into the epoch record; ``outputs`` are for hooks (the prediction)."""

    total: torch.Tensor
    figures: Mapping[str, torch.Tensor | float]
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class LossMeter:
    """The per-step figures of one epoch by name, in the order first seen."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, figures: Mapping[str, torch.Tensor | float]) -> None:
        for name, value in figures.items():
            value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self.values.setdefault(name, []).append(value)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def mean(self, name: str) -> float:
        return float(np.mean(self.values.get(name, [])))

    def recent_mean(self, name: str, steps: int = 20) -> float:
        return float(np.mean(self.values.get(name, [])[-steps:]))


@dataclasses.dataclass
class EpochTiming:
    """How long an epoch took: making its batches (e.g. simulating), the whole epoch, and the run's budget so far."""

    prepare_seconds: float
    epoch_seconds: float
    cpu_minutes: float
    wall_minutes: float


@dataclasses.dataclass
class EpochRecord:
    """One epoch of a training history; ``as_dict`` is its entry in history.json (keys in this order)."""

    epoch: int  # 1-based
    losses: Mapping[str, float | None]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    cpu_minutes: float | None = None
    wall_minutes: float | None = None

    def as_dict(self) -> dict:
        record = {"epoch": self.epoch, **self.losses, **self.timings, **self.figures}
        if self.cpu_minutes is not None:
            record["cpu_minutes"] = self.cpu_minutes
        if self.wall_minutes is not None:
            record["wall_minutes"] = self.wall_minutes
        return record


def describe(record: dict) -> str:
    """A history record as one log line: ``key=value`` for its scalars."""
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in record.items()
        if v is not None and not isinstance(v, dict)
    )


@dataclasses.dataclass
class Progress:
    """What an epoch's progress bar shows."""

    description: str
    total: int
    unit: str = "step"


class Objective(abc.ABC):
    """What a training learns: its batches, the loss of a batch, its validation figures, its epoch record.

    A new kind of training (say a residual diffusion denoiser: noise a residual, predict it) is a new
    Objective; the engine, checkpoints and hooks stay as they are.
    """

    steps_per_epoch: int = 0

    @abc.abstractmethod
    def train_mode(self) -> None:
        """Put the trained modules in training mode (validation leaves them in eval mode)."""

    @abc.abstractmethod
    def batches(self, epoch: int) -> Iterable:
        """One epoch's batches. Work done before returning (e.g. simulating the epoch's pairs) is timed as
        ``prepare_seconds``; the batches themselves may be made lazily."""

    @abc.abstractmethod
    def loss(self, batch) -> StepLoss:
        """The loss of one batch (the forward pass)."""

    def validate(self) -> dict:
        """Validation figures after an epoch (``val_*``), empty without validation data."""
        return {}

    def progress(self, epoch: int, epochs: int) -> Progress:
        return Progress(f"epoch {epoch + 1}/{epochs}", self.steps_per_epoch)

    def progress_units(self, batch) -> int:
        """How far one batch moves the progress bar (1 step, or its number of slices)."""
        return 1

    def record(self, epoch: int, meter: LossMeter, figures: dict, timing: EpochTiming) -> EpochRecord:
        """The epoch's history record; by default every recorded loss's mean, the figures and the budget."""
        losses = {name: meter.mean(name) for name in meter.values}
        return EpochRecord(epoch + 1, losses, {}, figures, timing.cpu_minutes, timing.wall_minutes)


class Hook:
    """Called by the trainer after every optimiser step and after every epoch; override what you need."""

    def after_step(self, step: StepLoss) -> dict[str, float]:
        """Runs after the optimiser and scheduler step; returns figures to record (e.g. a discriminator's loss)."""
        return {}

    def after_epoch(self, record: EpochRecord) -> None:
        """Runs after validation with the epoch's record (checkpoints, history, log)."""


class Budget:
    """CPU and wall time of a run, counting what earlier sessions of it (before a resume) spent."""

    def __init__(self, cpu_minutes_before: float = 0.0, wall_minutes_before: float = 0.0):
        self.cpu_before, self.wall_before = cpu_minutes_before, wall_minutes_before
        self.started, self.cpu_started = time.time(), time.process_time()

    def minutes(self) -> tuple[float, float]:
        """(CPU minutes, wall minutes) so far, rounded to 0.01 as the history keeps them."""
        return (
            round(self.cpu_before + (time.process_time() - self.cpu_started) / 60, 2),
            round(self.wall_before + (time.time() - self.started) / 60, 2),
        )


class Trainer:
    """Runs epochs of an objective: forward, backward, gradient clipping, optimiser and scheduler steps,
    hooks after each step; validation, the epoch record and hooks after each epoch."""

    def __init__(
        self,
        objective: Objective,
        optimiser: torch.optim.Optimizer,
        scheduler,
        *,
        parameters: Iterable[torch.nn.Parameter] = (),
        clip_grad_norm: float | None = None,
        hooks: Sequence[Hook] = (),
        progress: bool = True,
        show_loss: bool = False,
    ):
        self.objective, self.optimiser, self.scheduler = objective, optimiser, scheduler
        self.parameters, self.clip_grad_norm = list(parameters), clip_grad_norm
        self.hooks, self.progress, self.show_loss = list(hooks), progress, show_loss
        self.budget = Budget()

    def fit(self, first_epoch: int, epochs: int, budget: Budget | None = None) -> list[EpochRecord]:
        """Epochs ``first_epoch`` .. ``epochs - 1`` (0-based); ``budget`` carries a resumed run's time."""
        self.budget = budget or Budget()
        return [self.run_epoch(epoch, epochs) for epoch in range(first_epoch, epochs)]

    def run_epoch(self, epoch: int, epochs: int) -> EpochRecord:
        self.objective.train_mode()
        started = time.time()
        batches = self.objective.batches(epoch)
        prepare_seconds = time.time() - started
        meter = LossMeter()
        shown = self.objective.progress(epoch, epochs)
        bar = tqdm(total=shown.total, desc=shown.description, unit=shown.unit, disable=not self.progress, leave=False)
        for batch in batches:
            self.step(batch, meter)
            bar.update(self.objective.progress_units(batch))
            if self.show_loss:
                bar.set_postfix(loss=f"{meter.recent_mean('loss'):.5f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        figures = self.objective.validate()
        timing = EpochTiming(prepare_seconds, time.time() - started, *self.budget.minutes())
        record = self.objective.record(epoch, meter, figures, timing)
        for hook in self.hooks:
            hook.after_epoch(record)
        return record

    def step(self, batch, meter: LossMeter) -> StepLoss:
        """One optimiser step on ``batch``; its figures (and the hooks') go into ``meter``."""
        step = self.objective.loss(batch)
        meter.add(step.figures)
        self.optimiser.zero_grad(set_to_none=True)
        step.total.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_grad_norm)
        self.optimiser.step()
        self.scheduler.step()
        for hook in self.hooks:
            meter.add(hook.after_step(step))
        return step


class LogEpochs(Hook):
    """Appends each epoch's record to a history list and logs it as one line."""

    def __init__(self, records: list, log, prefix: str = ""):
        self.records, self.log, self.prefix = records, log, prefix

    def after_epoch(self, record: EpochRecord) -> None:
        row = record.as_dict()
        self.records.append(row)
        self.log.info("%s%s", self.prefix, describe(row))
