"""MONAI Label app of lowdose: denoise low-dose CT, check the anatomy was kept, fine-tune on the datastore.

Start it with ``lowdose serve`` (see README.md). The tasks are thin: they call the lowdose library.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import tempfile
import threading
from pathlib import Path

from lib.datastore import PacsDatastore, has_image, local_datastore
from lib.infers import DenoiseTask, FidelityTask, discover_models
from lib.options import AppOptions
from lib.trainers import FineTuneTask
from monailabel.interfaces.app import MONAILabelApp

import lowdose

log = logging.getLogger("lowdose.app")


class LowdoseApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        # The app runs in many-threaded processes (server, batch, training); a forked child deadlocks when
        # another thread holds a lock at that moment (seen: nnU-Net's multiprocessing.Pool inside
        # TotalSegmentator hung the fidelity task for good). Children start from a clean fork server.
        multiprocessing.set_start_method("forkserver", force=True)
        # Each child imports the main module of this process again (for the server: monailabel.main, which
        # imports MONAI and torch) and nnU-Net starts a pool of 12 per segmentation: when the fork server
        # has imported both, the children start at once (seen: minutes -> seconds).
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        multiprocessing.set_forkserver_preload(
            [main_spec.name if main_spec else "__main__", "nnunetv2.utilities.utils"]
        )
        self.options = AppOptions.from_conf(conf)
        self._models_lock = threading.Lock()
        log.info("lowdose app: models from %s, device %s", self.options.models_dir, self.options.device)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="lowdose",
            description="Low-dose CT denoising that checks, structure by structure, that the anatomy " "was kept",
            version=lowdose.__version__,
        )
        if os.environ.get("LOWDOSE_SERVER_GUARD") != "1":
            log.warning(
                "started without lowdose's guard: inference blocks the server and uploads have no size "
                "limit; start it with `lowdose serve` (or --uvicorn_app lowdose.server:app)"
            )

    # -- datastore: a local folder, or a PACS (never MONAI Label's dcmqi download, which needs the internet)

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/").strip()
            return self.init_remote_datastore()
        return local_datastore(self.studies)

    def init_remote_datastore(self):
        log.info("PACS mode: %s", self.studies)
        return PacsDatastore(self.studies, self.options.pacs_connect_timeout, self.options.pacs_read_timeout)

    def _download_dcmqi_tools(self):
        pass  # lowdose stores images, not DICOM SEG: the tools are never needed

    def has_image(self, image_id: str) -> bool:
        return has_image(self.datastore(), image_id)

    # -- tasks

    def _denoise_tasks(self) -> dict:
        return {
            f"denoise_{name}": DenoiseTask(name, bundle, self.options, datastore=self._datastore)
            for name, bundle in discover_models(self.options).items()
        }

    def init_infers(self):
        infers = self._denoise_tasks()
        if not infers:
            log.warning("no model bundle in %s: the server has nothing to run", self.options.models_dir)
        self._add_fidelity(infers)
        return infers

    def _add_fidelity(self, infers: dict) -> None:
        default = self._default_model(discover_models(self.options))
        if default and "fidelity" not in infers:
            infers["fidelity"] = FidelityTask(default, self.options, datastore=self._datastore)

    def _default_model(self, models: dict) -> str | None:
        return self.options.default_model if self.options.default_model in models else next(iter(models), None)

    def lowdose_models(self) -> list[str]:
        """The infer task names, after adding bundles written since start-up (e.g. by fine-tuning)."""
        with self._models_lock:
            for name, task in self._denoise_tasks().items():
                self._infers.setdefault(name, task)
            self._add_fidelity(self._infers)
        return sorted(name for name, task in self._infers.items() if task.is_valid())

    def init_trainers(self):
        models = discover_models(self.options)
        default = self._default_model(models)
        return {"finetune": FineTuneTask(default, models[default], self.options)} if default else {}

    def infer(self, request, datastore=None):
        """Run a task on an upload or a datastore image (a PACS series is fetched into the request's folder)."""
        image = request.get("image")
        if not request.get("uploaded"):
            # Both readers below check the id (a study of the folder, or a series the PACS holds) and raise
            # LowdoseError otherwise: a server path given as an image id never gets read.
            request = {**request, "image_id": image}  # a PACS result may be stored back
            if isinstance(self._datastore, PacsDatastore):
                into = Path(request["result_dir"]) if request.get("result_dir") else None
                request["image"] = str(self._datastore.download_series(image, into or Path(tempfile.gettempdir())))
            else:
                request["image"] = self._datastore.get_image_uri(image)
        return super().infer(request, datastore)

    def info(self):
        self.lowdose_models()
        meta = super().info()
        meta["lowdose"] = {
            "version": lowdose.__version__,
            "device": self.options.device,
            "pacs": isinstance(self._datastore, PacsDatastore),
            "max_upload_mb": self.options.max_upload_mb,
            "infer_concurrency": self.options.infer_concurrency,
            "infer_queue": self.options.infer_queue,
        }
        return meta
