"""Trained denoising models as MONAI bundles: save, find by name, load once.

A bundle folder holds ``configs/metadata.json`` (network, normalisation, training data and doses,
validation figures), ``configs/inference.json`` (how to build the network), ``models/model.pt``
(weights of the denoiser and, for dose-aware models, of its dose estimator) and ``docs/README.md``.
The network's normalisation lives here, so every caller speaks Hounsfield units.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_output, write_text_atomically
from .errors import LowdoseError

if TYPE_CHECKING:
    import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "dose_unet"
# HU clipped to this range and divided by the scale: water 0, air -1.024, dense bone ~3.
DEFAULT_NORMALISATION = {"hu_min": -1024.0, "hu_max": 3071.0, "scale_hu": 1000.0}


def hu_to_input(hu, normalisation: dict) -> "np.ndarray | torch.Tensor":
    """HU -> network input (clipped and scaled)."""
    lo, hi, scale = normalisation["hu_min"], normalisation["hu_max"], normalisation["scale_hu"]
    if not isinstance(hu, np.ndarray):  # a torch tensor
        return hu.clamp(lo, hi) / scale
    return np.clip(hu, lo, hi).astype(np.float32) / np.float32(scale)


def output_to_hu(y, normalisation: dict):
    """Network output -> HU."""
    return y * normalisation["scale_hu"]


@dataclasses.dataclass
class DenoisingModel:
    """A loaded bundle: the denoiser, its optional dose estimator, and what they expect."""

    name: str
    network: "torch.nn.Module"
    dose_estimator: "torch.nn.Module | None"
    normalisation: dict
    in_channels: int
    dose_conditioning: bool
    metadata: dict
    path: Path | None = None
    # BioAtt models: the anatomy encoder whose organ presence steers the attention, and its normalisation.
    anatomy_encoder: "torch.nn.Module | None" = None
    anatomy_normalisation: dict | None = None

    def to(self, device) -> "DenoisingModel":
        for module in (self.network, self.dose_estimator, self.anatomy_encoder):
            if module is not None:
                module.to(device)
        return self

    def organ_probabilities(self, hu) -> "torch.Tensor | None":
        """BioAtt's prior for centre slices ``[B, 1, H, W]`` in HU (None for models without BioAtt)."""
        if self.anatomy_encoder is None:
            return None
        return self.anatomy_encoder.organ_presence(hu_to_input(hu, self.anatomy_normalisation))


def save_bundle(folder: str | Path, *, name: str, network_name: str, network_kwargs: dict,
                network_state: dict, estimator_kwargs: dict | None = None, estimator_state: dict | None = None,
                normalisation: dict | None = None, metadata: dict | None = None, readme: str = "",
                anatomy_encoder: dict | None = None) -> Path:
    """Write a MONAI bundle folder for a trained model (weights first to a temp file, then renamed)."""
    import torch

    folder = Path(folder)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "docs").mkdir(exist_ok=True)
    normalisation = dict(normalisation or DEFAULT_NORMALISATION)
    state = {"network": network_state}
    if estimator_state is not None:
        state["dose_estimator"] = estimator_state
    if anatomy_encoder is not None:
        state["anatomy_encoder"] = anatomy_encoder["state"]
    _atomic_torch_save(state, folder / "models" / "model.pt")
    meta = {
        "version": "0.1.0",
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": name,
        "task": "Low-dose CT denoising (image to image, Hounsfield units in and out)",
        "authors": "lowdose",
        "network": {"name": network_name, "kwargs": network_kwargs},
        "dose_estimator": None if estimator_state is None else {"name": "dose_estimator", "kwargs": estimator_kwargs},
        "anatomy_encoder": None if anatomy_encoder is None else {
            "name": "anatomy_encoder", **{k: v for k, v in anatomy_encoder.items() if k != "state"}},
        "normalisation": normalisation,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                 "num_channels": network_kwargs.get("in_channels", 1),
                                 "spatial_shape": ["*", "*"], "dtype": "float32",
                                 "value_range": [normalisation["hu_min"], normalisation["hu_max"]],
                                 "channel_def": {"0": "slices z-1, z, z+1 (2.5-D)" if network_kwargs.get("in_channels", 1) == 3 else "slice z"}}},
            "outputs": {"pred": {"type": "image", "format": "hounsfield", "num_channels": 1,
                                 "spatial_shape": ["*", "*"], "dtype": "float32"}},
        },
    }
    meta.update(metadata or {})
    write_text_atomically(folder / "configs" / "metadata.json", json.dumps(meta, indent=2, default=_json_default))
    inference = {
        "imports": ["$import lowdose.networks"],
        "network_def": {"_target_": "$lowdose.networks.build_network", "name": network_name, **network_kwargs},
        "note": "Use lowdose.denoise (or `lowdose denoise`), which applies the normalisation in metadata.json "
                "slice by slab; this file records how the network is built.",
    }
    write_text_atomically(folder / "configs" / "inference.json", json.dumps(inference, indent=2))
    if readme:
        write_text_atomically(folder / "docs" / "README.md", readme)
    return folder


def find_bundle(model: str | Path) -> Path:
    """A bundle folder from a model name (a folder under ``models/``) or a path."""
    path = Path(model)
    candidates = [path] if path.is_dir() else []
    candidates.append(MODELS_DIR / str(model))
    for candidate in candidates:
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate
    available = ", ".join(available_models()) or "none"
    raise LowdoseError(f"{model}: no such model (a name under models/ or a bundle folder); available: {available}")


def bundle_kind(folder: Path) -> str:
    """``denoiser`` or ``anatomy_encoder`` (metadata's ``lowdose_kind``; bundles without it are denoisers), or
    ``damaged`` when its metadata cannot be read, names no network, or its weights file is missing."""
    try:
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return "damaged"
    if not isinstance(meta, dict) or "network" not in meta or not (folder / "models" / "model.pt").is_file():
        return "damaged"
    return str(meta.get("lowdose_kind", "denoiser"))


def available_models(kind: str = "denoiser") -> list[str]:
    """Names of the bundles under ``models/`` of one kind (denoisers by default)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir()
                  if (p / "configs" / "metadata.json").is_file() and bundle_kind(p) == kind)


def load_bundle(model: str | Path = DEFAULT_MODEL, device: "str | torch.device" = "cpu") -> DenoisingModel:
    """Load a bundle's networks once, in eval mode, on ``device``."""
    from .networks import build_network

    folder = find_bundle(model)
    try:
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise LowdoseError(f"{folder}: damaged model bundle ({str(exc).splitlines()[0]})") from None
    state = load_checkpoint(folder / "models" / "model.pt")
    if meta.get("lowdose_kind", "denoiser") != "denoiser":
        raise LowdoseError(f"{folder}: an {meta['lowdose_kind'].replace('_', ' ')} bundle, not a denoising model; "
                           f"denoising models: {', '.join(available_models())}")
    kwargs = meta["network"]["kwargs"]
    try:
        network = build_network(meta["network"]["name"], **kwargs)
        network.load_state_dict(state["network"])
        estimator = None
        if meta.get("dose_estimator") and "dose_estimator" in state:
            estimator = build_network("dose_estimator", **meta["dose_estimator"]["kwargs"])
            estimator.load_state_dict(state["dose_estimator"])
            estimator.eval()
        anatomy = None
        if meta.get("anatomy_encoder"):
            anatomy = build_network("anatomy_encoder", **meta["anatomy_encoder"]["kwargs"])
            anatomy.load_state_dict(state["anatomy_encoder"])
            anatomy.eval()
    except (RuntimeError, TypeError, KeyError) as exc:
        raise LowdoseError(f"{folder}: the weights do not fit this version's {meta['network']['name']} network "
                           f"({str(exc).splitlines()[0]}); retrain or use a matching lowdose version") from None
    network.eval()
    return DenoisingModel(
        name=meta.get("name", folder.name), network=network, dose_estimator=estimator,
        normalisation=meta.get("normalisation", DEFAULT_NORMALISATION),
        in_channels=int(kwargs.get("in_channels", 1)), dose_conditioning=bool(kwargs.get("dose_conditioning", False)),
        metadata=meta, path=folder, anatomy_encoder=anatomy,
        anatomy_normalisation=(meta.get("anatomy_encoder") or {}).get("normalisation"),
    ).to(device)


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "unknown"


def _json_default(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def load_checkpoint(path: str | Path, map_location: "str | torch.device" = "cpu", safe_globals: tuple = ()) -> Any:
    """The contents of a checkpoint file, unpickled by torch's ``weights_only`` loader.

    Only tensors, numbers, strings, lists, tuples and dicts (and the ``safe_globals`` a caller allows for a
    known format) are built, so a crafted file cannot run code when it is read. A file that needs anything
    else, or is not a checkpoint at all, raises ``LowdoseError`` naming it.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(exc))
        if unsafe:
            raise LowdoseError(f"{path}: refused: the checkpoint holds {unsafe.group(1)}, which only arbitrary "
                               "unpickling (code execution) could build; lowdose loads checkpoints of tensors, "
                               "numbers, strings, lists and dicts only. Was it made by this program?") from None
        raise LowdoseError(f"{path}: not a readable checkpoint ({_last_line(exc)})") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise LowdoseError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {_last_line(exc)})") from None


def nnunet_checkpoint_globals() -> list:
    """What an nnU-Net v2 checkpoint holds besides tensors and plain types, allowed and nothing more: numpy
    scalars (its training log and ``_best_ema`` are numpy float64) with their dtypes, under the names numpy 1
    and numpy 2 pickle them by. Its trainer arguments hold a ``torch.device``, which torch allows already."""
    import numpy as np
    from numpy._core.multiarray import scalar  # numpy.core's scalar, without numpy 2's deprecation warning

    dtypes = [type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def _last_line(exc: BaseException) -> str:
    """The informative line of torch's several-line load errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return detail.replace("WeightsUnpickler error: ", "") or type(exc).__name__


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths, sets and dataclasses turned into the plain types
    (numbers, strings, lists, dicts, tensors) that ``load_checkpoint`` reads back."""
    import torch

    if isinstance(value, np.generic):  # before float: numpy.float64 is a float, but pickles as a numpy global
        return value.item()
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        converted = {plain(k): plain(v) for k, v in value.items()}
        if isinstance(value, OrderedDict):  # a state dict: keep its order and its module versions
            converted = OrderedDict(converted)
            if hasattr(value, "_metadata"):
                converted._metadata = plain(value._metadata)
        return converted
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value  # torch.device, torch.dtype, ...: torch's loader knows them; anything else fails the round trip


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(plain(obj), tmp)
