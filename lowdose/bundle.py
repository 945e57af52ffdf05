"""Trained denoising models as MONAI bundles: save, find by name, load once.

A bundle folder holds ``configs/metadata.json`` (network, normalisation, training data and doses,
validation figures), ``configs/inference.json`` (how to build the network), ``models/model.pt``
(weights of the denoiser and, for dose-aware models, of its dose estimator) and ``docs/README.md``.
The network's normalisation lives here, so every caller speaks Hounsfield units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import numpy as np

# numpy.core's scalar, without numpy 2's deprecation warning (numpy's stubs do not declare this private function)
from numpy._core.multiarray import scalar  # type: ignore[attr-defined]

from .atomic import atomic_output, write_text_atomically
from .bundle_configs import inference_config, monai_metadata
from .errors import LowdoseError
from .resources import shipped_path

if TYPE_CHECKING:
    import torch

    from .networks.anatomy_encoder import AnatomyUNet
    from .networks.da_clip import DoseAnatomyEncoder
    from .networks.dose_estimator import DoseEstimator

# The shipped models: the wheel's copy when lowdose is installed, else the checkout's models/.
MODELS_DIR = shipped_path("models")
# Folders of bundles to use instead of the shipped ones (several separated by os.pathsep).
MODELS_ENV = "LOWDOSE_MODELS"
METADATA = "configs/metadata.json"  # in a bundle folder
DEFAULT_MODEL = "dose_unet"
# HU clipped to this range and divided by the scale: water 0, air -1.024, dense bone ~3.
DEFAULT_NORMALISATION = {"hu_min": -1024.0, "hu_max": 3071.0, "scale_hu": 1000.0}


@overload
def hu_to_input(hu: np.ndarray, normalisation: dict) -> np.ndarray: ...
@overload
def hu_to_input(hu: torch.Tensor, normalisation: dict) -> torch.Tensor: ...
def hu_to_input(hu, normalisation: dict) -> np.ndarray | torch.Tensor:
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
    network: torch.nn.Module
    dose_estimator: DoseEstimator | None
    normalisation: dict
    in_channels: int
    dose_conditioning: bool
    metadata: dict
    path: Path | None = None
    version: str = "unknown"  # the bundle's version and its weights' SHA-256, named in what it denoises
    weights_sha256: str = ""
    # BioAtt models: the anatomy encoder whose organ presence steers the attention, and its normalisation.
    anatomy_encoder: AnatomyUNet | None = None
    anatomy_normalisation: dict | None = None
    # Region-conditioned DA-Diff models: the DA-CLIP encoder whose region probabilities condition the network.
    region_encoder: DoseAnatomyEncoder | None = None
    region_normalisation: dict | None = None

    def to(self, device) -> DenoisingModel:
        for module in (self.network, self.dose_estimator, self.anatomy_encoder, self.region_encoder):
            if module is not None:
                module.to(device)
        return self

    @property
    def dose_estimator_in_plane(self) -> bool:
        """True when the dose estimator reads each slice alone (not the differences of neighbouring slices)."""
        return self.dose_estimator is not None and self.dose_estimator.in_channels == 1

    def organ_probabilities(self, hu) -> torch.Tensor | None:
        """BioAtt's prior for centre slices ``[B, 1, H, W]`` in HU (None for models without BioAtt)."""
        if self.anatomy_encoder is None:
            return None
        assert self.anatomy_normalisation is not None  # a BioAtt bundle ships it with the encoder
        return self.anatomy_encoder.organ_presence(hu_to_input(hu, self.anatomy_normalisation))

    def region_probabilities(self, hu) -> torch.Tensor | None:
        """DA-Diff's region vector for centre slices ``[B, 1, H, W]`` in HU: the DA-CLIP encoder's softmax over
        the body regions (None for models without region conditioning)."""
        if self.region_encoder is None:
            return None
        assert self.region_normalisation is not None  # shipped with the encoder
        return self.region_encoder(hu_to_input(hu, self.region_normalisation)).region_logits.softmax(1)


def save_bundle(
    folder: str | Path,
    *,
    name: str,
    network_name: str,
    network_kwargs: dict,
    network_state: dict,
    estimator_kwargs: dict | None = None,
    estimator_state: dict | None = None,
    normalisation: dict | None = None,
    metadata: dict | None = None,
    readme: str = "",
    anatomy_encoder: dict | None = None,
    region_encoder: dict | None = None,
) -> Path:
    """Write a MONAI bundle folder for a trained model (weights first to a temp file, then renamed)."""
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
    if region_encoder is not None:
        state["region_encoder"] = region_encoder["state"]
    atomic_torch_save(state, folder / "models" / "model.pt")
    meta = {
        "name": name,
        "task": "Low-dose CT denoising (image to image, Hounsfield units in and out)",
        "network": {"name": network_name, "kwargs": network_kwargs},
        "dose_estimator": None if estimator_state is None else {"name": "dose_estimator", "kwargs": estimator_kwargs},
        "anatomy_encoder": None
        if anatomy_encoder is None
        else {"name": "anatomy_encoder", **{k: v for k, v in anatomy_encoder.items() if k != "state"}},
        "region_encoder": None
        if region_encoder is None
        else {"name": "da_clip", **{k: v for k, v in region_encoder.items() if k != "state"}},
        "normalisation": normalisation,
    }
    meta.update(metadata or {})
    # MONAI's fields (versions, schema, description, network_data_format, ...) and an inference.json that
    # `python -m monai.bundle run` runs through lowdose's engine.
    meta = monai_metadata(meta)
    write_text_atomically(folder / "configs" / "metadata.json", json.dumps(meta, indent=2, default=_json_default))
    write_text_atomically(folder / "configs" / "inference.json", json.dumps(inference_config(meta), indent=2))
    if readme:
        write_text_atomically(folder / "docs" / "README.md", readme)
    return folder


def models_dirs() -> list[Path]:
    """The folders where models are found by name: those in ``$LOWDOSE_MODELS`` (os.pathsep-separated), in order,
    else the shipped models (``MODELS_DIR``)."""
    value = os.environ.get(MODELS_ENV, "")
    if not value.strip():
        return [MODELS_DIR]
    folders = [Path(item).expanduser() for item in value.split(os.pathsep) if item.strip()]
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise LowdoseError(
            f"${MODELS_ENV}: no such folder: {', '.join(missing)} (a folder of model bundles, or "
            f"several separated by {os.pathsep!r})"
        )
    return folders


def find_bundle(model: str | Path) -> Path:
    """A bundle folder from a model name (a folder in ``models_dirs()``, the first that has it) or a path."""
    path = Path(model)
    candidates = [path] if path.is_dir() else []
    candidates += [folder / str(model) for folder in models_dirs()]
    for candidate in candidates:
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate
    available = ", ".join(available_models()) or "none"
    where = " or ".join(str(folder) for folder in models_dirs())
    raise LowdoseError(f"{model}: no such model (a bundle in {where}, or a bundle folder); available: {available}")


def bundle_kind(folder: Path) -> str:
    """``denoiser`` or ``anatomy_encoder`` (metadata's ``lowdose_kind``; bundles without it are denoisers), or
    ``damaged`` when its metadata cannot be read, names no network, or its weights file is missing."""
    try:
        return Bundle.read(folder).kind
    except LowdoseError:
        return "damaged"


def available_models(kind: str = "denoiser") -> list[str]:
    """Names of the bundles in ``models_dirs()`` of one kind (denoisers by default); a name in two folders is
    the first folder's, as ``find_bundle`` finds it."""
    found: dict[str, Path] = {}
    for folder in models_dirs():
        if folder.is_dir():
            for bundle in sorted(folder.iterdir()):
                if (bundle / "configs" / "metadata.json").is_file():
                    found.setdefault(bundle.name, bundle)
    return sorted(name for name, bundle in found.items() if bundle_kind(bundle) == kind)


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What a bundle's ``configs/metadata.json`` says, read once (the one reader of it), and where the bundle is.

    ``Bundle.find(model)`` looks a model up by name or folder (``find_bundle``); ``Bundle.read(folder)`` reads a
    folder. Both raise ``LowdoseError`` for metadata that cannot be read or names no network. Loading the
    networks is ``load_bundle``'s.

        >>> Bundle.find("dose_unet").network_name
        'dose_unet'
    """

    folder: Path
    metadata: dict

    @classmethod
    def read(cls, folder: str | Path) -> Bundle:
        """The bundle in ``folder``; ``LowdoseError`` when its metadata is unreadable or names no network."""
        folder = Path(folder)
        try:
            metadata = json.loads((folder / METADATA).read_text())
        except (OSError, ValueError) as exc:
            raise LowdoseError(f"{folder}: damaged model bundle ({str(exc).splitlines()[0]})") from None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("network"), dict):
            raise LowdoseError(f"{folder}: damaged model bundle ({METADATA} names no network)")
        return cls(folder=folder, metadata=metadata)

    @classmethod
    def find(cls, model: str | Path) -> Bundle:
        """The bundle of a model name (under ``models/``) or folder, as ``find_bundle`` finds it."""
        return cls.read(find_bundle(model))

    @classmethod
    def all_in(cls, folder: str | Path, kind: str = "denoiser") -> dict[str, Bundle]:
        """The bundles of one ``kind`` in ``folder`` (one folder, e.g. a server's models folder), by folder name."""
        folder = Path(folder)
        found = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (path / METADATA).is_file() and bundle_kind(path) == kind:
                found[path.name] = cls.read(path)
        return found

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.folder.name))

    @property
    def version(self) -> str:
        """The model's version (metadata ``version``; its ``changelog`` says what each version changed)."""
        return str(self.metadata.get("version", "unknown"))

    def weights_sha256(self) -> str:
        """The SHA-256 of the weights file: which weights made a result, whatever the bundle is called."""
        digest = hashlib.sha256()
        with self.weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @property
    def weights(self) -> Path:
        """``models/model.pt``: the denoiser's weights and, when the model has them, its dose estimator's."""
        return self.folder / "models" / "model.pt"

    @property
    def kind(self) -> str:
        """``denoiser`` or ``anatomy_encoder`` (``lowdose_kind``; bundles without it are denoisers), or
        ``damaged`` when the weights file is missing."""
        if not self.weights.is_file():
            return "damaged"
        return str(self.metadata.get("lowdose_kind", "denoiser"))

    @property
    def network_name(self) -> str:
        return str(self.network["name"])

    @property
    def network(self) -> dict:
        """``{"name": ..., "kwargs": {...}}``: how ``lowdose.networks.build_network`` builds the network."""
        return self.metadata["network"]

    @property
    def network_kwargs(self) -> dict:
        return dict(self.network.get("kwargs", {}))

    @property
    def in_channels(self) -> int:
        return int(self.network_kwargs.get("in_channels", 1))

    @property
    def dose_conditioning(self) -> bool:
        """The network takes the dose fraction as an input."""
        return bool(self.network_kwargs.get("dose_conditioning", False))

    @property
    def dose_estimator(self) -> dict | None:
        """``{"name": "dose_estimator", "kwargs": {...}}`` for models that estimate the dose, else None."""
        return self.metadata.get("dose_estimator") or None

    @property
    def dose_estimator_kwargs(self) -> dict:
        return dict((self.dose_estimator or {}).get("kwargs", {}))

    @property
    def anatomy_encoder(self) -> dict | None:
        """BioAtt models: the anatomy encoder inside the bundle (name, kwargs, normalisation), else None."""
        return self.metadata.get("anatomy_encoder") or None

    @property
    def region_encoder(self) -> dict | None:
        """Region-conditioned DA-Diff models: the DA-CLIP encoder inside the bundle (name, kwargs, normalisation,
        source), else None."""
        return self.metadata.get("region_encoder") or None

    @property
    def normalisation(self) -> dict:
        """How HU become the network's input (``hu_to_input``) and its output HU (``output_to_hu``)."""
        return self.metadata.get("normalisation", DEFAULT_NORMALISATION)

    @property
    def validation(self) -> dict:
        """The validation figures of the shipped epoch (``val_psnr_abdomen``, ...)."""
        return self.metadata.get("validation") or {}

    @property
    def anatomy_aware_training(self) -> list[str]:
        """The anatomy-aware training options the model was trained with (``mac``, ``alden``, ...)."""
        return list((self.metadata.get("anatomy_aware_training") or {}).get("enabled", []))

    @property
    def groups(self) -> dict[int, str]:
        """Anatomy encoder bundles: label value -> anatomy group."""
        return {int(k): str(v) for k, v in (self.metadata.get("groups") or {}).items()}

    @property
    def created_by(self) -> str | None:
        """What made the bundle (``lowdose_created_by``, e.g. ``finetune``); None for shipped bundles."""
        value = self.metadata.get("lowdose_created_by")
        return None if value is None else str(value)

    def with_metadata(self, **changes: Any) -> Bundle:
        """The bundle with ``changes`` written into its metadata.json (atomically)."""
        metadata = {**self.metadata, **changes}
        write_text_atomically(self.folder / METADATA, json.dumps(metadata, indent=2, default=_json_default))
        return Bundle(folder=self.folder, metadata=metadata)


def load_bundle(model: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu") -> DenoisingModel:
    """Load a bundle's networks once, in eval mode, on ``device``."""
    bundle = Bundle.find(model)
    state = load_checkpoint(bundle.weights)
    if bundle.kind != "denoiser":
        raise LowdoseError(
            f"{bundle.folder}: an {bundle.kind.replace('_', ' ')} bundle, not a denoising model; "
            f"denoising models: {', '.join(available_models())}"
        )
    try:
        network = _built(bundle.network, state["network"])
        # The bundle's dose estimator and BioAtt's anatomy encoder are the registry's DoseEstimator and AnatomyUNet.
        estimator: DoseEstimator | None = None
        if bundle.dose_estimator and "dose_estimator" in state:
            estimator = cast("DoseEstimator", _built(bundle.dose_estimator, state["dose_estimator"]))
        anatomy: AnatomyUNet | None = None
        if bundle.anatomy_encoder:
            anatomy = cast("AnatomyUNet", _built(bundle.anatomy_encoder, state["anatomy_encoder"]))
        regions: DoseAnatomyEncoder | None = None
        if bundle.region_encoder:
            regions = cast("DoseAnatomyEncoder", _built(bundle.region_encoder, state["region_encoder"]))
    except (RuntimeError, TypeError, KeyError) as exc:
        raise LowdoseError(
            f"{bundle.folder}: the weights do not fit this version's {bundle.network_name} network "
            f"({str(exc).splitlines()[0]}); retrain or use a matching lowdose version"
        ) from None
    return DenoisingModel(
        name=bundle.name,
        network=network,
        dose_estimator=estimator,
        normalisation=bundle.normalisation,
        in_channels=bundle.in_channels,
        dose_conditioning=bundle.dose_conditioning,
        metadata=bundle.metadata,
        path=bundle.folder,
        version=bundle.version,
        weights_sha256=bundle.weights_sha256(),
        anatomy_encoder=anatomy,
        anatomy_normalisation=(bundle.anatomy_encoder or {}).get("normalisation"),
        region_encoder=regions,
        region_normalisation=(bundle.region_encoder or {}).get("normalisation"),
    ).to(device)


def _built(spec: dict, state: dict) -> torch.nn.Module:
    """The network ``spec`` names (``{"name", "kwargs"}``) with the weights ``state``, in eval mode."""
    from .networks import build_network  # the networks import torch (4 s): the CLI reads bundles for --help

    network = build_network(spec["name"], **spec.get("kwargs", {}))
    network.load_state_dict(state)
    return network.eval()


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "unknown"


def _json_default(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", safe_globals: Iterable[Any] = ()
) -> Any:
    """The contents of a checkpoint file, unpickled by torch's ``weights_only`` loader.

    Only tensors, numbers, strings, lists, tuples and dicts (and the ``safe_globals`` a caller allows for a
    known format) are built, so a crafted file cannot run code when it is read. A file that needs anything
    else, or is not a checkpoint at all, raises ``LowdoseError`` naming it.
    """
    import torch  # 4 s to import: the CLI imports this module for --help

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(exc))
        if unsafe:
            raise LowdoseError(
                f"{path}: refused: the checkpoint holds {unsafe.group(1)}, which only arbitrary "
                "unpickling (code execution) could build; lowdose loads checkpoints of tensors, "
                "numbers, strings, lists and dicts only. Was it made by this program?"
            ) from None
        raise LowdoseError(f"{path}: not a readable checkpoint ({_last_line(exc)})") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise LowdoseError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {_last_line(exc)})") from None


def nnunet_checkpoint_globals() -> list:
    """What an nnU-Net v2 checkpoint holds besides tensors and plain types, allowed and nothing more: numpy
    scalars (its training log and ``_best_ema`` are numpy float64) with their dtypes, under the names numpy 1
    and numpy 2 pickle them by. Its trainer arguments hold a ``torch.device``, which torch allows already."""
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
    import torch  # 4 s to import: the CLI imports this module for --help

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
        converted: Any = {plain(k): plain(v) for k, v in value.items()}  # a state dict has a _metadata attribute
        if isinstance(value, OrderedDict):  # a state dict: keep its order and its module versions
            converted = OrderedDict(converted)
            if hasattr(value, "_metadata"):
                converted._metadata = plain(value._metadata)
        return converted
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value  # torch.device, torch.dtype, ...: torch's loader knows them; anything else fails the round trip


def atomic_torch_save(obj, path: Path) -> None:
    import torch  # 4 s to import: the CLI imports this module for --help

    with atomic_output(path) as tmp:
        torch.save(plain(obj), tmp)
