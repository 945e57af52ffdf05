"""Anatomy encoders from other projects' networks: TotalSegmentator's nnU-Net and any timm backbone.

Both are loaded from files the user already has (nothing is downloaded) and plug into lowdose through
``AnatomyEncoder`` (see ``load_anatomy_encoder``): ``totalsegmentator[:fast|:full]`` and
``timm:<model name>:<checkpoint file>`` in a training config. Each takes CT slices in HU, applies the
normalisation its network was trained with, and returns that network's feature maps, fine to coarse, as
``[B, C, H, W]`` tensors. Weights are frozen; the maps stay differentiable with respect to the input HU.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..bundle import load_checkpoint, nnunet_checkpoint_globals
from ..errors import LowdoseError
from ..totalseg import check_model_folder, read_json_object, required_model_folders, totalsegmentator_weights_dir
from .base import AnatomyEncoder


def _check_hu(hu: torch.Tensor, name: str) -> None:
    if hu.dim() != 4 or hu.shape[1] != 1:
        raise LowdoseError(f"the {name} takes CT slices as a [B, 1, H, W] tensor in HU, got shape {tuple(hu.shape)}")


# ------------------------------------------------------------------------------------------ TotalSegmentator


class TotalSegmentatorEncoder(AnatomyEncoder):
    """The encoder half of the user's installed TotalSegmentator ``total`` nnU-Net, as an anatomy encoder.

    ``fast=True`` uses the 3 mm model (Dataset297); ``fast=False`` the first of the five 1.5 mm models
    (Dataset291, the organs). Weights are found where TotalSegmentator looks for them ($TOTALSEG_WEIGHTS_PATH,
    else $TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results) unless ``weights_dir``
    is given; missing weights raise ``TotalSegmentatorWeightsError`` saying how to install them.

    The network is built by nnU-Net's own code from the model's plans.json and dataset.json and gets the
    checkpoint's weights; only its encoder is kept. The network is 3-D: a slice goes in as a volume one
    voxel deep, oriented as TotalSegmentator hands volumes to nnU-Net (closest-canonical RAS), so slices
    are expected in the usual axial layout (rows anterior to posterior, columns patient right to left: a
    DICOM series with an identity direction, as lowdose reads it). Features are taken at the slice's own
    resolution, without resampling to the model's 3 mm / 1.5 mm voxels, and instance normalisation sees one
    slice instead of a 3-D patch: accepted approximations for a feature loss, which compares two images
    through the same encoder. H and W are padded (edge values repeated, bottom and right) to a multiple of
    the encoder's total in-plane stride, at least twice it; nothing is cropped, so maps of padded slices
    are slightly larger than ``H / stride``.
    """

    def __init__(self, fast: bool = True, weights_dir: str | Path | None = None):
        super().__init__()
        self.fast = bool(fast)
        if weights_dir is not None:
            self.weights_dir, self.weights_from = Path(weights_dir), "weights_dir"
        else:
            self.weights_dir, self.weights_from = totalsegmentator_weights_dir()
        # Full mode is five models, one per body part; one encoder is enough for features, and Dataset291
        # (the organs) is the first of them in TotalSegmentator's own table.
        self.model_folder = self._check_weights(required_model_folders(self.fast)[0])
        self.mode = "fast (3 mm)" if self.fast else "full (1.5 mm, organs model)"
        self.name = f"TotalSegmentator {self.mode} encoder"
        self._build()

    def _check_weights(self, relative: str) -> Path:
        return check_model_folder(self.weights_dir, relative, self.fast, self.weights_from)

    def _build(self) -> None:
        # Only nnU-Net's model-building code runs here, not TotalSegmentator's: nothing can send usage
        # statistics, so TotalSegmentator's config.json is left alone.
        # nnU-Net only for this encoder (seconds to import with its dependencies)
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        folder = self.model_folder
        plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
        try:
            with warnings.catch_warnings():
                # TotalSegmentator's plans may predate nnU-Net's "architecture" entry; nnU-Net converts
                # them itself and warns each time, which is noise here.
                warnings.filterwarnings("ignore", message="Detected old nnU-Net plans format")
                plans_manager = PlansManager(plans)
                configuration = plans_manager.get_configuration("3d_fullres")
            input_channels = determine_num_input_channels(plans_manager, configuration, dataset)
            outputs = plans_manager.get_label_manager(dataset).num_segmentation_heads
            intensity = plans_manager.foreground_intensity_properties_per_channel["0"]
            scheme = configuration.normalization_schemes[0]
            transpose = [int(a) for a in plans_manager.transpose_forward]
            network = get_network_from_plans(
                configuration.network_arch_class_name,
                configuration.network_arch_init_kwargs,
                configuration.network_arch_init_kwargs_req_import,
                input_channels,
                outputs,
                allow_init=False,
                deep_supervision=False,
            )
        except (KeyError, TypeError, ValueError, IndexError, ImportError, RuntimeError, AssertionError) as exc:
            raise LowdoseError(
                f"{folder}: nnU-Net cannot build TotalSegmentator's network from its plans.json and "
                f"dataset.json ({type(exc).__name__}: {exc}); download the weights again "
                f"(totalseg_download_weights) and copy the whole folder"
            ) from None
        if input_channels != 1 or scheme != "CTNormalization" or sorted(transpose) != [0, 1, 2]:
            raise LowdoseError(
                f"{folder}: not a single-channel 3-D CT model (inputs {input_channels}, normalisation "
                f"{scheme}, axes {transpose}); use TotalSegmentator's task 'total' weights"
            )
        _load_nnunet_weights(network, folder / "fold_0" / "checkpoint_final.pth")

        encoder = network.encoder
        strides = [list(s) for s in encoder.strides]
        if any(len(s) != 3 for s in strides):
            raise LowdoseError(
                f"{folder}: the network is not 3-D (strides {strides}); use TotalSegmentator's " "task 'total' weights"
            )
        encoder.return_skips = True  # every stage's output, not only the bottleneck
        self.encoder = encoder  # the decoder is dropped with ``network``
        self.network_class = configuration.network_arch_class_name.rsplit(".", 1)[-1]
        self.spacing_mm = [float(s) for s in configuration.spacing]
        self.normalisation = {
            "lower_hu": float(intensity["percentile_00_5"]),
            "upper_hu": float(intensity["percentile_99_5"]),
            "mean_hu": float(intensity["mean"]),
            "std_hu": float(intensity["std"]),
        }
        # Array axes as nnU-Net reads TotalSegmentator's canonical NIfTI: (S, A, R), whatever the reader
        # (nnU-Net's NIfTI readers transpose to SimpleITK's order); network axis n is array axis transpose[n].
        self._to_network = [2 + transpose[n] for n in range(3)]
        self._from_network = [2 + transpose.index(a) for a in range(3)]
        # Total stride along the slice's rows (A axis) and columns (R axis).
        self.stride = (
            math.prod(s[transpose.index(1)] for s in strides),
            math.prod(s[transpose.index(2)] for s in strides),
        )
        self.channels = [int(c) for c in encoder.output_channels]

    def _normalise(self, hu: torch.Tensor) -> torch.Tensor:
        # nnU-Net's CTNormalization, with torch.clamp so that gradients reach the input.
        n = self.normalisation
        return (hu.clamp(n["lower_hu"], n["upper_hu"]) - n["mean_hu"]) / max(n["std_hu"], 1e-8)

    def features(self, hu: torch.Tensor) -> list[torch.Tensor]:
        _check_hu(hu, self.name)
        x = self._normalise(hu)
        # Strided convolutions would accept any size, but a multiple of the stride keeps every stage an
        # exact downsampling of the previous one; at least two pixels at the coarsest stage because
        # instance normalisation needs more than one value.
        height, width = x.shape[-2:]
        pad_h = max(_round_up(height, self.stride[0]), 2 * self.stride[0]) - height
        pad_w = max(_round_up(width, self.stride[1]), 2 * self.stride[1]) - width
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        # Our rows run anterior -> posterior and columns right -> left (LPS); TotalSegmentator feeds nnU-Net
        # canonical RAS volumes, so both in-plane axes are reversed, then the slice becomes a one-voxel-deep
        # volume [B, 1, S, A, R] in the network's axis order.
        x = x.flip(-2, -1).unsqueeze(2).permute(0, 1, *self._to_network)
        maps = []
        for stage in self.encoder(x):
            stage = stage.permute(0, 1, *self._from_network)
            if stage.shape[2] != 1:  # cannot happen with nnU-Net's padded convolutions; fail loudly if it does
                raise LowdoseError(f"{self.model_folder}: the encoder made a one-slice input {stage.shape[2]} deep")
            maps.append(stage.squeeze(2).flip(-2, -1))
        return maps

    def describe(self) -> dict:
        return {
            "name": self.name,
            "mode": "fast" if self.fast else "full",
            "model_folder": str(self.model_folder),
            "weights_dir": str(self.weights_dir),
            "weights_dir_from": self.weights_from,
            "network": self.network_class,
            "model_spacing_mm": self.spacing_mm,
            "channels": self.channels,
            "in_plane_stride": list(self.stride),
            "normalisation": dict(self.normalisation),
            "resampling": "none (features at the slice's own resolution)",
        }


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _read_json(path: Path) -> dict:
    return read_json_object(
        path,
        "this TotalSegmentator model file",
        "download TotalSegmentator's weights again and " "copy the whole folder",
    )


# ------------------------------------------------------------------------------------------------------ timm


class TimmEncoder(AnatomyEncoder):
    """Any timm backbone from a local checkpoint file, as an anatomy encoder (its ``features_only`` maps).

    The model is made by ``timm.create_model(model_name, features_only=True)`` without downloading anything
    and gets the weights of ``checkpoint``: a state dict in timm's layout (``torch.save(model.state_dict())``,
    the full classifier or the features_only model), a timm training checkpoint (its EMA weights if present,
    else ``state_dict`` / ``model``, as timm's own loader picks), or a ``.safetensors`` file. Classifier weights
    are ignored; a checkpoint that lacks any weight the backbone uses, has weights the architecture does not
    have, or has other shapes raises ``LowdoseError``, so a wrong file never passes as random features.

    The input channels come from the checkpoint's first convolution (``in_chans`` only when it has none):
    a 3-channel (RGB) model gets the slice in all three. HU are windowed to [-1000, 1000], scaled to [0, 1]
    and normalised with the model's pretrained mean and std (averaged over channels; 0.5 / 0.5 if it has
    none). Convolutional backbones take any H, W; transformers may require their training size.
    """

    WINDOW_HU = (-1000.0, 1000.0)

    def __init__(self, model_name: str, checkpoint: str | Path, in_chans: int = 1):
        super().__init__()
        import timm  # optional backbones: imported only for a timm: encoder (1-2 s)

        self.model_name = str(model_name)
        self.checkpoint = Path(checkpoint).expanduser()
        if not timm.is_model(self.model_name):
            close = timm.list_models(f"*{self.model_name[:4]}*")[:8]
            raise LowdoseError(
                f"unknown timm model {self.model_name!r}; names are timm's, as "
                f"timm.list_models('*resnet*') lists them (e.g. resnet18, resnet50, convnext_tiny, "
                f"efficientnet_b0){'; similar: ' + ', '.join(close) if close else ''}"
            )
        if not self.checkpoint.is_file():
            raise LowdoseError(
                f"{self.checkpoint}: timm checkpoint file not found (anatomy encoder "
                f"timm:{self.model_name}:<checkpoint file>); give the path of a saved state dict "
                "(.pth/.pt/.bin or .safetensors)"
            )
        state = _read_state_dict(self.checkpoint)
        model = self._create(features_only=True, in_chans=in_chans)
        target = model.state_dict()
        keys = _match_keys(list(target), state)
        # The first convolution of the checkpoint decides the input channels (1 for CT-trained models,
        # 3 for ImageNet ones); rebuild the model if it differs from what was asked.
        first_conv = next((k for k, v in target.items() if v.dim() == 4 and k in keys), None)
        self.in_chans = int(in_chans)
        if first_conv is not None and state[keys[first_conv]].dim() == 4:
            self.in_chans = int(state[keys[first_conv]].shape[1])
            if self.in_chans != target[first_conv].shape[1]:
                model = self._create(features_only=True, in_chans=self.in_chans)
        self._load(model, keys, state)
        self.model = model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = float(sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,))))
        self.std = float(sum(cfg.get("std", (0.5,))) / len(cfg.get("std", (0.5,))))
        self.channels = [int(c) for c in model.feature_info.channels()]
        self.reductions = [int(r) for r in model.feature_info.reduction()]
        self.name = f"timm {self.model_name} ({self.checkpoint.name})"

    def _create(self, meta: bool = False, **kwargs):
        import timm  # optional backbones: imported only for a timm: encoder (1-2 s)

        try:
            if meta:  # key names only: no memory, no initialisation
                with torch.device("meta"):
                    return timm.create_model(self.model_name, pretrained=False, **kwargs)
            return timm.create_model(self.model_name, pretrained=False, **kwargs)
        except Exception as exc:  # timm raises many kinds for models that cannot be built this way
            if meta:
                return self._create(**kwargs)
            raise LowdoseError(
                f"timm cannot build {self.model_name!r} with {kwargs} ({type(exc).__name__}: {exc}); "
                "choose a backbone that supports features_only"
            ) from None

    def _load(self, model: torch.nn.Module, keys: dict[str, str], state: dict[str, torch.Tensor]) -> None:
        """Copy the checkpoint into ``model`` after checking it is a checkpoint of this architecture."""
        target = model.state_dict()
        where = f"{self.checkpoint}: not a checkpoint of timm's {self.model_name}"
        if not keys:
            raise LowdoseError(
                f"{where}: none of its {len(state)} weights (e.g. {', '.join(list(state)[:3])}) is one "
                f"of the backbone's (e.g. {', '.join(list(target)[:3])}); check the model name and "
                "the file"
            )
        # BatchNorm's batch counter is unused in eval mode and some exporters drop it.
        missing = [k for k in target if k not in keys and not k.endswith("num_batches_tracked")]
        if missing:
            raise LowdoseError(
                f"{where}: {len(missing)} of the backbone's weights are missing (e.g. "
                f"{', '.join(missing[:3])}); it is another architecture or an incomplete file"
            )
        wrong = [
            f"{k} {tuple(state[keys[k]].shape)} instead of {tuple(target[k].shape)}"
            for k in keys
            if state[keys[k]].shape != target[k].shape
        ]
        if wrong:
            raise LowdoseError(
                f"{where}: {len(wrong)} weights have other shapes ({'; '.join(wrong[:3])}); it is "
                "another variant of the architecture"
            )
        # Weights the features_only model does not use are fine if the full architecture has them
        # (classifier, final norm, pruned blocks); others mean a bigger or different network (resnet34 for
        # resnet18 has all of resnet18's keys plus more).
        used = set(keys.values())
        architecture = set(self._create(meta=True, in_chans=self.in_chans).state_dict())
        extra = [k for k in state if k not in used and k not in architecture]
        if extra:
            raise LowdoseError(
                f"{where}: {len(extra)} of its weights are not in that architecture (e.g. "
                f"{', '.join(extra[:3])}); it is another (bigger or different) model"
            )
        model.load_state_dict({k: state[keys[k]] for k in keys}, strict=False)

    def _normalise(self, hu: torch.Tensor) -> torch.Tensor:
        low, high = self.WINDOW_HU
        x = ((hu.clamp(low, high) - low) / (high - low) - self.mean) / self.std
        # expand keeps one copy of the slice and sends the three channels' gradients back to it
        return x.expand(-1, self.in_chans, -1, -1) if self.in_chans != 1 else x

    def features(self, hu: torch.Tensor) -> list[torch.Tensor]:
        _check_hu(hu, self.name)
        maps = []
        for channels, stage in zip(self.channels, self.model(self._normalise(hu))):
            # Some backbones (e.g. Swin) give channels-last maps; the interface is channels-first.
            if stage.dim() == 4 and stage.shape[1] != channels and stage.shape[-1] == channels:
                stage = stage.permute(0, 3, 1, 2)
            if stage.dim() != 4:
                raise LowdoseError(
                    f"the {self.name} gives {stage.dim()}-D features; choose a backbone whose "
                    "features_only outputs are feature maps"
                )
            maps.append(stage)
        return maps

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": self.model_name,
            "checkpoint": str(self.checkpoint),
            "in_chans": self.in_chans,
            "window_hu": list(self.WINDOW_HU),
            "mean": self.mean,
            "std": self.std,
            "channels": self.channels,
            "reductions": self.reductions,
        }


def _load_nnunet_weights(network: torch.nn.Module, checkpoint_path: Path) -> None:
    """An nnU-Net checkpoint's trained weights into the network its plans.json describes."""
    checkpoint = load_checkpoint(checkpoint_path, safe_globals=nnunet_checkpoint_globals())
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, ValueError) as exc:
        raise LowdoseError(
            f"{checkpoint_path}: its weights do not load into the network its plans.json "
            f"describes ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "download the weights again (totalseg_download_weights) and copy the whole "
            "folder"
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and with DDP / torch.compile prefixes removed."""
    if path.name.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file  # optional: only .safetensors checkpoints need it
        except ImportError:
            raise LowdoseError(
                f"{path}: reading .safetensors files needs the safetensors package (pip install "
                "safetensors), or save the weights with torch.save"
            ) from None
        try:
            checkpoint: Any = load_file(str(path), device="cpu")  # unwrapped and checked below
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise LowdoseError(f"{path}: unreadable safetensors file ({exc})") from None
    else:
        try:
            # timm's training checkpoints also hold the run's arguments as an argparse.Namespace.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load's errors vary with the file (pickle, zip, EOF, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LowdoseError(
                f"{path}: not a readable PyTorch weights file ({first}); save the model's weights "
                "with torch.save(model.state_dict(), path)"
            ) from None
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise LowdoseError(
            f"{path}: holds no state dict (a dict of weight tensors); save the model's weights with "
            "torch.save(model.state_dict(), path)"
        )
    state = {}
    for key, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            for prefix in ("module.", "_orig_mod."):
                key = key[len(prefix) :] if key.startswith(prefix) else key
            state[str(key)] = value
    return state


def _match_keys(model_keys: list[str], state: dict) -> dict[str, str]:
    """features_only model key -> checkpoint key.

    timm's feature wrappers rename the base model's keys: ``FeatureListNet`` flattens the first level of
    Sequential containers (``stem.0.weight`` -> ``stem_0.weight``), ``FeatureGetterNet`` nests the model
    (``model.blocks.0...``). A checkpoint may be in either layout; an exact name wins.
    """
    aliases: dict[str, str] = {}
    for key in state:
        parts = key.split(".")
        if len(parts) > 2:
            aliases.setdefault("_".join(parts[:2]) + "." + ".".join(parts[2:]), key)
        aliases.setdefault("model." + key, key)
    for key in state:
        aliases[key] = key
    return {k: aliases[k] for k in model_keys if k in aliases}
