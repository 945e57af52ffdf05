"""The MONAI side of a lowdose bundle: the metadata fields MONAI's schema requires, and an ``inference.json`` that
MONAI's bundle tooling runs (``python -m monai.bundle run``) through lowdose's engine.

Both are made from the metadata lowdose writes when it trains a model, so the configs of an existing bundle can
be rewritten without touching its weights (``scripts/rewrite_bundle_configs.py``)::

    python -m monai.bundle run --bundle_root models/dose_unet --config_file models/dose_unet/configs/inference.json \\
        --input_file low_dose.nii.gz --output_file denoised.nii.gz [--dose 0.25] [--device cpu]

    python -c "import monai.bundle, lowdose.resources as r; monai.bundle.verify_metadata(
        meta_file='models/dose_unet/configs/metadata.json', filepath=str(r.BUNDLE_SCHEMA))"   # offline
"""

from __future__ import annotations

import copy
from importlib import metadata as _metadata
from typing import Any

# The schema the bundles declare (MONAI's bundle metadata schema of 2024-07-25, what MONAI's model zoo uses).
# ``verify_metadata`` downloads it unless given a ``filepath``: lowdose passes its own schema,
# lowdose/bundle_metadata_schema.json (resources.BUNDLE_SCHEMA), which requires every field that one
# requires plus what lowdose reads, so a bundle that passes it passes MONAI's too, offline.
_MONAI_RELEASES = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download"
MONAI_SCHEMA_URL = f"{_MONAI_RELEASES}/0.8.1/meta_schema_20240725.json"
COPYRIGHT = "Copyright the lowdose authors; Apache License 2.0 (the training data keep their own licences)"
INTENDED_USE = (
    "Research and evaluation of low-dose CT denoising; not a medical device. See the model card "
    "(docs/README.md), sections Intended use and Limits."
)
DATA_TYPE = "CT in Hounsfield units: DICOM series, NIfTI, NRRD or MetaImage (read by lowdose.load_ct)"
# Order of MONAI's fields at the top of metadata.json; lowdose's own keys follow in their order.
MONAI_FIELDS = (
    "schema",
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "name",
    "task",
    "description",
    "authors",
    "copyright",
    "data_source",
    "data_type",
    "eval_metrics",
    "intended_use",
    "network_data_format",
)


def monai_metadata(meta: dict, changelog: str | None = None) -> dict:
    """``meta`` (a lowdose bundle's metadata) with every field MONAI's metadata schema requires.

    Values already in ``meta`` are kept (lowdose's own keys untouched), except that ``network_data_format`` is
    completed (outputs' value ranges, the dose input, the anatomy encoder's real outputs). ``changelog`` starts
    the changelog of a new bundle (default: which lowdose version trained it).
    """
    lowdose_version = _version("lowdose")
    filled: dict[str, Any] = {
        "schema": MONAI_SCHEMA_URL,
        "version": "0.1.0",
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch").split("+")[0],
        "numpy_version": _version("numpy"),
        "required_packages_version": {"lowdose": lowdose_version},
        "description": describe(meta),
        "authors": "lowdose",
        "copyright": COPYRIGHT,
        "data_source": data_source(meta),
        "data_type": DATA_TYPE,
        "eval_metrics": {
            k: v
            for k, v in (meta.get("validation") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        "intended_use": INTENDED_USE,
    }
    filled.update(copy.deepcopy(meta))
    filled.setdefault("changelog", {filled["version"]: changelog or f"trained with lowdose {lowdose_version}"})
    filled["network_data_format"] = network_data_format(filled)
    ordered = {key: filled[key] for key in MONAI_FIELDS if key in filled}
    ordered.update((key, value) for key, value in filled.items() if key not in ordered)
    return ordered


def describe(meta: dict) -> str:
    """A paragraph saying what the bundle is and how to run it (metadata's ``description``)."""
    network, kwargs = meta["network"]["name"], meta["network"].get("kwargs", {})
    if meta.get("lowdose_kind") == "anatomy_encoder":
        groups = list((meta.get("groups") or {}).values())
        return (
            f"lowdose's anatomy encoder ({network} network): segments CT slices in HU into {len(groups)} anatomy "
            f"groups ({', '.join(groups)}) and gives per-slice group-presence probabilities; the anatomy prior of "
            "lowdose's anatomy-aware training. configs/inference.json writes the group label map of a CT file on "
            "the CT's grid. Model card: docs/README.md."
        )
    if meta.get("lowdose_kind") == "da_clip":
        return (
            f"lowdose's DA-CLIP ({network} network): reads a CT slice in HU and gives a unit-norm dose embedding, a "
            f"unit-norm body-region embedding (the conditioning of a dose- and anatomy-aware denoiser), the dose "
            f"fraction and the region ({', '.join(meta.get('regions') or [])}). configs/inference.json writes the "
            "per-slice dose fraction and region of a CT file as JSON. Model card: docs/README.md."
        )
    channels = int(kwargs.get("in_channels", 1))
    view = "2-D (one slice)" if channels == 1 else f"2.5-D ({channels} neighbouring slices in, the centre one out)"
    if kwargs.get("dose_conditioning"):
        dose = (
            "conditioned on the dose fraction, which its dose estimator reads from the image noise when not given"
            if meta.get("dose_estimator")
            else "conditioned on the dose fraction (to be given)"
        )
    else:
        dose = "one model for every dose"
    anatomy = (meta.get("anatomy_aware_training") or {}).get("enabled") or []
    tuned = f"; trained with {', '.join(anatomy)}" if anatomy else ""
    return (
        f"Low-dose CT denoiser: lowdose's {network} network, {view}, {dose}{tuned}. Hounsfield units in and out, "
        "geometry kept; the network's normalisation is in this file. configs/inference.json denoises a CT file "
        "through lowdose's engine (lowdose.denoise.Denoiser). Model card: docs/README.md."
    )


def data_source(meta: dict) -> str:
    """Which series trained and validated the model (paths as the training run had them)."""
    training = meta.get("training") or {}
    train = training.get("train_series") or training.get("images") or []
    text = f"Trained on {', '.join(map(str, train))}" if train else "Training data: see docs/README.md"
    if training.get("validation_series"):
        text += f"; validated on {', '.join(map(str, training['validation_series']))}"
    if training.get("data_mode") == "simulated":
        text += " (low-dose scans simulated from the normal dose by lowdose.simulate_low_dose)"
    return text + ". Licences and provenance of the data: docs/README.md."


def network_data_format(meta: dict) -> dict:
    """MONAI's description of the network's inputs and outputs, completed from lowdose's metadata."""
    fmt = copy.deepcopy(meta.get("network_data_format") or {})
    kwargs = meta["network"].get("kwargs", {})
    norm = meta["normalisation"]
    hu_range = [norm["hu_min"], norm["hu_max"]]
    channels = int(kwargs.get("in_channels", 1))
    inputs = fmt.setdefault("inputs", {})
    inputs.setdefault(
        "image",
        {
            "type": "image",
            "format": "hounsfield",
            "modality": "CT",
            "num_channels": channels,
            "spatial_shape": ["*", "*"],
            "dtype": "float32",
            "value_range": hu_range,
            "channel_def": {"0": "slices z-1, z, z+1 (2.5-D)" if channels == 3 else "slice z"},
        },
    )
    outputs = fmt.setdefault("outputs", {})
    if meta.get("lowdose_kind") == "anatomy_encoder":
        if outputs.get("pred", {}).get("format") in (None, "hounsfield"):  # what the writer before 0.1.1 said
            fmt.update(_anatomy_outputs({str(k): v for k, v in (meta.get("groups") or {}).items()}))
        return fmt
    if meta.get("lowdose_kind") == "da_clip":
        fmt["outputs"] = _da_clip_outputs(int(kwargs.get("embedding_dim", 64)), list(meta.get("regions") or []))
        return fmt
    pred = outputs.setdefault(
        "pred",
        {"type": "image", "format": "hounsfield", "num_channels": 1, "spatial_shape": ["*", "*"], "dtype": "float32"},
    )
    pred.setdefault("value_range", hu_range)
    if kwargs.get("dose_conditioning"):
        inputs.setdefault(
            "dose_fraction",
            {
                "type": "tensor",
                "format": "fraction of the normal dose",
                "num_channels": 1,
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [0, 1],
                "description": "one value per slice; lowdose's engine gives it or estimates it from the image",
            },
        )
    return fmt


def _anatomy_outputs(groups: dict[str, str]) -> dict:
    """The anatomy encoder's outputs: group logits per pixel and group presence per slice; the label map."""
    classes = {"0": "background", **groups}
    return {
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": len(classes),
                "spatial_shape": ["*", "*"],
                "dtype": "float32",
                "value_range": [0, 1],
                "channel_def": classes,
                "description": "logits of the anatomy groups (softmax: probabilities)",
            },
            "presence": {
                "type": "vector",
                "format": "logits",
                "num_channels": len(groups),
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [0, 1],
                "channel_def": groups,
                "description": "per-slice presence of each group (sigmoid: probabilities)",
            },
        },
        "post_processed_outputs": {
            "pred": {
                "type": "image",
                "format": "labels",
                "num_channels": 1,
                "spatial_shape": ["*", "*", "*"],
                "dtype": "uint8",
                "value_range": [0, len(groups)],
                "channel_def": classes,
            }
        },
    }


def _da_clip_outputs(embedding_dim: int, regions: list[str]) -> dict:
    """DA-CLIP's outputs: the two embeddings, the log dose fraction and the region logits of each slice."""

    def vector(channels: int, fmt: str, description: str, value_range: list) -> dict:
        return {
            "type": "vector",
            "format": fmt,
            "num_channels": channels,
            "spatial_shape": [],
            "dtype": "float32",
            "value_range": value_range,
            "description": description,
        }

    return {
        "dose_embedding": vector(embedding_dim, "embedding", "unit-norm dose embedding", [-1, 1]),
        "region_embedding": vector(embedding_dim, "embedding", "unit-norm body-region embedding", [-1, 1]),
        "log_dose": vector(1, "log dose fraction", "log of the dose fraction (<= 0)", [-20, 0]),
        "region_logits": {
            **vector(len(regions), "logits", "body region logits (softmax: probabilities)", [0, 1]),
            "channel_def": {str(i): r for i, r in enumerate(regions)},
        },
    }


def inference_config(meta: dict) -> dict:
    """``configs/inference.json``: ``python -m monai.bundle run`` reads ``input_file`` with lowdose.load_ct, runs it
    through lowdose's engine built from ``bundle_root`` and writes ``output_file`` (HU and geometry kept)."""
    network = meta["network"]
    network_def = {"_target_": "lowdose.networks.build_network", "name": network["name"], **network.get("kwargs", {})}
    if meta.get("lowdose_kind") == "anatomy_encoder":
        return {
            "imports": [
                "$import lowdose",
                "$import torch",
                "$from lowdose.anatomy import load_anatomy_encoder",
                "$from lowdose.labels import save_label_map",
            ],
            "bundle_root": ".",
            "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
            "input_file": "",
            "output_file": "",
            "batch_size": 4,
            "network_def": network_def,
            "image": "$lowdose.load_ct(@input_file)",
            "encoder": "$load_anatomy_encoder(@bundle_root, @device)",
            # slices in batches of batch_size (map, not a comprehension: expressions cannot close over @refs)
            "labels": "$torch.cat(list(map(@encoder.segment, torch.from_numpy(@image.hu[:, None]).to(@device)"
            ".split(@batch_size)))).cpu().numpy()",
            "run": ["$save_label_map(@labels, @image, @output_file)"],
            "note": "Writes the anatomy-group label map (0 background, groups as metadata.json's 'groups') of "
            "input_file on its grid to output_file (.nii.gz).",
        }
    if meta.get("lowdose_kind") == "da_clip":
        return {
            "imports": ["$import json", "$import lowdose", "$from lowdose.anatomy import DoseAnatomyReader"],
            "bundle_root": ".",
            "device": "cpu",
            "input_file": "",
            "output_file": "",
            "network_def": network_def,
            "image": "$lowdose.load_ct(@input_file)",
            "reader": "$DoseAnatomyReader(@bundle_root, @device)",
            "run": ["$open(@output_file, 'w').write(json.dumps(@reader.read_volume(@image), indent=2))"],
            "note": "Writes the per-slice dose fraction and body region of input_file as JSON to output_file.",
        }
    return {
        "imports": ["$import lowdose"],
        "bundle_root": ".",
        "device": "auto",
        "input_file": "",
        "output_file": "",
        "dose": "auto",
        "batch_size": 0,
        "network_def": network_def,
        "image": "$lowdose.load_ct(@input_file)",
        "denoiser": {
            "_target_": "lowdose.denoise.Denoiser",
            "model": "@bundle_root",
            "device": "@device",
            "batch_size": "@batch_size",
        },
        "result": "$@denoiser(@image, dose=@dose)",  # a lowdose.denoise.DenoiseResult
        "run": ["$lowdose.save_ct(@result.volume, @output_file, description=@result.description)"],
        "note": "input_file: a CT file or DICOM series folder; output_file: .nii.gz, .nii, .nrrd, .mha or a new folder "
        "(DICOM series); dose: a fraction of the normal dose or 'auto'; device: auto, cpu or cuda. The same "
        "as `lowdose denoise input_file output_file --model bundle_root`.",
    }


def _version(package: str) -> str:
    try:
        return _metadata.version(package)
    except _metadata.PackageNotFoundError:
        return "unknown"
