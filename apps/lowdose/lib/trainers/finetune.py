"""Train task ``finetune``: the default model fine-tuned on the datastore's normal-dose studies.

Low-dose inputs are simulated from each study on the fly (lowdose.training, simulated mode); the result is
a new bundle ``<model>_finetuned`` (or the request's ``output_model``) beside the others, marked as made by
fine-tuning; a shipped model, or any model fine-tuning did not make, is never overwritten. The server
offers it as ``denoise_<name>`` as soon as it is written. The HTTP route checks the request first
(lowdose.training.finetune); the checks are repeated here, where the files are written.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from lowdose.atomic import write_text_atomically
from lowdose.errors import LowdoseError
from lowdose.training import TrainConfig, train
from lowdose.training.finetune import FINETUNE_MARK, checked_finetune_request

from ..options import AppOptions

log = logging.getLogger("lowdose.app")


class FineTuneTask(TrainTask):
    def __init__(self, model: str, bundle: Path, options: AppOptions):
        super().__init__(f"Fine-tune {model} on the datastore's normal-dose CT (low dose simulated on the fly)")
        self.model_name = model
        self.bundle = bundle
        self.options = options

    def config(self):
        return {"epochs": 2, "slices_per_epoch": 16, "patches_per_slice": 4, "patch_size": 96, "batch_size": 8,
                "learning_rate": 1e-4, "seed": 0, "output_model": f"{self.model_name}_finetuned"}

    def _run_dir(self, output_model: str) -> Path:
        return self.options.models_dir.parent / "runs" / "finetune" / output_model

    def stats(self):
        history = self._run_dir(self.config()["output_model"]) / "history.json"
        try:
            epochs = json.loads(history.read_text()).get("epochs", [])
        except (OSError, ValueError):
            return {}
        return {"total_epochs": len(epochs), "last": epochs[-1] if epochs else {}}

    def __call__(self, request, datastore):
        asked = {k: v for k, v in request.items() if k in self.config() or k == "overwrite"}
        checked = checked_finetune_request(asked, self.options.models_dir, self.model_name)
        settings = {**self.config(), **checked}
        output_model = checked["output_model"]
        images = [i for i in datastore.list_images()
                  if not (hasattr(datastore, "is_lowdose_series") and datastore.is_lowdose_series(i))]
        if not images:
            raise LowdoseError("the datastore holds no CT study to train on")
        scratch = Path(tempfile.mkdtemp(prefix="finetune-"))  # PACS series fetched for this run only
        try:
            if hasattr(datastore, "download_series"):
                paths = [str(datastore.download_series(i, scratch)) for i in images]
            else:
                paths = [datastore.get_image_uri(i) for i in images]
            return self._train(settings, output_model, paths)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _train(self, settings: dict, output_model: str, paths: list[str]) -> dict:
        meta = json.loads((self.bundle / "configs" / "metadata.json").read_text())
        estimator = meta.get("dose_estimator") or None
        config = TrainConfig.from_dict({
            "name": output_model,
            "output_dir": str(self._run_dir(output_model)),
            "seed": int(settings["seed"]),
            "device": self.options.device,
            "init_bundle": str(self.bundle),
            "data": {"mode": "simulated", "train": paths, "validation": [],
                     "patch_size": int(settings["patch_size"]), "patches_per_slice": int(settings["patches_per_slice"]),
                     "slices_per_epoch": int(settings["slices_per_epoch"])},
            "network": {"name": meta["network"]["name"], "kwargs": meta["network"]["kwargs"],
                        "dose_estimator": estimator is not None,
                        "dose_estimator_kwargs": (estimator or {}).get("kwargs", {})},
            "optim": {"epochs": int(settings["epochs"]), "batch_size": int(settings["batch_size"]),
                      "learning_rate": float(settings["learning_rate"])},
        }, source="finetune request")
        log.info("fine-tuning %s on %d studies -> %s", self.model_name, len(paths), output_model)
        bundle = self.options.models_dir / output_model
        history = train(config, progress=False, bundle_dir=bundle)
        metadata_path = bundle / "configs" / "metadata.json"
        metadata = json.loads(metadata_path.read_text())
        metadata["lowdose_created_by"] = FINETUNE_MARK  # only such a bundle may be overwritten by a later request
        write_text_atomically(metadata_path, json.dumps(metadata, indent=2))
        return {"model": output_model, "source_model": self.model_name, "studies": len(paths),
                "epochs": history.get("epochs", [])}
