"""Infer task ``denoise_<model>``: a CT in, the denoised CT out (HU, same geometry), dose in the result JSON.

In PACS mode a study that came from the PACS is also stored back as a new derived DICOM series in its
study (new UIDs, description naming model and dose; the original is untouched).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lowdose import save_ct
from lowdose.bundle import bundle_kind
from lowdose.dose import parse_dose

from ..datastore import PacsDatastore
from ..inputs import read_ct
from ..models import denoiser
from ..options import AppOptions

log = logging.getLogger("lowdose.app")

OUTPUT_FORMATS = ("nifti", "dicom")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def discover_models(options: AppOptions) -> dict[str, Path]:
    """Denoising bundles in ``options.models_dir`` (those named by ``options.models`` when given): name -> folder.

    Other kinds of bundle (the anatomy encoder) and folders whose name a client could not send are left out.
    """
    folder = options.models_dir
    found = {}
    if folder.is_dir():
        for bundle in sorted(folder.iterdir()):
            if ((bundle / "configs" / "metadata.json").is_file() and (bundle / "models" / "model.pt").is_file()
                    and bundle_kind(bundle) == "denoiser" and MODEL_NAME.fullmatch(bundle.name)):
                found[bundle.name] = bundle
    if options.models:
        missing = [m for m in options.models if m not in found]
        if missing:
            log.warning("models not found in %s: %s", folder, ", ".join(missing))
        found = {name: path for name, path in found.items() if name in options.models}
    return found


class DenoiseTask(InferTask):
    """Denoise with one lowdose model bundle (loaded on first use, then kept)."""

    def __init__(self, name: str, bundle: Path, options: AppOptions, datastore=None):
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        validation = meta.get("validation") or {}
        psnr = validation.get("val_psnr_abdomen")
        figure = f"; validation PSNR {psnr:.2f} dB" if psnr is not None else ""
        super().__init__(
            type=InferType.OTHERS,  # image to image: MONAI Label has no type for it
            labels=None,
            dimension=3,
            description=f"Low-dose CT denoising with {name} ({meta.get('network', {}).get('name', '?')}{figure}); "
                        "CT in Hounsfield units in, denoised CT out, same geometry",
            config={"dose": "auto", "output_dtype": options.output_dtype, "output_format": "nifti",
                    "store_to_pacs": options.store_to_pacs},
        )
        self.model_name = name
        self.bundle = bundle
        self.options = options
        self.datastore = datastore
        self.metadata = meta

    def is_valid(self) -> bool:
        return (self.bundle / "models" / "model.pt").is_file()

    def info(self):
        info = super().info()
        info["lowdose"] = {"task": "denoise", "model": self.model_name, "network": self.metadata.get("network"),
                           "dose_aware": bool(self.metadata.get("dose_estimator")),
                           "validation": self.metadata.get("validation", {})}
        return info

    def __call__(self, request):
        dose = parse_dose(request.get("dose", "auto"))
        dtype = str(request.get("output_dtype", self.options.output_dtype))
        if dtype not in ("int16", "float32"):
            raise ValueError(f"output_dtype must be int16 or float32; got {dtype!r}")
        output_format = str(request.get("output_format", "nifti"))
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}")

        volume = read_ct(request["image"], self.options.input_limits())
        model = denoiser(self.bundle, self.options.device, self.options.batch_size)
        result = model(volume, dose=dose)
        description = result.metadata["lowdose_description"]
        if not result.is_regular_grid:
            output_format = "dicom"  # tilted or irregular slices have no NIfTI grid; DICOM keeps each position

        work = Path(request["result_dir"]) if request.get("result_dir") else None
        work = Path(tempfile.mkdtemp(prefix="lowdose-result-", dir=work))
        if output_format == "nifti":
            out = save_ct(result, work / "denoised.nii.gz", description=description, dtype=dtype)
        else:
            series = save_ct(result, work / "denoised_dicom", description=description)
            out = _zip_folder(series, work / "denoised_dicom.zip")

        summary = {
            "task": "denoise",
            "model": self.model_name,
            "dose_fraction": result.metadata["lowdose_dose_fraction"],
            "dose_source": result.metadata["lowdose_dose_source"],
            "description": description,
            "seconds": result.metadata.get("lowdose_seconds"),
            "device": str(model.device),
            "shape_zyx": list(result.shape),
            "spacing_mm": list(result.spacing_mm),
            "origin_mm": list(result.origin_mm),
            "direction": np.asarray(result.direction).round(6).tolist(),
            "hu_range": [float(np.min(result.hu)), float(np.max(result.hu))],
            "output": {"format": output_format, "dtype": dtype if output_format == "nifti" else "int16",
                       "filename": out.name},
        }
        if isinstance(self.datastore, PacsDatastore) and request.get("image_id") and not request.get("uploaded"):
            if _true(request.get("store_to_pacs", self.options.store_to_pacs)):
                series = save_ct(result, work / "pacs_series", description=description)
                summary["pacs"] = self.datastore.store_series(series)
                shutil.rmtree(series, ignore_errors=True)
            else:
                summary["pacs"] = {"stored": False}
        if not request.get("result_dir"):  # batch inference: MONAI Label removes the file, not its folder
            moved = Path(tempfile.mkstemp(prefix="lowdose-", suffix="".join(out.suffixes))[1])
            shutil.move(out, moved)
            shutil.rmtree(work, ignore_errors=True)
            out = moved
        log.info("denoised %s with %s: %s", "upload" if request.get("uploaded") else request.get("image_id", "image"),
                 self.model_name, {k: summary[k] for k in ("dose_fraction", "dose_source", "seconds")})
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
