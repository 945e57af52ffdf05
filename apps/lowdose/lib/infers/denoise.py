"""Infer task ``denoise_<model>``: a CT in, the denoised CT out (HU, same geometry), dose in the result JSON.

In PACS mode a study that came from the PACS is also stored back as a new derived DICOM series in its
study (new UIDs, description naming model and dose; the original is untouched).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lowdose import save_ct
from lowdose.bundle import Bundle
from lowdose.dose import parse_dose
from lowdose.ensemble import ENSEMBLE_SIZES
from lowdose.names import is_safe_name
from lowdose.networks.dose_diffusion import DEFAULT_SAMPLING_STEPS, MAX_SAMPLING_STEPS
from lowdose.strength import DEFAULT_STRENGTH, parse_strength

from ..datastore import PacsDatastore
from ..inputs import read_ct
from ..models import denoiser
from ..options import AppOptions

log = logging.getLogger("lowdose.app")

OUTPUT_FORMATS = ("nifti", "dicom")


def discover_models(options: AppOptions) -> dict[str, Bundle]:
    """The denoising bundles served: those of ``options.models_dir`` (named by ``options.models`` when given) whose
    names a client can send; name -> ``Bundle``. Other kinds of bundle (the anatomy encoder) are left out."""
    found = {name: bundle for name, bundle in Bundle.all_in(options.models_dir).items() if is_safe_name(name)}
    if options.models:
        missing = [m for m in options.models if m not in found]
        if missing:
            log.warning("models not found in %s: %s", options.models_dir, ", ".join(missing))
        found = {name: bundle for name, bundle in found.items() if name in options.models}
    return found


def sampling_steps(bundle: Bundle) -> int | None:
    """The sampling steps a diffusion model samples with unless a request asks for others (its bundle's);
    None for a model that is not a diffusion model (it takes no steps)."""
    if bundle.network_name != "dose_diffusion":
        return None
    return int(bundle.network_kwargs.get("sampling_steps", DEFAULT_SAMPLING_STEPS))


def parse_steps(request: dict, model: str, bundle: Bundle) -> int | None:
    """A request's ``steps`` for ``model``: None (the model's own), or an integer from 1 to 4 for a diffusion
    model; ValueError (400) for anything else, before any CT is read."""
    steps = request.get("steps")
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_SAMPLING_STEPS:
        raise ValueError(
            f"steps must be an integer from 1 to {MAX_SAMPLING_STEPS} (a diffusion model's sampling steps): "
            f"{steps!r}"
        )
    if sampling_steps(bundle) is None:
        raise ValueError(f"model {model} is not a diffusion model: it takes no sampling steps")
    return steps


def parse_ensemble_request(request: dict) -> int:
    """A request's ``ensemble``: 1 (default), 2, 4 or 8 in-plane symmetries averaged (lowdose.ensemble); an integer
    only, so a client cannot ask for a long loop or smuggle another type; ValueError (400) before any CT is read."""
    size = request.get("ensemble", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size not in ENSEMBLE_SIZES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}: {size!r}")
    return size


class DenoiseTask(InferTask):
    """Denoise with one lowdose model bundle (loaded on first use, then kept)."""

    def __init__(self, name: str, bundle: Bundle, options: AppOptions, datastore=None):
        psnr = bundle.validation.get("val_psnr_abdomen")
        figure = f"; validation PSNR {psnr:.2f} dB" if psnr is not None else ""
        steps = sampling_steps(bundle)
        super().__init__(
            type=InferType.OTHERS,  # image to image: MONAI Label has no type for it
            labels=None,
            dimension=3,
            description=f"Low-dose CT denoising with {name} ({bundle.network_name}{figure}); "
            "CT in Hounsfield units in, denoised CT out, same geometry",
            config={
                "dose": "auto",
                "strength": DEFAULT_STRENGTH,
                "ensemble": 1,
                "output_dtype": options.output_dtype,
                "output_format": "nifti",
                "store_to_pacs": options.store_to_pacs,
                **({} if steps is None else {"steps": steps}),  # only a diffusion model takes steps
            },
        )
        self.model_name = name
        self.bundle = bundle
        self.options = options
        self.datastore = datastore

    def is_valid(self) -> bool:
        return self.bundle.weights.is_file()

    def info(self):
        info = super().info()
        info["lowdose"] = {
            "task": "denoise",
            "model": self.model_name,
            "version": self.bundle.version,
            "network": self.bundle.network,
            "dose_aware": self.bundle.dose_estimator is not None,
            "sampling_steps": sampling_steps(self.bundle),  # a diffusion model's default steps; None: no steps
            "validation": self.bundle.validation,
        }
        return info

    def __call__(self, request):
        dose = parse_dose(request.get("dose", "auto"))
        strength = parse_strength(request.get("strength", DEFAULT_STRENGTH))
        steps = parse_steps(request, self.model_name, self.bundle)
        ensemble = parse_ensemble_request(request)
        dtype = str(request.get("output_dtype", self.options.output_dtype))
        if dtype not in ("int16", "float32"):
            raise ValueError(f"output_dtype must be int16 or float32; got {dtype!r}")
        output_format = str(request.get("output_format", "nifti"))
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}")

        volume = read_ct(request["image"], self.options.input_limits())
        model = denoiser(self.bundle.folder, self.options.device, self.options.batch_size)
        result = model(volume, dose=dose, strength=strength, steps=steps, ensemble=ensemble)
        denoised, description = result.volume, result.description
        if not denoised.is_regular_grid:
            output_format = "dicom"  # tilted or irregular slices have no NIfTI grid; DICOM keeps each position

        work = Path(request["result_dir"]) if request.get("result_dir") else None
        work = Path(tempfile.mkdtemp(prefix="lowdose-result-", dir=work))
        if output_format == "nifti":
            out = save_ct(denoised, work / "denoised.nii.gz", description=description, dtype=dtype)
        else:
            series = save_ct(denoised, work / "denoised_dicom", description=description)
            out = _zip_folder(series, work / "denoised_dicom.zip")

        summary = {
            "task": "denoise",
            "model": self.model_name,
            "model_version": result.model_version,
            "weights_sha256": result.weights_sha256,  # the exact weights, whatever the bundle is called
            "dose_fraction": result.dose_fraction,
            "dose_source": result.dose_source,
            "dose_detail": result.dose_detail,
            "strength": result.strength,
            "steps": sampling_steps(self.bundle) if steps is None else steps,  # None: not a diffusion model
            "ensemble": result.ensemble,
            "description": description,
            "seconds": result.seconds,
            "device": result.device,
            "shape_zyx": list(denoised.shape),
            "spacing_mm": list(denoised.spacing_mm),
            "origin_mm": list(denoised.origin_mm),
            "direction": np.asarray(denoised.direction).round(6).tolist(),
            "hu_range": [float(np.min(denoised.hu)), float(np.max(denoised.hu))],
            "output": {
                "format": output_format,
                "dtype": dtype if output_format == "nifti" else "int16",
                "filename": out.name,
            },
        }
        if isinstance(self.datastore, PacsDatastore) and request.get("image_id") and not request.get("uploaded"):
            if _true(request.get("store_to_pacs", self.options.store_to_pacs)):
                series = save_ct(denoised, work / "pacs_series", description=description)
                summary["pacs"] = self.datastore.store_series(series)
                shutil.rmtree(series, ignore_errors=True)
            else:
                summary["pacs"] = {"stored": False}
        if not request.get("result_dir"):  # batch inference: MONAI Label removes the file, not its folder
            moved = Path(tempfile.mkstemp(prefix="lowdose-", suffix="".join(out.suffixes))[1])
            shutil.move(out, moved)
            shutil.rmtree(work, ignore_errors=True)
            out = moved
        log.info(
            "denoised %s with %s: %s",
            "upload" if request.get("uploaded") else request.get("image_id", "image"),
            self.model_name,
            {k: summary[k] for k in ("dose_fraction", "dose_source", "seconds")},
        )
        return str(out), summary


def _true(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in sorted(folder.iterdir()):
            archive.write(f, f"{folder.name}/{f.name}")
    shutil.rmtree(folder, ignore_errors=True)
    return target
