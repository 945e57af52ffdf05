"""Label maps on a CT's voxel grid: read one made elsewhere (aligned to the CT), write one atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .errors import CTInputError
from .volume import CTVolume

# Two grids are the same when voxel centres agree to this fraction of a voxel.
GRID_TOLERANCE_VOXELS = 1e-3


def _index_to_lps(spacing, origin, direction) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def load_label_map(path: str | os.PathLike, like: CTVolume) -> tuple[np.ndarray, str]:
    """Read an integer label map (NIfTI/NRRD/MHA) and put it on the grid of the CT ``like``.

    Returns ``(labels [z, y, x] uint16, how)`` where ``how`` is "same grid", "reoriented" (the same voxels
    stored with flipped or permuted axes, e.g. a NIfTI written in RAS order: moved exactly) or "resampled"
    (another grid: nearest-neighbour resampling onto the CT's grid). Raises ``CTInputError`` naming the
    file when it is not a label map or does not overlap the CT.
    """
    path = Path(path)
    if not path.is_file():
        raise CTInputError(path, "no such label map file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CTInputError(path, f"not a readable label map ({str(exc).strip().splitlines()[0]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(
            path,
            f"a label map must be one 3-D integer image; this is {image.GetDimension()}-D "
            f"with {image.GetNumberOfComponentsPerPixel()} component(s) per voxel",
        )
    data = sitk.GetArrayFromImage(image)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.mod(data, 1) == 0):
            raise CTInputError(
                path, f"holds non-integer values ({data.dtype}): a CT or a probability map, " "not a label map"
            )
    if data.min() < 0 or data.max() > 65535:
        raise CTInputError(path, f"label values {data.min()}..{data.max()} are outside 0..65535")
    data = data.astype(np.uint16)

    source = _index_to_lps(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    # Continuous index of the label grid (x, y, z) for each index of the CT grid.
    mapping = np.linalg.solve(source, like.affine_lps())
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    if np.allclose(mapping, np.eye(4), atol=GRID_TOLERANCE_VOXELS) and data.shape == like.shape:
        return data, "same grid"
    # Voxel centres that coincide (a signed permutation with whole-voxel offsets) make nearest-neighbour
    # resampling an exact move of the same voxels.
    exact = (
        np.allclose(linear, np.rint(linear), atol=GRID_TOLERANCE_VOXELS)
        and np.allclose(offset, np.rint(offset), atol=GRID_TOLERANCE_VOXELS)
        and np.all(np.abs(np.rint(linear)).sum(axis=0) == 1)
    )
    nz, ny, nx = like.shape
    reference = sitk.Image([nx, ny, nz], sitk.sitkUInt16)
    reference.SetSpacing(like.spacing_mm)
    reference.SetOrigin(like.origin_mm)
    reference.SetDirection(tuple(like.direction.reshape(-1)))
    moving = sitk.GetImageFromArray(data)
    moving.CopyInformation(image)
    resampled = sitk.GetArrayFromImage(
        sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    )
    if data.any() and not resampled.any():
        raise CTInputError(
            path, "does not overlap the CT it should label (another patient position or " "frame of reference?)"
        )
    return resampled, "reoriented" if exact else "resampled"


def save_label_map(labels: np.ndarray, like: CTVolume, path: str | os.PathLike) -> Path:
    """Write a label map with the CT's geometry (uint8 when it fits), atomically (temporary file + rename)."""
    path = Path(path)
    labels = np.asarray(labels)
    dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.uint16
    image = sitk.GetImageFromArray(labels.astype(dtype))
    image.SetSpacing(like.spacing_mm)
    image.SetOrigin(like.origin_mm)
    image.SetDirection(tuple(like.direction.reshape(-1)))
    with atomic_output(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path
