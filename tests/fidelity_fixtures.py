"""A tiny randomly initialised nnU-Net v2 model in TotalSegmentator's weights layout, for the fidelity tests.

TotalSegmentator's downloaded weights cannot exist here (no internet, and they are the user's): this tiny
random model stands in for them, so that the real code path runs end to end (CT -> TotalSegmentator's
Python API -> nnU-Net -> label map). Its labels are meaningless; only the plumbing is tested with it.
The folder it writes is what ``totalseg_download_weights`` would leave:
``<weights>/<Dataset folder>/<Trainer>__nnUNetPlans__3d_fullres/{dataset.json, plans.json,
fold_0/checkpoint_final.pth}``.
"""

from __future__ import annotations

import json
from pathlib import Path

# A 2-stage PlainConvUNet with 4 and 8 features: a few thousand parameters, fast on a CPU.
_ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _plans(dataset_name: str, spacing_mm: float, patch_size: list[int]) -> dict:
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing_mm] * 3,
        "original_median_shape_after_transp": [64, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": patch_size,
                "median_image_size_in_voxels": [64, 128, 128],
                "spacing": [spacing_mm] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": _ARCHITECTURE,
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3000.0,
                "mean": 40.0,
                "median": 40.0,
                "min": -1024.0,
                "percentile_00_5": -1000.0,
                "percentile_99_5": 1500.0,
                "std": 300.0,
            }
        },
    }


def write_tiny_model(
    model_dir: Path,
    class_names: dict[int, str],
    spacing_mm: float,
    trainer: str,
    seed: int = 0,
    patch_size: tuple[int, int, int] = (16, 96, 96),
    background_bias: float = 4.0,
) -> Path:
    """Write one randomly initialised nnU-Net v2 model (``len(class_names) + 1`` outputs) into ``model_dir``.

    The background output gets ``background_bias`` added so that, as in a real CT, most voxels come out
    as background (about 90 % on the sample) and a dozen structures appear in patches.
    """
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    model_dir = Path(model_dir)
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    labels = {"background": 0, **{name: int(i) for i, name in sorted(class_names.items())}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    plans = _plans(model_dir.parent.name, spacing_mm, list(patch_size))
    (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    torch.manual_seed(seed)
    network = get_network_from_plans(
        _ARCHITECTURE["network_class_name"],
        _ARCHITECTURE["arch_kwargs"],
        _ARCHITECTURE["_kw_requires_import"],
        1,
        len(labels),
        allow_init=True,
        deep_supervision=False,
    )
    weights = network.state_dict()
    weights["decoder.seg_layers.0.bias"][0] += background_bias
    torch.save(
        {
            "network_weights": weights,
            "trainer_name": trainer,  # a real nnU-Net trainer class, as in TotalSegmentator's checkpoints
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset},
            "inference_allowed_mirroring_axes": None,
            "current_epoch": 1,
        },
        model_dir / "fold_0" / "checkpoint_final.pth",
    )
    return model_dir


def write_tiny_totalsegmentator_weights(weights_dir: Path, fast: bool = True) -> list[Path]:
    """Tiny random stand-ins for TotalSegmentator's ``total`` weights (fast: Dataset297; full: 291-295).

    Folder names, trainers and class lists come from the installed TotalSegmentator, so the layout is the
    one its Python API looks for.
    """
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    mode = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]
    task_ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
    written = []
    for k, task_id in enumerate(task_ids):
        folder = TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"]
        names = class_map["total"] if len(task_ids) == 1 else class_map_5_parts[map_taskid_to_partname_ct[task_id]]
        model_dir = Path(weights_dir) / folder / f"{mode['trainer']}__nnUNetPlans__3d_fullres"
        written.append(write_tiny_model(model_dir, names, float(mode["resample"]), mode["trainer"], seed=k))
    return written
