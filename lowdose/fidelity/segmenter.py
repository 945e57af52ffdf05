"""Segmenters for the fidelity check: a CT volume in, a label map on the same voxel grid out.

``TotalSegmentatorSegmenter`` runs TotalSegmentator (task ``total``, 117 structures) through its Python
API on the user's own weights, offline: it never downloads and switches usage statistics off.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ..bundle import load_checkpoint, nnunet_checkpoint_globals
from ..totalseg import (
    SegmenterError,
    TotalSegmentatorWeightsError,
    check_model_folder,
    ensure_usage_statistics_off,
    required_model_folders,
    total_class_names,
    totalsegmentator_home,
    totalsegmentator_weights_dir,
)
from ..volume import CTVolume

if TYPE_CHECKING:
    from ..anatomy.encoders import LowdoseAnatomyEncoder

__all__ = [
    "LPS_TO_RAS",
    "AnatomyGroupSegmenter",
    "Segmenter",
    "SegmenterError",
    "TotalSegmentatorSegmenter",
    "TotalSegmentatorWeightsError",
    "ct_to_nifti",
    "ensure_usage_statistics_off",
    "nifti_to_labels",
    "required_model_folders",
    "resolve_device",
    "timed_segment",
    "total_class_names",
    "totalsegmentator_home",
    "totalsegmentator_weights_dir",
]

# Checkpoints (path, mtime) already proven readable without arbitrary unpickling.
_SAFE_CHECKPOINTS: set[tuple[str, int]] = set()

# LPS (DICOM, SimpleITK, CTVolume) to RAS (NIfTI as nibabel and TotalSegmentator read it).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def ct_to_nifti(volume: CTVolume):
    """The CT as a nibabel image in real HU with its geometry (RAS affine), as TotalSegmentator reads it."""
    import nibabel as nib  # 0.5 s to import, only for handing a CT to TotalSegmentator

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
        raise SegmenterError(
            f"the segmentation came back on another grid ({data.shape}, affine "
            f"{np.round(image.affine, 3).tolist()}) than the CT ({volume.shape[::-1]})"
        )
    return np.ascontiguousarray(np.rint(data).astype(np.uint8).transpose(2, 1, 0))


# ------------------------------------------------------------------------------------ TotalSegmentator


def resolve_device(device: str) -> str:
    """lowdose's device names (auto, cpu, cuda, cuda:N; gpu is accepted) as TotalSegmentator's (cpu, gpu, gpu:N)."""
    import torch  # 4 s to import: `lowdose --help` loads this module (through lowdose.fidelity.command)

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

    def __init__(
        self,
        fast: bool = True,
        device: str = "auto",
        weights_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ):
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
        for relative in required_model_folders(self.fast):
            folder = check_model_folder(weights, relative, self.fast, source)
            checkpoint = folder / "fold_0" / "checkpoint_final.pth"
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
            ts_version, nnunet_version = version("TotalSegmentator"), version("nnunetv2")
        except Exception:  # metadata missing in an odd install: the report still works
            ts_version = nnunet_version = "unknown"
        weights, source = self._weights_dir()
        return {
            "name": self.name,
            "version": ts_version,
            "nnunetv2_version": nnunet_version,
            "task": "total",
            "mode": "fast" if self.fast else "full",
            "resolution_mm": 3.0 if self.fast else 1.5,
            "models": required_model_folders(self.fast),
            "weights_dir": str(weights),
            "weights_dir_from": source,
            "device": self._device or self.device_requested,
            "classes": len(self.class_names),
        }

    def segment(self, volume: CTVolume) -> np.ndarray:
        weights = self.check_weights()
        if self._device is None:
            self._device = resolve_device(self.device_requested)
        ensure_usage_statistics_off()
        image = ct_to_nifti(volume)
        with _environment(TOTALSEG_WEIGHTS_PATH=str(weights)), _stdout_to_stderr(self.progress):
            from totalsegmentator.python_api import totalsegmentator  # loads nnU-Net and torch (seconds)

            # One thread for resampling and saving: on a CPU the work is in the network, and more
            # threads only add worker processes.
            result = totalsegmentator(
                image,
                None,
                ml=True,
                task="total",
                fast=self.fast,
                device=self._device,
                quiet=not self.progress,
                nr_thr_resamp=1,
                nr_thr_saving=1,
            )
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


def timed_segment(
    segmenter: Segmenter, volume: CTVolume, role: str, progress: bool, step: str = ""
) -> tuple[np.ndarray, float]:
    """Segment one volume with progress lines on stderr; returns the label map and seconds taken."""
    start = time.perf_counter()
    if progress:
        print(
            f"[fidelity] {step}segmenting {role} ({volume.describe()}) with {segmenter.name} ...",
            file=sys.stderr,
            flush=True,
        )
    labels = np.asarray(segmenter.segment(volume))
    seconds = time.perf_counter() - start
    if labels.shape != volume.shape:
        raise SegmenterError(
            f"{segmenter.name} returned a label map of shape {labels.shape} for a CT of shape " f"{volume.shape}"
        )
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
        from ..anatomy import load_anatomy_encoder  # torch (4 s): `lowdose --help` loads this module

        # A bundle (name or folder) loads as lowdose's own encoder, the one that segments.
        self.encoder = cast("LowdoseAnatomyEncoder", load_anatomy_encoder(bundle, device))
        self.device, self.batch_size = device, batch_size

    @property
    def class_names(self) -> dict[int, str]:
        from ..anatomy import ANATOMY_GROUPS  # the anatomy package imports torch (4 s), as above

        return dict(ANATOMY_GROUPS)

    def segment(self, volume: CTVolume) -> np.ndarray:
        import torch  # 4 s to import: `lowdose --help` loads this module

        labels = np.zeros(volume.shape, dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, volume.shape[0], self.batch_size):
                hu = torch.from_numpy(np.ascontiguousarray(volume.hu[start : start + self.batch_size, None]))
                labels[start : start + len(hu)] = self.encoder.segment(hu.to(self.device)).cpu().numpy()
        return labels

    def describe(self) -> dict:
        return {**super().describe(), **self.encoder.describe()}
