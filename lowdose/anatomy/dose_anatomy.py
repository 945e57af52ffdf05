"""A trained DA-CLIP bundle (``DoseAnatomyEncoder``) loaded once and read on CT volumes in HU: the dose and
region embeddings a denoiser is conditioned on, the dose fraction and the body region of each slice."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..bundle import Bundle, hu_to_input, load_checkpoint
from ..errors import LowdoseError
from ..networks import build_network
from ..networks.da_clip import REGIONS, DoseAnatomyEmbedding, DoseAnatomyEncoder
from ..volume import CTVolume

KIND = "da_clip"  # the bundle's lowdose_kind


class DoseAnatomyReader:
    """A DA-CLIP bundle's encoder in eval mode; ``embed`` reads HU slices, ``read_volume`` a whole CTVolume."""

    def __init__(self, model: str | Path, device: str | torch.device = "cpu"):
        bundle = Bundle.find(model)
        if bundle.metadata.get("lowdose_kind") != KIND:
            raise LowdoseError(
                f"{bundle.folder}: not a DA-CLIP bundle (it is a {bundle.metadata.get('lowdose_kind', 'denoiser')})"
            )
        self.network = cast(DoseAnatomyEncoder, build_network(bundle.network_name, **bundle.network_kwargs))
        try:
            self.network.load_state_dict(load_checkpoint(bundle.weights)["network"])
        except (RuntimeError, KeyError) as exc:
            raise LowdoseError(f"{bundle.folder}: damaged DA-CLIP bundle ({str(exc).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.network.eval().to(self.device)
        self.normalisation, self.bundle = bundle.normalisation, bundle
        self.regions: tuple[str, ...] = tuple(bundle.metadata.get("regions") or REGIONS)

    @torch.inference_mode()
    def embed(self, hu: np.ndarray) -> DoseAnatomyEmbedding:
        """The encoder's result for slices in HU ``[B, H, W]`` (or one slice ``[H, W]``), on the CPU."""
        hu = np.asarray(hu, dtype=np.float32)
        x = torch.from_numpy(hu_to_input(hu[None] if hu.ndim == 2 else hu, self.normalisation))[:, None]
        out = self.network(x.to(self.device))
        return DoseAnatomyEmbedding(
            *(t.cpu() for t in (out.dose_embedding, out.region_embedding, out.log_dose, out.region_logits))
        )

    def read_volume(self, volume: CTVolume, batch_size: int = 4) -> dict:
        """Per slice of ``volume``: dose fraction and region; and the volume's median dose fraction."""
        doses, regions = [], []
        for first in range(0, volume.shape[0], batch_size):
            out = self.embed(volume.hu[first : first + batch_size])
            doses += out.dose_fraction().tolist()
            regions += [self.regions[int(i)] for i in out.region_logits.argmax(1)]
        return {"dose_fraction": float(np.median(doses)), "slice_dose_fractions": doses, "slice_regions": regions}
