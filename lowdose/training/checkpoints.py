"""A denoising run's checkpoints and history: ``checkpoint_last.pt`` to resume, ``checkpoint_best.pt`` to ship
(the best validation PSNR, or the last epoch), ``history.json``; and resuming from them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..bundle import atomic_torch_save as atomic_save
from ..bundle import load_checkpoint
from ..errors import LowdoseError
from .config import TrainConfig
from .denoising import DenoisingNetworks
from .engine import EpochRecord, Hook, describe

log = logging.getLogger("lowdose.train")


def new_history(config: TrainConfig) -> dict:
    """An empty run history: per-epoch records, the config, the commands that ran it, torch's thread count."""
    return {"epochs": [], "config": config.to_dict(), "commands": [], "threads": torch.get_num_threads()}


def write_history(history: dict, out: Path) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=2))


class RunCheckpoints(Hook):
    """After each epoch: the record into the history, the last checkpoint (everything a resume needs), the
    shipped checkpoint when the epoch is selected, a log line, history.json. ``anatomy`` (the anatomy-aware
    terms, or None) adds its trainable state and what the bundle needs (BioAtt's encoder)."""

    def __init__(
        self,
        out: Path,
        config: TrainConfig,
        model: DenoisingNetworks,
        optimiser,
        scheduler,
        history: dict,
        anatomy=None,
    ):
        self.out, self.config, self.model, self.anatomy = out, config, model, anatomy
        self.optimiser, self.scheduler, self.history = optimiser, scheduler, history
        self.best = -float("inf")
        self.first_epoch = 0
        self.started = time.time()

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoint_last.pt"

    def resume(self, device) -> int:
        """Load the last checkpoint (weights, optimiser, schedule, history, torch's generator); the next epoch."""
        if not self.last_path.is_file():
            raise LowdoseError(f"{self.last_path}: no checkpoint to resume from")
        state = load_checkpoint(self.last_path, map_location=device)
        self.model.network.load_state_dict(state["network"])
        if self.model.estimator is not None and state.get("dose_estimator") is not None:
            self.model.estimator.load_state_dict(state["dose_estimator"])
        if self.anatomy is not None and state.get("anatomy") is not None:
            self.anatomy.load_trainable_state(state["anatomy"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.first_epoch, self.best, self.history = state["epoch"] + 1, state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        return self.first_epoch

    def after_epoch(self, record: EpochRecord) -> None:
        row = record.as_dict()
        self.history["epochs"].append(row)
        loss = record.losses["loss"]
        assert loss is not None  # the denoising objective records its loss every epoch
        score = record.figures.get("val_psnr_abdomen", -loss)
        is_best = score > self.best or self.config.optim.selection == "last"
        self.best = max(self.best, score)
        state = {
            **self.model.state(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": record.epoch - 1,
            "best": self.best,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
            "anatomy": self.anatomy.trainable_state() if self.anatomy is not None else None,
        }
        atomic_save(state, self.last_path)
        if is_best:
            best_state = {k: state[k] for k in ("network", "dose_estimator", "epoch", "config")}
            best_state.update(self.anatomy.bundle_extras() if self.anatomy is not None else {})
            atomic_save(best_state, self.out / "checkpoint_best.pt")
        elapsed = time.time() - self.started
        remaining = elapsed / (record.epoch - self.first_epoch) * (self.config.optim.epochs - record.epoch)
        log.info("%s (eta %.0f min)%s", describe(row), remaining / 60, " *best*" if is_best else "")
        write_history(self.history, self.out)
