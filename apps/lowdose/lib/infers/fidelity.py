"""Infer task ``fidelity``: denoise a low-dose CT, then check structure by structure that the anatomy was kept.

It calls ``lowdose.fidelity.check_fidelity`` (TotalSegmentator ``total``, 117 structures, on the low-dose and
the denoised scan; optionally on a normal-dose reference from the datastore). The JSON out is the report
(fidelity.json); with ``labels: true`` the image out is a zip of the report, the label maps and the
denoised CT.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lowdose import save_ct
from lowdose.dose import parse_dose
from lowdose.fidelity import TotalSegmentatorSegmenter, check_fidelity
from lowdose.fidelity.report import json_safe
from lowdose.strength import DEFAULT_STRENGTH, parse_strength

from ..inputs import read_ct
from ..models import denoiser
from ..options import AppOptions
from .denoise import _true, discover_models, parse_ensemble_request, parse_steps, sampling_steps

log = logging.getLogger("lowdose.app")
# Report fields that hold server paths, never sent to a client.
PRIVATE_KEYS = {"path", "weights_dir", "weights_dir_from"}


class FidelityTask(InferTask):
    def __init__(self, default_model: str, options: AppOptions, datastore=None):
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="Denoise a low-dose CT and check, structure by structure (TotalSegmentator, 117 "
            "structures), that the anatomy was kept; JSON report, label maps on request",
            config={
                "denoise_model": default_model,
                "dose": "auto",
                "strength": DEFAULT_STRENGTH,
                "ensemble": 1,
                "labels": False,
                "reference_image": "",
                "fast": True,
            },
        )
        self.default_model = default_model
        self.options = options
        self.datastore = datastore

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        models = discover_models(self.options)  # bundles written since start-up (fine-tuning) count too
        name = str(request.get("denoise_model") or self.default_model)
        if name not in models:
            raise ValueError(f"denoise_model {name!r} is not served here; available: {', '.join(models)}")
        dose = parse_dose(request.get("dose", "auto"))
        strength = parse_strength(request.get("strength", DEFAULT_STRENGTH))
        steps = parse_steps(request, name, models[name])
        ensemble = parse_ensemble_request(request)
        reference = None
        if request.get("reference_image"):
            reference_id = str(request["reference_image"])
            if self.datastore is None or reference_id not in self.datastore.list_images():
                raise ValueError(f"reference_image {reference_id!r} is not an image of the datastore")
            reference = _anonymous(read_ct(self._fetch(reference_id, request), self.options.input_limits()))

        original = _anonymous(read_ct(request["image"], self.options.input_limits()))
        model = denoiser(models[name].folder, self.options.device, self.options.batch_size)
        denoised = model(original, dose=dose, strength=strength, steps=steps, ensemble=ensemble)
        work = Path(tempfile.mkdtemp(prefix="lowdose-fidelity-", dir=request.get("result_dir")))
        segmenter = _Segmenter(fast=_true(request.get("fast", True)), device=self.options.device, progress=False)
        fidelity = check_fidelity(
            original,
            denoised.volume,
            reference=reference,
            out_dir=work / "fidelity",
            segmenter=segmenter,
            progress=False,
        )
        report = _without_private(json_safe(fidelity.to_json()))
        report["denoising"] = {
            "model": name,
            "dose_fraction": denoised.dose_fraction,
            "dose_source": denoised.dose_source,
            "strength": denoised.strength,
            "steps": sampling_steps(models[name]) if steps is None else steps,  # None: not a diffusion model
            "ensemble": denoised.ensemble,
            "description": denoised.description,
        }
        log.info("fidelity of %s: %s", name, fidelity.verdict)
        if not _true(request.get("labels", False)):
            if not request.get("result_dir"):
                shutil.rmtree(work, ignore_errors=True)
            return None, report
        save_ct(
            denoised.volume,
            work / "fidelity" / "denoised.nii.gz",
            description=denoised.description,
            dtype=self.options.output_dtype,
        )
        archive = work / "fidelity.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted((work / "fidelity").iterdir()):
                if f.name == "fidelity.json":
                    continue  # rewritten below without server paths
                z.write(f, f"fidelity/{f.name}")
            z.writestr("fidelity/fidelity.json", json.dumps(report, indent=2, allow_nan=False))
        if not request.get("result_dir"):  # batch inference: MONAI Label removes the file, not its folder
            moved = Path(tempfile.mkstemp(prefix="lowdose-", suffix=".zip")[1])
            os.replace(archive, moved)
            shutil.rmtree(work, ignore_errors=True)
            archive = moved
        return str(archive), report

    def _fetch(self, image_id: str, request) -> str:
        """A datastore image's local path; a PACS series goes into this request's folder, removed with it."""
        if hasattr(self.datastore, "download_series") and request.get("result_dir"):
            return str(self.datastore.download_series(image_id, Path(request["result_dir"])))
        return self.datastore.get_image_uri(image_id)


class _Segmenter(TotalSegmentatorSegmenter):
    """TotalSegmentator, described without the server's weights folder (the report goes to a client)."""

    def describe(self) -> dict:
        return {k: v for k, v in super().describe().items() if k not in PRIVATE_KEYS}


def _anonymous(volume):
    """The volume without the server path it was read from (the report names its inputs)."""
    return volume.with_hu(volume.hu, path=None)


def _without_private(value):
    if isinstance(value, dict):
        return {k: _without_private(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if isinstance(value, list):
        return [_without_private(v) for v in value]
    return value
