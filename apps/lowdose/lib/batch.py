"""Batch inference over the datastore: every study once, never lowdose's own derived series."""

from __future__ import annotations

import torch
from monailabel.interfaces.tasks.batch_infer import BatchInferTask


class DenoiseBatchInfer(BatchInferTask):
    def get_images(self, request, datastore):
        images = super().get_images(request, datastore)
        if hasattr(datastore, "is_lowdose_series"):
            images = [i for i in images if not datastore.is_lowdose_series(i)]
        return images

    def __call__(self, request, datastore, infer):
        request = dict(request)
        if not torch.cuda.is_available():
            # MONAI Label 0.8.5 spreads images over the GPUs by default and divides by zero without one.
            request["multi_gpu"] = False
            request["device"] = "cpu"
        return super().__call__(request, datastore, infer)
