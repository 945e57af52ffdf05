"""The user's TotalSegmentator installation, as the fidelity check and the anatomy encoders both find it.

Where its weights are ($TOTALSEG_WEIGHTS_PATH, else $TOTALSEG_HOME_DIR/nnunet/results, else
~/.totalsegmentator/nnunet/results), which model folders task ``total`` needs in fast or full mode, its
structure names, and its usage statistics switched off. lowdose never downloads weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
from totalsegmentator.map_to_binary import class_map

from .atomic import write_bytes_atomically
from .errors import LowdoseError


class SegmenterError(LowdoseError):
    """The segmenter cannot run (missing weights, unusable device, ...)."""


def read_json_object(path: Path, what: str, remedy: str) -> dict:
    """The JSON object in one of TotalSegmentator's files; SegmenterError saying ``remedy`` otherwise."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SegmenterError(f"{path}: {what} is unreadable ({exc}); {remedy}") from None
    if not isinstance(content, dict):
        raise SegmenterError(f"{path}: {what} is not a JSON object; {remedy}")
    return content


class TotalSegmentatorWeightsError(SegmenterError):
    """TotalSegmentator's weights for the requested mode are not where TotalSegmentator looks for them."""


def total_class_names() -> dict[int, str]:
    """TotalSegmentator's ``total`` task: label value -> structure name (117 structures)."""
    return {int(k): str(v) for k, v in class_map["total"].items()}


def totalsegmentator_home() -> Path:
    """TotalSegmentator's home folder (config.json, default weights): $TOTALSEG_HOME_DIR or ~/.totalsegmentator."""
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"])
    home = Path.home()
    return (Path("/tmp") if str(home) == "/" else home) / ".totalsegmentator"


def totalsegmentator_weights_dir() -> tuple[Path, str]:
    """Where TotalSegmentator looks for weights, and which setting said so (for messages)."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"]), "TOTALSEG_WEIGHTS_PATH"
    home = totalsegmentator_home()
    source = "TOTALSEG_HOME_DIR" if os.environ.get("TOTALSEG_HOME_DIR") else "the default home ~/.totalsegmentator"
    return home / "nnunet" / "results", source


def required_model_folders(fast: bool) -> list[str]:
    """The model folders (relative to the weights folder) that task ``total`` needs in this mode.

    Taken from the installed TotalSegmentator's own tables: fast = one 3 mm model (Dataset297), full =
    five 1.5 mm models (Datasets 291-295), each ``<Dataset>/<Trainer>__<Plans>__3d_fullres``.
    """
    mode = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]
    task_ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
    folders = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        dataset = info["foldername"]
        if info.get("rel_path"):
            dataset = str(Path(info["rel_path"]) / dataset)
        folders.append(f"{dataset}/{mode['trainer']}__nnUNetPlans__3d_fullres")
    return folders


def check_model_folder(weights: Path, relative: str, fast: bool, source: str) -> Path:
    """``weights / relative`` when its checkpoint, plans.json and dataset.json are there; otherwise
    ``TotalSegmentatorWeightsError`` saying how to install them (``source``: where ``weights`` came from)."""
    folder = weights / relative
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if all(p.is_file() for p in (checkpoint, folder / "plans.json", folder / "dataset.json")):
        return folder
    dataset = relative.split("/")[0]
    state = "is incomplete" if (weights / dataset).exists() else "is missing"
    mode = "fast (3 mm)" if fast else "full (1.5 mm)"
    task = "total_fast" if fast else "total"
    raise TotalSegmentatorWeightsError(
        f"{weights / dataset}: TotalSegmentator weights for task 'total' {mode} {state} "
        f"(needs {relative}/fold_0/checkpoint_final.pth; weights folder from {source}). lowdose never "
        f"downloads them: on a machine with internet run `pip install TotalSegmentator` and "
        f"`totalseg_download_weights -t {task}` (or TotalSegmentator{' --fast' if fast else ''} once on any CT), "
        f"then copy the folder {dataset} from its ~/.totalsegmentator/nnunet/results into {weights} here, "
        f"or set TOTALSEG_WEIGHTS_PATH to the folder that holds it"
    )


def ensure_usage_statistics_off(home: Path | None = None) -> Path:
    """Make TotalSegmentator's config.json say ``send_usage_stats: false`` (its only network call).

    Creates the file when missing (TotalSegmentator would otherwise create one that sends statistics);
    other keys of an existing file (id, licence, counters) are kept. Written atomically.
    """
    home = Path(home) if home is not None else totalsegmentator_home()
    path = home / "config.json"
    config = read_json_object(path, "TotalSegmentator's config file", "fix or delete it") if path.exists() else {}
    if config.get("send_usage_stats") is False and config.get("statistics_disclaimer_shown"):
        return path
    config.setdefault("totalseg_id", "totalseg_lowdose")
    config.setdefault("prediction_counter", 0)
    config["send_usage_stats"] = False
    config["statistics_disclaimer_shown"] = True
    try:
        home.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, json.dumps(config, indent=4).encode())
    except (OSError, LowdoseError) as exc:
        raise SegmenterError(
            f"{path}: cannot write TotalSegmentator's config file to switch usage "
            f"statistics off ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    return path
