"""Image-quality metrics the way the LDCT field reports them.

PSNR and SSIM are computed on images windowed with the field's display windows and scaled to [0, 1]
(as in Eulig et al., ldct-benchmark, Medical Physics 2024); RMSE and noise are in HU. Voxels outside
the reconstructed field of view (scanner padding) are left out of every figure.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from .volume import PADDING_THRESHOLD_HU, CTVolume
from .windows import WINDOWS
from .windows import window as window_of

__all__ = [
    "WINDOWS",
    "apply_window",
    "compare",
    "edge_sharpness_ratio",
    "field_of_view",
    "noise_std",
    "nps_mean_frequency",
    "psnr",
    "rmse_hu",
    "soft_tissue_mask",
    "ssim",
]


def _hu(image) -> np.ndarray:
    return np.asarray(image.hu if isinstance(image, CTVolume) else image, dtype=np.float32)


def apply_window(hu, window: str | tuple[float, float]) -> np.ndarray:
    """HU mapped to [0, 1] through a display window given by name or as (centre, width)."""
    centre, width = window_of(window)
    return np.clip((_hu(hu) - (centre - width / 2.0)) / width, 0.0, 1.0)


def field_of_view(*images) -> np.ndarray:
    """Voxels that are inside the field of view in every image (no scanner padding)."""
    mask: np.ndarray | None = None
    for image in images:
        inside = image.field_of_view_mask() if isinstance(image, CTVolume) else _hu(image) > PADDING_THRESHOLD_HU
        mask = inside if mask is None else mask & inside
    assert mask is not None, "field_of_view needs at least one image"
    return mask


def psnr(reference, test, window: str | tuple[float, float] = "abdomen", mask=None) -> float:
    """Peak signal-to-noise ratio (dB) of windowed images in [0, 1] (peak 1) over ``mask``."""
    ref, tst = apply_window(reference, window), apply_window(test, window)
    mask = field_of_view(reference, test) if mask is None else mask
    mse = float(np.mean((ref[mask] - tst[mask]) ** 2, dtype=np.float64))
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def ssim(reference, test, window: str | tuple[float, float] = "abdomen") -> float:
    """Mean structural similarity of windowed images in [0, 1], computed slice by slice (2-D, 7x7).

    Slices are 2-D images in CT reading; a 3-D SSIM window would mix slices 3-5 mm apart.
    Padding outside the field of view is set to the window's floor in both images first.
    """
    mask = field_of_view(reference, test)
    ref = np.where(mask, apply_window(reference, window), 0.0)
    tst = np.where(mask, apply_window(test, window), 0.0)
    if ref.ndim == 2:
        ref, tst = ref[None], tst[None]
    return float(np.mean([structural_similarity(r, t, data_range=1.0) for r, t in zip(ref, tst)]))


def rmse_hu(reference, test, mask=None) -> float:
    """Root-mean-square difference in HU over ``mask`` (default: the common field of view)."""
    mask = field_of_view(reference, test) if mask is None else mask
    diff = _hu(test)[mask].astype(np.float64) - _hu(reference)[mask]
    return float(np.sqrt(np.mean(diff**2)))


def soft_tissue_mask(
    hu,
    low: float = -50.0,
    high: float = 150.0,
    erode_mm: float = 3.0,
    spacing_mm: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Homogeneous soft tissue (muscle, liver, spleen...): HU in [low, high], eroded in-plane.

    Erosion keeps edges (where structure, not noise, dominates the difference) out of noise figures.
    Use it on the normal-dose image.
    """
    if isinstance(hu, CTVolume):
        spacing_mm = hu.spacing_mm
    values = _hu(hu)
    # Smooth first so that noise does not punch holes in the tissue mask.
    smooth = ndimage.uniform_filter(values, size=(1, 3, 3))
    mask = (smooth >= low) & (smooth <= high)
    pixel = float(spacing_mm[0]) if spacing_mm else 1.0
    radius = max(1, int(round(erode_mm / pixel)))
    structure = np.zeros((1, 2 * radius + 1, 2 * radius + 1), dtype=bool)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    structure[0] = yy**2 + xx**2 <= radius**2
    return ndimage.binary_erosion(mask, structure=structure) if values.ndim == 3 else mask


def noise_std(hu, mask) -> float:
    """Standard deviation in HU inside a region (``mask``: boolean array or tuple of slices)."""
    values = _hu(hu)[mask]
    if values.size < 2:
        raise ValueError("the noise region holds fewer than two voxels")
    return float(np.std(values, dtype=np.float64, ddof=1))


def compare(reference, test, windows=("abdomen", "chest")) -> dict[str, float]:
    """Every figure at once for ``test`` against ``reference`` (both HU, same grid).

    Returns PSNR/SSIM for each window, RMSE in HU, and the std and mean of ``test - reference`` in
    homogeneous soft tissue of the reference (the added noise and the HU bias).
    """
    ref, tst = _hu(reference), _hu(test)
    if ref.shape != tst.shape:
        raise ValueError(f"images differ in shape: {ref.shape} vs {tst.shape}")
    fov = field_of_view(reference, test)
    figures: dict[str, float] = {}
    for window in windows:
        figures[f"psnr_{window}"] = psnr(reference, test, window, mask=fov)
        figures[f"ssim_{window}"] = ssim(reference, test, window)
    figures["rmse_hu"] = rmse_hu(reference, test, mask=fov)
    spacing = reference.spacing_mm if isinstance(reference, CTVolume) else None
    tissue = soft_tissue_mask(ref, spacing_mm=spacing) & fov
    if tissue.sum() >= 2:
        difference = tst[tissue].astype(np.float64) - ref[tissue]
        figures["soft_tissue_noise_std_hu"] = float(np.std(difference, ddof=1))
        figures["soft_tissue_mean_shift_hu"] = float(np.mean(difference))
    return figures


def edge_sharpness_ratio(reference, test, mask=None, fraction: float = 0.1) -> float:
    """How much of the reference's edge contrast ``test`` keeps: mean in-plane gradient magnitude of
    ``test`` over that of ``reference``, on the ``fraction`` of ``mask`` voxels (default: the body) where
    the reference's gradient is strongest. 1 = edges as sharp as the reference; below 1 = blurred."""
    ref, tst = _hu(reference), _hu(test)
    if ref.ndim == 2:
        ref, tst = ref[None], tst[None]
    if mask is None:
        mask = (ref > -500) & field_of_view(ref, tst)
    mask = mask.reshape(ref.shape)

    def gradient(a):
        return np.hypot(ndimage.sobel(a, axis=-1), ndimage.sobel(a, axis=-2))

    g_ref, g_tst = gradient(ref), gradient(tst)
    edges = mask & (g_ref >= np.quantile(g_ref[mask], 1 - fraction))
    return float(g_tst[edges].mean() / g_ref[edges].mean())


def nps_mean_frequency(hu, mask, pixel_mm: float = 1.0, roi: int = 24) -> float:
    """Mean spatial frequency (cycles/mm) of the 2-D noise power spectrum in uniform regions.

    Square ``roi`` x ``roi`` patches that lie wholly inside ``mask`` (uniform tissue, e.g. an organ of the
    reference's label map) are detrended (a fitted plane removed) and their power spectra averaged; the
    figure is the spectrum-weighted mean radial frequency (as in AAPM TG-233 NPS analysis). A denoiser
    that over-smooths lowers it: its residual texture is blotchier than a normal-dose image's.
    """
    values = _hu(hu)
    values, mask = (values[None], mask[None]) if values.ndim == 2 else (values, mask)
    yy, xx = np.mgrid[:roi, :roi]
    design = np.stack([np.ones(roi * roi), yy.ravel(), xx.ravel()], axis=1)
    inside = ndimage.minimum_filter(mask.astype(np.uint8), size=(1, roi, roi)) > 0
    spectra = []
    for z in range(values.shape[0]):
        for r in range(roi // 2, values.shape[1] - roi // 2, roi // 2):
            for c in range(roi // 2, values.shape[2] - roi // 2, roi // 2):
                if not inside[z, r, c]:
                    continue
                patch = values[z, r - roi // 2 : r + roi // 2, c - roi // 2 : c + roi // 2].astype(np.float64)
                coefficients, *_ = np.linalg.lstsq(design, patch.ravel(), rcond=None)
                detrended = patch - (design @ coefficients).reshape(roi, roi)
                spectra.append(np.abs(np.fft.fft2(detrended)) ** 2)
    if not spectra:
        raise ValueError(f"no {roi}x{roi} region lies inside the mask")
    nps = np.mean(spectra, axis=0)
    f = np.fft.fftfreq(roi, d=pixel_mm)
    radial = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    return float((radial * nps).sum() / nps.sum())
