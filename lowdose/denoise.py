"""The inference engine: a trained model applied to a whole CTVolume, slab by slab, in bounded memory.

``Denoiser`` loads a bundle once and is reused for many volumes (as nnU-Net's predictor is); ``denoise``
is the one-call form. Both return a ``DenoiseResult``: the denoised volume with the dose used and how it
was obtained, the model, the time taken and the device. HU, geometry and metadata go through unchanged;
voxels the network must not touch (padding outside the field of view, values beyond its HU range such as
metal) keep their values.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
import types

import numpy as np
import torch
from tqdm.auto import tqdm

from .bundle import DEFAULT_MODEL, hu_to_input, load_bundle, output_to_hu
from .device import pick_device
from .dose import read_dose_from_noise
from .ensemble import parse_ensemble, self_ensemble
from .errors import LowdoseError
from .slabs import body_slices, slab
from .strength import parse_strength, strength_label
from .volume import CTVolume

# Slices used to estimate a volume's dose: evenly spread over the body, median of their estimates.
DOSE_ESTIMATE_SLICES = 8
# How the dose fraction of a result was obtained.
ESTIMATED, GIVEN, GIVEN_NOT_USED, NOT_USED = "estimated", "given", "given (model is not dose-conditioned)", "not used"


@dataclasses.dataclass(frozen=True)
class DenoiseResult:
    """A denoised CT and how it was made.

    Attributes:
        volume: the denoised CT (HU; the input's geometry and metadata).
        model: the name of the model that denoised it.
        dose_fraction: the dose fraction of the input the model was given or estimated (None when the model
            takes no dose and none was given).
        dose_source: ``estimated`` (read from the image by the model's dose estimator), ``given``,
            ``given (model is not dose-conditioned)`` or ``not used``.
        seconds: wall time of denoising, dose estimate included.
        device: the torch device it ran on (``cpu``, ``cuda:0``, ...).
        strength: the fraction of the network's noise removal applied (1 = all; lowdose.strength).
        dose_detail: how the dose was obtained, in words (e.g. ``read from the in-plane noise of 8 slices
            (median; slices 0.22 to 0.27)``).
        ensemble: in-plane symmetries whose answers were averaged (lowdose.ensemble; 1 = the network alone).
        model_version: the model bundle's version (its metadata's ``version``), named in the series description.
        weights_sha256: the SHA-256 of the weights that denoised it, so a result can be traced to them.
    """

    volume: CTVolume
    model: str
    dose_fraction: float | None
    dose_source: str
    seconds: float
    device: str
    strength: float = 1.0
    dose_detail: str = ""
    ensemble: int = 1
    model_version: str = ""
    weights_sha256: str = ""

    @property
    def dose_estimated(self) -> bool:
        return self.dose_source == ESTIMATED

    @property
    def description(self) -> str:
        """The series description of the derived series, e.g. ``lowdose denoised (dose_unet 8.0.0, dose 0.25
        given)``."""
        version_text = f" {self.model_version}" if self.model_version else ""
        dose_text = "" if self.dose_fraction is None else f", dose {self.dose_fraction:.3g} {self.dose_source}"
        strength_text = "" if self.strength >= 1.0 else f", strength {strength_label(self.strength)}"
        ensemble_text = "" if self.ensemble == 1 else f", {self.ensemble}-fold self-ensemble"
        return f"lowdose denoised ({self.model}{version_text}{dose_text}{strength_text}{ensemble_text})"

    def summary(self) -> dict:
        """The plain fields (JSON-ready): model and its version and weights, dose, description, seconds, device."""
        return {
            "model": self.model,
            "model_version": self.model_version,
            "weights_sha256": self.weights_sha256,
            "dose_fraction": self.dose_fraction,
            "dose_source": self.dose_source,
            "dose_detail": self.dose_detail,
            "description": self.description,
            "seconds": self.seconds,
            "device": self.device,
            "strength": self.strength,
            "ensemble": self.ensemble,
        }


class Denoiser:
    """A loaded denoising model, ready for many volumes.

    Args:
        model: a model name under ``models/`` or a bundle folder.
        device: ``auto`` (GPU when there is one), ``cpu`` or ``cuda``.
        batch_size: slices per forward pass; 0 picks one for the device (1 on a CPU, 8 on a GPU).
        steps: sampling steps of a diffusion model (``dose_diffusion``, 1 to 4); None: the bundle's own.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", batch_size: int = 0, steps: int | None = None):
        self.device = pick_device(device)
        if self.device.type == "cpu":
            # The cores this process may use (a container's or taskset's limit), not the machine's.
            torch.set_num_threads(
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
        self.model = load_bundle(model, self.device)
        if int(batch_size) < 0:
            raise LowdoseError(f"batch size must be 0 (automatic) or more; got {batch_size}")
        # On a CPU one slice per pass is fastest: 512x512x100 in 11-13 s against 18-30 s with 4 (measured on
        # 2 cores; a slice's widest activations, 16 MB, stay in cache). A GPU wants bigger batches.
        self.batch_size = int(batch_size) or (1 if self.device.type == "cpu" else 8)
        self.steps = None if steps is None else self._checked_steps(steps)

    def _checked_steps(self, steps: int) -> int:
        """``steps`` when the model is a diffusion model that can sample in that many steps."""
        check = getattr(self.model.network, "check_steps", None)  # a diffusion network's (its forward samples)
        if check is None:
            raise LowdoseError(f"model {self.name} is not a diffusion model: it takes no sampling steps")
        try:
            return check(steps)
        except ValueError as exc:
            raise LowdoseError(f"model {self.name}: {exc}") from None

    @property
    def name(self) -> str:
        return self.model.name

    def _input(self, hu: np.ndarray, indices) -> torch.Tensor:
        slabs = np.stack([slab(hu, k, self.model.in_channels) for k in indices])
        return torch.from_numpy(hu_to_input(slabs, self.model.normalisation)).to(self.device)

    def _dose_slices(self, volume: CTVolume) -> list[int]:
        """Up to DOSE_ESTIMATE_SLICES slices spread evenly over the body, where the dose is read."""
        candidates = body_slices(volume, 0.2) or list(range(volume.shape[0]))
        return sorted(
            {
                candidates[int(i)]
                for i in np.linspace(0, len(candidates) - 1, min(DOSE_ESTIMATE_SLICES, len(candidates))).round()
            }
        )

    @torch.inference_mode()
    def dose_estimates(self, volume: CTVolume, picks: list[int] | None = None) -> np.ndarray:
        """The dose fraction read by the model's dose estimator from the slices ``picks`` (default: up to
        DOSE_ESTIMATE_SLICES spread over the body), one estimate per slice (an in-plane estimator reads each
        slice's own noise only)."""
        if self.model.dose_estimator is None:
            raise LowdoseError(f"model {self.name} has no dose estimator; give the dose (--dose 0.25)")
        # One batch: 2.4x faster per slice than one slice at a time (measured, CPU).
        picks = self._dose_slices(volume) if picks is None else picks
        return self.model.dose_estimator.predict_dose_fraction(self._input(volume.hu, picks)).float().cpu().numpy()

    def read_dose(self, volume: CTVolume) -> tuple[float, str]:
        """The dose fraction of a low-dose volume and how it was read, in words.

        The model's estimator reads each slice (median over slices); the noise variance of the same slices against
        a routine scan's of their thickness and kernel texture (lowdose.dose.read_dose_from_noise) bounds it to
        the range routine protocols allow, when there is uniform soft tissue to measure it in. Alone, the network
        reads 1/10 and 1/20 dose as 0.2-0.6 on held-out series (benchmarks/results/denoising.md) and the noise
        cannot tell a site's protocol from a dose change (a factor 2.4 either way): the bound keeps the network
        from the first error without taking the second."""
        picks = self._dose_slices(volume)
        estimates = self.dose_estimates(volume, picks)
        value = float(np.median(estimates))
        reads = "in-plane noise" if self.model.dose_estimator_in_plane else "noise"
        detail = f"read by the model from the {reads} of {len(estimates)} slice{'s' * (len(estimates) > 1)}"
        if len(estimates) > 1:
            detail += f" (median; slices {estimates.min():.2f} to {estimates.max():.2f})"
        reading = read_dose_from_noise(volume.hu[picks], float(volume.spacing_mm[0]), volume.slice_thickness_mm)
        if reading.dose is None:
            return value, f"{detail}; the noise could not check it ({reading.reason})"
        assert reading.low is not None and reading.high is not None
        bounded = float(np.clip(value, reading.low, reading.high))
        if bounded != value:
            detail = f"{detail} as {value:.2g}, brought into the range its noise allows"
        return bounded, f"{detail}; {reading.describe()}"

    def estimate_dose(self, volume: CTVolume) -> float:
        """The dose fraction of a low-dose volume (``read_dose``)."""
        return self.read_dose(volume)[0]

    def _dose(self, volume: CTVolume, dose: float | str) -> tuple[float | None, str, str]:
        """The dose fraction to use, how it was obtained (``DenoiseResult.dose_source``) and in words."""
        value, source, detail = None, NOT_USED, ""
        if self.model.dose_conditioning or (dose == "auto" and self.model.dose_estimator is not None):
            if dose == "auto":
                value, detail = self.read_dose(volume)
                source = ESTIMATED
            else:
                value, source, detail = float(dose), GIVEN, "given"
        elif dose != "auto":
            value, source, detail = float(dose), GIVEN_NOT_USED, "given, not used: the model is not dose-conditioned"
        if value is not None and not 0 < value <= 1:
            raise LowdoseError(f"dose fraction must be in (0, 1]; got {value}")
        return value, source, detail

    @torch.inference_mode()
    def __call__(
        self,
        volume: CTVolume,
        dose: float | str = "auto",
        progress: bool = False,
        strength: float | str = "high",
        steps: int | None = None,
        ensemble: int = 1,
    ) -> DenoiseResult:
        """The denoised volume (HU, same geometry) and how it was made; ``dose`` is a fraction or ``auto``;
        ``strength`` low/medium/high or a number in [0, 1] (lowdose.strength; default high: the full output);
        ``steps`` the sampling steps of a diffusion model for this call (None: the denoiser's); ``ensemble``
        1, 2, 4 or 8 in-plane symmetries averaged (lowdose.ensemble: 8 gains about 0.2 dB for 8x the time)."""
        strength_value = parse_strength(strength)
        try:
            ensemble = parse_ensemble(ensemble)
        except ValueError as exc:
            raise LowdoseError(str(exc)) from None
        steps = self.steps if steps is None else self._checked_steps(steps)
        started = time.time()
        dose_value, dose_source, dose_detail = self._dose(volume, dose)
        hu = volume.hu
        out = np.empty_like(hu)
        network = self.model.network
        dose_tensor = None if not self.model.dose_conditioning else torch.tensor([dose_value], device=self.device)
        batches = range(0, hu.shape[0], self.batch_size)
        for start in tqdm(batches, desc=f"denoising ({self.name})", unit="batch", disable=not progress):
            indices = range(start, min(start + self.batch_size, hu.shape[0]))
            x = self._input(hu, indices)
            extra: dict = {} if steps is None else {"steps": steps}
            if self.model.anatomy_encoder is not None or self.model.region_encoder is not None:
                centre = torch.from_numpy(hu[indices.start : indices.stop, None]).to(self.device)
                if self.model.anatomy_encoder is not None:  # BioAtt: the organs of the slices steer the attention
                    extra["organ_probabilities"] = self.model.organ_probabilities(centre)
                if self.model.region_encoder is not None:  # DA-Diff: each slice's body region conditions it
                    extra["region"] = self.model.region_probabilities(centre)
            y = self_ensemble(functools.partial(_forward, network, dose_tensor, extra), x, ensemble)
            out[start : start + len(indices)] = output_to_hu(y[:, 0].float().cpu().numpy(), self.model.normalisation)
        if strength_value < 1.0:  # keep the rest of the scan's own noise, with its own texture
            out = hu + np.float32(strength_value) * (out - hu)
        # Keep what the network never saw: padding outside the field of view and HU beyond its range.
        untouched = ~volume.field_of_view_mask() | (hu > self.model.normalisation["hu_max"])
        out[untouched] = hu[untouched]
        return DenoiseResult(
            volume=volume.with_hu(out),
            model=self.name,
            dose_fraction=dose_value,
            dose_source=dose_source,
            dose_detail=dose_detail,
            seconds=round(time.time() - started, 2),
            device=str(self.device),
            strength=strength_value,
            ensemble=ensemble,
            model_version=self.model.version,
            weights_sha256=self.model.weights_sha256,
        )


def _forward(network, dose: torch.Tensor | None, extra: dict, x: torch.Tensor) -> torch.Tensor:
    """One pass of ``network`` on inputs ``x`` with the dose and the anatomy it is conditioned on, if any."""
    return network(x, dose, **extra) if dose is not None or extra else network(x)


@functools.lru_cache(maxsize=4)
def get_denoiser(model: str = DEFAULT_MODEL, device: str = "auto", batch_size: int = 0) -> Denoiser:
    """A cached ``Denoiser``: the model is loaded once per process."""
    return Denoiser(model, device, batch_size)


def denoise(
    volume: CTVolume,
    model: str = DEFAULT_MODEL,
    dose: float | str = "auto",
    device: str = "auto",
    progress: bool = False,
    strength: float | str = "high",
    ensemble: int = 1,
) -> DenoiseResult:
    """Denoise a low-dose CT volume with a shipped model (``dose``: fraction or ``auto``; ``strength``: low,
    medium, high or a number in [0, 1], lowdose.strength; ``ensemble``: 1, 2, 4 or 8, lowdose.ensemble).

    Example: ``result = denoise(load_ct("low.nii.gz")); save_ct(result.volume, "out", description=result.description)``
    """
    return get_denoiser(str(model), device)(volume, dose=dose, progress=progress, strength=strength, ensemble=ensemble)


class _CallableModule(types.ModuleType):
    """``lowdose.denoise`` names both this module and the one-call function: once the module is imported, the
    package's attribute of that name is the module, so calling the module denoises (``lowdose.denoise(volume)``)."""

    def __call__(self, *args, **kwargs) -> DenoiseResult:
        return denoise(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
