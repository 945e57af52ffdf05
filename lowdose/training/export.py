"""A trained denoiser as a MONAI bundle: weights, metadata with the shipped epoch's figures, the model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..anatomy.dose_anatomy import DoseAnatomyReader
from ..anatomy.regions import REGIONS
from ..atomic import write_text_atomically
from ..bundle import Bundle, load_checkpoint, save_bundle
from ..errors import LowdoseError
from ..networks import build_network, count_gflops, count_parameters
from .config import TrainConfig
from .data import find_ct_inputs
from .denoising import forward_example
from .model_card import REPOSITORY, model_card, repository_relative


def export_bundle(checkpoint: str | Path, bundle_dir: str | Path, history: dict | None = None) -> Path:
    """Write the MONAI bundle of a training checkpoint (see lowdose.bundle) with its model card."""
    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    history = history or state.get("history") or {}
    folder = save_bundle(
        bundle_dir,
        name=Path(bundle_dir).name,
        network_name=config.network.name,
        network_kwargs=config.network.kwargs,
        network_state=state["network"],
        estimator_kwargs=config.network.dose_estimator_kwargs if state.get("dose_estimator") else None,
        estimator_state=state.get("dose_estimator"),
        metadata=_metadata(config, state, history),
        anatomy_encoder=state.get("anatomy_encoder"),
        region_encoder=_region_encoder(config),
    )
    network = build_network(config.network.name, **config.network.kwargs)
    gflops = count_gflops(network, **forward_example(config.network.kwargs))
    meta = Bundle.read(folder).metadata
    write_text_atomically(folder / "docs" / "history.json", repository_relative(json.dumps(history, indent=2)))
    write_text_atomically(folder / "docs" / "README.md", model_card(meta, history, count_parameters(network), gflops))
    return folder


def _region_encoder(config: TrainConfig) -> dict | None:
    """The DA-CLIP encoder a region-conditioned DA-Diff bundle ships (``diffusion.region_encoder``), as
    ``save_bundle`` takes it; None for models without region conditioning or without an encoder named."""
    if not config.network.kwargs.get("region_classes") or not config.diffusion.region_encoder:
        return None
    reader = DoseAnatomyReader(config.diffusion.region_encoder)  # refuses a bundle that is not a DA-CLIP one
    if list(reader.regions) != list(REGIONS):
        raise LowdoseError(f"{reader.bundle.folder}: its regions {list(reader.regions)} are not the network's")
    return {
        "kwargs": reader.bundle.network_kwargs,
        "normalisation": dict(reader.normalisation),
        "source": reader.bundle.folder.name,
        "state": reader.network.state_dict(),
    }


def _metadata(config: TrainConfig, state: dict, history: dict) -> dict:
    """The bundle metadata of a run: its data and doses, the shipped epoch and its validation figures."""
    exported = state.get("epoch", 0) + 1
    shipped: dict[str, Any] = next((r for r in history.get("epochs", []) if r.get("epoch") == exported), {})
    metadata: dict[str, Any] = {
        "version": config.version,
        "training": {
            "data_mode": config.data.mode,
            "train_series": [str(p) for entry in config.data.train for p in _relative_inputs(entry)],
            "validation_series": [str(p) for entry in config.data.validation for p in _relative_inputs(entry)],
            "doses": config.data.doses,
            "epochs": config.optim.epochs,
            "best_epoch": exported,
            "seed": config.seed,
        },
        "validation": {k: v for k, v in shipped.items() if k.startswith("val_")},
        "anatomy_aware_training": {"enabled": config.anatomy.enabled, **dataclasses.asdict(config.anatomy)},
    }
    stage = (history.get("estimator_stage") or {}).get("epochs")
    if stage:  # the shipped estimator is stage 2's: its figures replace stage 1's
        metadata["validation"].update({k: v for k, v in stage[-1].items() if k.startswith("val_")})
        metadata["training"]["dose_estimator_stage_epochs"] = len(stage)
    return metadata


def _relative_inputs(entry: str) -> list[str]:
    """Series names for the model card, relative to the shared data folder when under it."""
    try:
        inputs = find_ct_inputs(entry)
    except LowdoseError:
        return [entry]
    names = []
    for p in inputs:
        p = Path(p).resolve()
        parts = p.parts
        if p.is_relative_to(REPOSITORY):  # e.g. the bundled sample
            names.append(str(p.relative_to(REPOSITORY)))
        else:
            names.append("/".join(parts[parts.index("data") :]) if "data" in parts else p.name)
    return names
