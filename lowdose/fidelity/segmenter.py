"""Segmenters for the fidelity check: a CT volume in, a label map on the same voxel grid out.

``TotalSegmentatorSegmenter`` runs TotalSegmentator (task ``total``, 117 structures) through its Python
API on the user's own weights, offline: it never downloads and switches usage statistics off.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomically
from ..bundle import load_checkpoint, nnunet_checkpoint_globals
from ..errors import LowdoseError
from ..volume import CTVolume

# Checkpoints (path, mtime) already proven readable without arbitrary unpickling.
_SAFE_CHECKPOINTS: set[tuple[str, int]] = set()

# LPS (DICOM, SimpleITK, CTVolume) to RAS (NIfTI as nibabel and TotalSegmentator read it).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SegmenterError(LowdoseError):
    """The segmenter cannot run (missing weights, unusable device, ...)."""


class TotalSegmentatorWeightsError(SegmenterError):
    """TotalSegmentator's weights for the requested mode are not where TotalSegmentator looks for them."""


class Segmenter(abc.ABC):
    """Anything that turns a ``CTVolume`` into an integer label map ``[z, y, x]`` on the volume's own grid.

    ``class_names`` maps each label value (1, 2, ...) to a structure name; 0 is background.
    """

    name = "segmenter"

    @property
    @abc.abstractmethod
    def class_names(self) -> dict[int, str]:
        """Label value -> structure name (background 0 not included)."""

    @abc.abstractmethod
    def segment(self, volume: CTVolume) -> np.ndarray:
        """The label map of ``volume``: an integer array with the volume's shape ``[z, y, x]``."""

    def describe(self) -> dict:
        """What ran, for the report (name, version, mode, ...)."""
        return {"name": self.name, "classes": len(self.class_names)}


def total_class_names() -> dict[int, str]:
    """TotalSegmentator's ``total`` task: label value -> structure name (117 structures)."""
    from totalsegmentator.map_to_binary import class_map

    return {int(k): str(v) for k, v in class_map["total"].items()}


def ct_to_nifti(volume: CTVolume):
    """The CT as a nibabel image in real HU with its geometry (RAS affine), as TotalSegmentator reads it."""
    import nibabel as nib

    affine = LPS_TO_RAS @ volume.affine_lps()
    image = nib.Nifti1Image(np.ascontiguousarray(volume.hu.transpose(2, 1, 0), dtype=np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def nifti_to_labels(image, volume: CTVolume) -> np.ndarray:
    """A label image that TotalSegmentator returned for ``volume``, as a ``[z, y, x]`` uint8 array."""
    expected = LPS_TO_RAS @ volume.affine_lps()
    data = np.asanyarray(image.dataobj)
    if data.shape != volume.shape[::-1] or not np.allclose(image.affine, expected, atol=1e-3):
        raise SegmenterError(f"the segmentation came back on another grid ({data.shape}, affine "
                             f"{np.round(image.affine, 3).tolist()}) than the CT ({volume.shape[::-1]})")
    return np.ascontiguousarray(np.rint(data).astype(np.uint8).transpose(2, 1, 0))


# ------------------------------------------------------------------------------------ TotalSegmentator


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
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

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


def ensure_usage_statistics_off(home: Path | None = None) -> Path:
    """Make TotalSegmentator's config.json say ``send_usage_stats: false`` (its only network call).

    Creates the file when missing (TotalSegmentator would otherwise create one that sends statistics);
    other keys of an existing file (id, licence, counters) are kept. Written atomically.
    """
    home = Path(home) if home is not None else totalsegmentator_home()
    path = home / "config.json"
    config = {}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SegmenterError(f"{path}: TotalSegmentator's config file is unreadable ({exc}); fix or "
                                 "delete it") from None
        if not isinstance(config, dict):
            raise SegmenterError(f"{path}: TotalSegmentator's config file is not a JSON object; fix or delete it")
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
        raise SegmenterError(f"{path}: cannot write TotalSegmentator's config file to switch usage "
                             f"statistics off ({getattr(exc, 'strerror', None) or exc})") from None
    return path


def resolve_device(device: str) -> str:
    """lowdose's device names (auto, cpu, cuda, cuda:N; gpu is accepted) as TotalSegmentator's (cpu, gpu, gpu:N)."""
    import torch

    device = str(device).strip().lower()
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "mps"):
        return device
    if device in ("cuda", "gpu") or device.startswith(("cuda:", "gpu:")):
        index = device.split(":", 1)[1] if ":" in device else None
        if not torch.cuda.is_available():
            raise SegmenterError(f"device {device} requested but torch sees no CUDA GPU; use --device cpu or auto")
        if index is None:
            return "gpu"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise SegmenterError(f"device {device}: no such GPU (torch sees {torch.cuda.device_count()})")
        return f"gpu:{index}"
    raise SegmenterError(f"unknown device {device!r}; use auto, cpu or cuda (cuda:N)")


class TotalSegmentatorSegmenter(Segmenter):
    """TotalSegmentator 2.x, task ``total`` (117 structures), through ``totalsegmentator.python_api``.

    ``fast=True`` runs the single 3 mm model (Dataset297), ``fast=False`` the five 1.5 mm models
    (Datasets 291-295); the CT is handed over in real HU with its geometry and the label map comes back
    on the CT's own grid. ``device`` is auto, cpu or cuda. ``weights_dir`` overrides
    $TOTALSEG_WEIGHTS_PATH / $TOTALSEG_HOME_DIR/nnunet/results. Nothing is downloaded: missing weights
    raise ``TotalSegmentatorWeightsError`` saying how to install them. TotalSegmentator's usage statistics
    are switched off in its config.json before the first run.

    TotalSegmentator 2.18's Python API builds a new nnU-Net predictor (loads the checkpoint) on every call,
    so the model cannot be kept in memory across volumes; loading is a small part of a run. nnU-Net still
    starts one preprocessing and one export worker process per call whatever the thread settings, so a
    script that uses this needs an ``if __name__ == "__main__":`` guard.
    """

    name = "TotalSegmentator"

    def __init__(self, fast: bool = True, device: str = "auto", weights_dir: str | os.PathLike | None = None,
                 progress: bool = True):
        self.fast = bool(fast)
        self.device_requested = device
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.progress = progress
        self._class_names: dict[int, str] | None = None
        self._device: str | None = None

    @property
    def class_names(self) -> dict[int, str]:
        if self._class_names is None:
            self._class_names = total_class_names()
        return self._class_names

    @property
    def mode(self) -> str:
        return "fast (3 mm)" if self.fast else "full (1.5 mm)"

    def _weights_dir(self) -> tuple[Path, str]:
        if self.weights_dir is not None:
            return self.weights_dir, "weights_dir"
        return totalsegmentator_weights_dir()

    def check_weights(self) -> Path:
        """The weights folder, after checking that every model this mode needs is complete in it."""
        weights, source = self._weights_dir()
        for folder in required_model_folders(self.fast):
            checkpoint = weights / folder / "fold_0" / "checkpoint_final.pth"
            if not all(p.is_file() for p in (checkpoint, weights / folder / "plans.json",
                                             weights / folder / "dataset.json")):
                dataset = folder.split("/")[0]
                state = "is incomplete" if (weights / dataset).exists() else "is missing"
                task = "total_fast" if self.fast else "total"
                raise TotalSegmentatorWeightsError(
                    f"{weights / dataset}: TotalSegmentator weights for task 'total' {self.mode} {state} "
                    f"(needs {folder}/fold_0/checkpoint_final.pth; weights folder from {source}). lowdose never "
                    f"downloads them: on a machine with internet run `pip install TotalSegmentator` and "
                    f"`totalseg_download_weights -t {task}` (or TotalSegmentator{' --fast' if self.fast else ''} "
                    f"once on any CT), then copy the folder {dataset} from its ~/.totalsegmentator/nnunet/results "
                    f"into {weights} here, or set TOTALSEG_WEIGHTS_PATH to the folder that holds it")
            self._check_checkpoint_is_safe(checkpoint)
        return weights

    def _check_checkpoint_is_safe(self, checkpoint: Path) -> None:
        """Refuse a checkpoint that only arbitrary unpickling could read, before nnU-Net unpickles it.

        nnU-Net loads its checkpoints with ``weights_only=False``; the same bytes, read first by torch's
        weights-only loader (tensors, plain types, numpy scalars), prove it cannot run code. Checked once per
        file and modification time.
        """
        stamp = (str(checkpoint), checkpoint.stat().st_mtime_ns)
        if stamp in _SAFE_CHECKPOINTS:
            return
        load_checkpoint(checkpoint, safe_globals=tuple(nnunet_checkpoint_globals()))
        _SAFE_CHECKPOINTS.add(stamp)

    def describe(self) -> dict:
        try:
            from importlib.metadata import version
            ts_version, nnunet_version = version("TotalSegmentator"), version("nnunetv2")
        except Exception:  # metadata missing in an odd install: the report still works
            ts_version = nnunet_version = "unknown"
        weights, source = self._weights_dir()
        return {"name": self.name, "version": ts_version, "nnunetv2_version": nnunet_version, "task": "total",
                "mode": "fast" if self.fast else "full", "resolution_mm": 3.0 if self.fast else 1.5,
                "models": required_model_folders(self.fast), "weights_dir": str(weights),
                "weights_dir_from": source, "device": self._device or self.device_requested,
                "classes": len(self.class_names)}

    def segment(self, volume: CTVolume) -> np.ndarray:
        weights = self.check_weights()
        if self._device is None:
            self._device = resolve_device(self.device_requested)
        ensure_usage_statistics_off()
        image = ct_to_nifti(volume)
        with _environment(TOTALSEG_WEIGHTS_PATH=str(weights)), _stdout_to_stderr(self.progress):
            from totalsegmentator.python_api import totalsegmentator

            # One thread for resampling and saving: on a CPU the work is in the network, and more
            # threads only add worker processes.
            result = totalsegmentator(image, None, ml=True, task="total", fast=self.fast, device=self._device,
                                      quiet=not self.progress, nr_thr_resamp=1, nr_thr_saving=1)
        return nifti_to_labels(result, volume)


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the duration of the block (TotalSegmentator reads them per call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _stdout_to_stderr(show: bool):
    """TotalSegmentator prints its progress on stdout; keep stdout for results (or silence it)."""
    target = sys.stderr if show else open(os.devnull, "w")
    try:
        with contextlib.redirect_stdout(target):
            yield
    finally:
        if not show:
            target.close()


def timed_segment(segmenter: Segmenter, volume: CTVolume, role: str, progress: bool,
                  step: str = "") -> tuple[np.ndarray, float]:
    """Segment one volume with progress lines on stderr; returns the label map and seconds taken."""
    start = time.perf_counter()
    if progress:
        print(f"[fidelity] {step}segmenting {role} ({volume.describe()}) with {segmenter.name} ...",
              file=sys.stderr, flush=True)
    labels = np.asarray(segmenter.segment(volume))
    seconds = time.perf_counter() - start
    if labels.shape != volume.shape:
        raise SegmenterError(f"{segmenter.name} returned a label map of shape {labels.shape} for a CT of shape "
                             f"{volume.shape}")
    if progress:
        found = len(np.unique(labels)) - int((labels == 0).any())
        print(f"[fidelity] {role}: {found} structures found in {seconds:.1f} s", file=sys.stderr, flush=True)
    return labels, seconds


class AnatomyGroupSegmenter(Segmenter):
    """lowdose's anatomy encoder as a segmenter of the 11 anatomy groups, slice by slice on the CPU.

    Coarser and far less validated than TotalSegmentator: the anatomy ablation benchmark uses it to see
    what training options change in denoised images; for a clinical check use TotalSegmentator.
    """

    name = "lowdose anatomy encoder"

    def __init__(self, bundle: str = "anatomy_encoder", device: str = "cpu", batch_size: int = 4):
        from ..anatomy import load_anatomy_encoder

        self.encoder = load_anatomy_encoder(bundle, device)
        self.device, self.batch_size = device, batch_size

    @property
    def class_names(self) -> dict[int, str]:
        from ..anatomy import ANATOMY_GROUPS

        return dict(ANATOMY_GROUPS)

    def segment(self, volume: CTVolume) -> np.ndarray:
        import torch

        labels = np.zeros(volume.shape, dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, volume.shape[0], self.batch_size):
                hu = torch.from_numpy(np.ascontiguousarray(volume.hu[start:start + self.batch_size, None]))
                labels[start:start + len(hu)] = self.encoder.segment(hu.to(self.device)).cpu().numpy()
        return labels

    def describe(self) -> dict:
        return {**super().describe(), **self.encoder.describe()}
