"""Fine-tuning a shipped model on a user's normal-dose CT: the request's settings, checked (types, bounds, a safe
new output model), and the training config they make (``finetune_config``).

A request may not overwrite a shipped model, nor any model that fine-tuning did not make; it may overwrite
one fine-tuning made only when it says ``overwrite``. Bundles that fine-tuning writes carry
``metadata["lowdose_created_by"] == "finetune"``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..bundle import Bundle
from ..errors import LowdoseError
from ..names import is_safe_name
from .config import TrainConfig

FINETUNE_MARK = "finetune"


class FineTuneRequestError(LowdoseError):
    """A fine-tuning request that cannot run; ``conflict`` when it names a model that must not be written."""

    def __init__(self, problem: str, conflict: bool = False):
        super().__init__(problem)
        self.conflict = conflict


@dataclasses.dataclass(frozen=True)
class Bound:
    """One setting's type and range."""

    kind: type
    low: float
    high: float


BOUNDS = {
    "epochs": Bound(int, 1, 200),
    "slices_per_epoch": Bound(int, 1, 10000),
    "patches_per_slice": Bound(int, 1, 64),
    "patch_size": Bound(int, 32, 512),
    "batch_size": Bound(int, 1, 128),
    "learning_rate": Bound(float, 1e-7, 1e-2),
    "seed": Bound(int, 0, 2**31 - 1),
}


def checked_finetune_request(body, models_dir: Path, source_model: str) -> dict:
    """The request's settings when all are valid (with ``output_model`` and ``overwrite``); FineTuneRequestError."""
    if not isinstance(body, dict):
        raise FineTuneRequestError("the request must be a JSON object of training settings")
    unknown = sorted(set(body) - set(BOUNDS) - {"output_model", "overwrite"})
    if unknown:
        raise FineTuneRequestError(
            f"unknown setting(s): {', '.join(str(u)[:40] for u in unknown)}; known: "
            f"{', '.join([*BOUNDS, 'output_model', 'overwrite'])}"
        )
    settings = {name: _checked_number(name, body[name], bound) for name, bound in BOUNDS.items() if name in body}
    if settings.get("patch_size", 16) % 16:
        raise FineTuneRequestError(f"patch_size {settings['patch_size']}: must be a multiple of 16")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise FineTuneRequestError("overwrite must be true or false")
    output = body.get("output_model", f"{source_model}_finetuned")
    if not is_safe_name(output):
        raise FineTuneRequestError(
            f"output_model {str(output)[:80]!r} is not a valid name (letters, digits, '.', "
            "'_' and '-' only, at most 128, no '..')"
        )
    if output == source_model:
        raise FineTuneRequestError(f"output_model {output!r} is the source model; give a new model name", True)
    existing = Path(models_dir) / output
    if existing.exists() or existing.is_symlink():
        if not overwrite:
            raise FineTuneRequestError(
                f"a model named {output!r} exists; give a new output_model (or overwrite: "
                "true for a model that fine-tuning made)",
                True,
            )
        if existing.is_symlink() or created_by(existing) != FINETUNE_MARK:
            raise FineTuneRequestError(
                f"model {output!r} was not made by fine-tuning (it may be a shipped model) "
                "and is never overwritten; give a new output_model",
                True,
            )
    return {**settings, "output_model": output, "overwrite": overwrite}


def created_by(bundle: Path) -> str | None:
    """What made a bundle (metadata's ``lowdose_created_by``); None for shipped or unreadable ones."""
    try:
        return Bundle.read(bundle).created_by
    except LowdoseError:
        return None


# What a fine-tuning request may leave out.
DEFAULT_SETTINGS = {
    "epochs": 2,
    "slices_per_epoch": 16,
    "patches_per_slice": 4,
    "patch_size": 96,
    "batch_size": 8,
    "learning_rate": 1e-4,
    "seed": 0,
}


def finetune_config(
    bundle: Bundle, images: list[str], settings: dict, output_dir: str | Path, device: str = "auto"
) -> TrainConfig:
    """The training config that fine-tunes ``bundle`` on the normal-dose CT ``images`` (low dose simulated on the
    fly), with a request's checked ``settings`` (``checked_finetune_request``; ``DEFAULT_SETTINGS`` for the rest);
    the run goes to ``output_dir``, the model is named ``settings["output_model"]``."""
    settings = {**DEFAULT_SETTINGS, **settings}
    estimator = bundle.dose_estimator
    return TrainConfig.from_dict(
        {
            "name": settings["output_model"],
            "version": f"{bundle.version}+finetuned",  # a site's model says which version it grew from
            "output_dir": str(output_dir),
            "seed": int(settings["seed"]),
            "device": device,
            "init_bundle": str(bundle.folder),
            "data": {
                "mode": "simulated",
                "train": [str(i) for i in images],
                "validation": [],
                "patch_size": int(settings["patch_size"]),
                "patches_per_slice": int(settings["patches_per_slice"]),
                "slices_per_epoch": int(settings["slices_per_epoch"]),
            },
            "network": {
                "name": bundle.network_name,
                "kwargs": bundle.network["kwargs"],
                "dose_estimator": estimator is not None,
                "dose_estimator_kwargs": bundle.dose_estimator_kwargs,
            },
            "optim": {
                "epochs": int(settings["epochs"]),
                "batch_size": int(settings["batch_size"]),
                "learning_rate": float(settings["learning_rate"]),
            },
        },
        source="finetune request",
    )


def _checked_number(name: str, value, bound: Bound):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FineTuneRequestError(f"{name} must be a number; got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FineTuneRequestError(f"{name} must be finite")
    if bound.kind is int and isinstance(value, float) and not value.is_integer():
        raise FineTuneRequestError(f"{name} must be a whole number; got {value}")
    if not bound.low <= value <= bound.high:
        raise FineTuneRequestError(f"{name} {value} is out of range [{bound.low:g}, {bound.high:g}]")
    return bound.kind(value)
