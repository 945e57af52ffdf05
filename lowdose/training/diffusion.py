"""The residual diffusion objective (our DA-Diff, after RDDM): each training patch's residual ``x_LD - x_ND`` is
noised to a random time and the network predicts it; validation samples whole slices as the inference engine does.

Everything else is the denoising objective's: the pair sampler's patches, the windowed SSIM term, the dose
estimator trained on the same patches, the validation figures (``val_psnr_abdomen``, ...), the epoch record.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from ..errors import LowdoseError
from ..networks.dose_diffusion import DoseDiffusion
from .denoising import DenoisingObjective, PairBatch

# L1 by default, as RDDM and FoundDiff train: the residual is the low-dose noise, whose streaks give it heavy
# tails, and L1 does not let those outliers pull the prediction towards over-smoothing.
PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


def is_diffusion(network: torch.nn.Module) -> bool:
    """Whether a network trains with the diffusion objective (a residual diffusion denoiser)."""
    return isinstance(network, DoseDiffusion)


class DiffusionObjective(DenoisingObjective):
    """A denoising objective whose prediction is one diffusion step: the time ``t`` is drawn uniformly in (0, 1]
    per patch (continuous time: 1, 2 and 4 sampling steps visit 1, 1/2, 1/4, 3/4, all trained times), the noisy
    state made by the network's forward process, and the loss taken on the predicted residual (``loss``: ``l1``
    or ``l2``); the SSIM term (``optim.ssim_weight``) is on the normal-dose slice it implies.

    Takes the denoising objective's arguments, plus ``loss``.
    """

    def __init__(self, *args, loss: str = "l1", **kwargs):
        super().__init__(*args, **kwargs)
        if not is_diffusion(self.model.network):
            raise LowdoseError(
                f"the diffusion objective trains dose_diffusion, not {type(self.model.network).__name__}"
            )
        if loss not in PIXEL_LOSSES:
            raise LowdoseError(f"diffusion.loss must be one of {', '.join(PIXEL_LOSSES)}, not {loss!r}")
        self.pixel_loss = PIXEL_LOSSES[loss]

    def predict(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        network = cast(DoseDiffusion, self.model.network)
        centre = network.centre(batch.low)
        residual = centre - batch.normal
        t = 1 - torch.rand(centre.shape[0], device=centre.device, dtype=centre.dtype)  # (0, 1]
        state = network.noisy_state(centre, residual, t, torch.randn_like(residual))
        dose, regions = network.conditions(
            centre.shape[0],
            centre,
            batch.dose if self.model.conditioned else None,
            batch.region if network.region_classes else None,
        )
        predicted = network.predict_residual(batch.low, state, t, dose, regions)
        return centre - predicted, self.pixel_loss(predicted, residual)
