"""Loaded models, once per process (and again only when a bundle's weights change on disk)."""

from __future__ import annotations

import threading
from pathlib import Path

from lowdose.denoise import Denoiser

_LOCK = threading.Lock()
_DENOISERS: dict[tuple, tuple[float, Denoiser]] = {}


def denoiser(bundle: Path, device: str, batch_size: int) -> Denoiser:
    weights = Path(bundle) / "models" / "model.pt"
    key = (str(Path(bundle).resolve()), device, batch_size)
    stamp = weights.stat().st_mtime if weights.exists() else 0.0
    with _LOCK:
        cached = _DENOISERS.get(key)
        if cached is None or cached[0] != stamp:
            _DENOISERS[key] = (stamp, Denoiser(str(key[0]), device=device, batch_size=batch_size))
        return _DENOISERS[key][1]
