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

from lowdose.bundle import Bundle
from lowdose.errors import LowdoseError
from lowdose.training import train
from lowdose.training.finetune import DEFAULT_SETTINGS, FINETUNE_MARK, checked_finetune_request, finetune_config

from ..options import AppOptions

log = logging.getLogger("lowdose.app")


class FineTuneTask(TrainTask):
    def __init__(self, model: str, bundle: Bundle, options: AppOptions):
        super().__init__(f"Fine-tune {model} on the datastore's normal-dose CT (low dose simulated on the fly)")
        self.model_name = model
        self.bundle = bundle
        self.options = options

    def config(self):
        return {**DEFAULT_SETTINGS, "output_model": f"{self.model_name}_finetuned"}

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
        images = [
            i
            for i in datastore.list_images()
            if not (hasattr(datastore, "is_lowdose_series") and datastore.is_lowdose_series(i))
        ]
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
        config = finetune_config(self.bundle, paths, settings, self._run_dir(output_model), self.options.device)
        log.info("fine-tuning %s on %d studies -> %s", self.model_name, len(paths), output_model)
        folder = self.options.models_dir / output_model
        history = train(config, progress=False, bundle_dir=folder)
        # Only a bundle marked as made by fine-tuning may be overwritten by a later request.
        Bundle.read(folder).with_metadata(lowdose_created_by=FINETUNE_MARK)
        return {
            "model": output_model,
            "source_model": self.model_name,
            "studies": len(paths),
            "epochs": history.get("epochs", []),
        }
