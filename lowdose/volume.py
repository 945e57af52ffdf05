"""CTVolume: a CT scan in Hounsfield units with the geometry that places it in the patient.

Conventions are SimpleITK's (and DICOM's): the voxel array is indexed ``[z, y, x]`` (slice, row,
column); ``spacing_mm``, ``origin_mm`` are ordered ``(x, y, z)``; physical space is LPS; ``direction``
is a 3x3 matrix whose columns are the unit vectors of the x, y and z array axes in LPS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import numpy as np

# Values below this are scanner padding outside the reconstructed field of view (-1500, -2000, -2048,
# -3024 are common), never tissue or air (air is about -1000 HU, with noise rarely below -1300).
PADDING_THRESHOLD_HU = -1400.0


@dataclasses.dataclass
class CTVolume:
    """A CT volume: float32 HU voxels ``[z, y, x]`` plus spacing, origin, direction and source metadata.

    ``slice_positions_mm`` holds each slice's DICOM ImagePositionPatient (LPS, mm) when the slices do not
    lie on one regular grid (gantry tilt, varying spacing); it is ``None`` for a regular grid.
    ``metadata`` carries what the source file said (format, path, DICOM headers, ...) so that outputs can
    be written as derived versions of it.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    slice_positions_mm: np.ndarray | None = None

    def __post_init__(self):
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise ValueError(f"a CTVolume is 3-D [z, y, x]; got an array of shape {hu.shape}")
        self.hu = hu.astype(np.float32, copy=False)
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.origin_mm = tuple(float(o) for o in self.origin_mm)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing must be three positive numbers in mm; got {self.spacing_mm}")
        if self.slice_positions_mm is not None:
            pos = np.asarray(self.slice_positions_mm, dtype=np.float64)
            if pos.shape != (hu.shape[0], 3):
                raise ValueError(f"slice_positions_mm must be ({hu.shape[0]}, 3); got {pos.shape}")
            self.slice_positions_mm = pos

    @property
    def shape(self) -> tuple[int, int, int]:
        return cast(tuple[int, int, int], tuple(self.hu.shape))  # __post_init__ checked that hu is 3-D

    @property
    def is_regular_grid(self) -> bool:
        """True when every voxel sits on the grid given by spacing, origin and direction."""
        return self.slice_positions_mm is None

    @property
    def slice_thickness_mm(self) -> float:
        """The nominal slice thickness: DICOM SliceThickness when the headers give one, else the slice spacing."""
        headers = self.metadata.get("dicom_headers") or []
        if headers:
            try:
                value = float(headers[0].get("SliceThickness", 0) or 0)
            except (TypeError, ValueError):
                value = 0.0
            if value > 0:
                return value
        return float(self.spacing_mm[2])

    def field_of_view_mask(self) -> np.ndarray:
        """Boolean mask of voxels inside the reconstructed field of view (not scanner padding)."""
        padding = self.metadata.get("padding_value_hu")
        mask = self.hu > PADDING_THRESHOLD_HU
        if padding is not None:
            mask &= self.hu != np.float32(padding)
        return mask

    def with_hu(self, hu: np.ndarray, **metadata_updates: Any) -> CTVolume:
        """A new volume with other voxel values and the same geometry (for processing results)."""
        hu = np.asarray(hu)
        if hu.shape != self.hu.shape:
            raise ValueError(f"new voxels {hu.shape} do not match the volume {self.hu.shape}")
        metadata = dict(self.metadata)
        metadata.update(metadata_updates)
        return dataclasses.replace(
            self,
            hu=hu,
            metadata=metadata,
            direction=self.direction.copy(),
            slice_positions_mm=None if self.slice_positions_mm is None else self.slice_positions_mm.copy(),
        )

    def slices(self, start: int, stop: int) -> CTVolume:
        """Slices ``start:stop`` as a volume of their own, in the same place in space (origin moved)."""
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        if stop <= start:
            raise ValueError(f"no slices in {start}:{stop} of a {self.shape[0]}-slice volume")
        origin = np.asarray(self.origin_mm) + self.direction[:, 2] * self.spacing_mm[2] * start
        metadata = dict(self.metadata)
        if isinstance(metadata.get("dicom_headers"), list):  # one header per slice
            metadata["dicom_headers"] = metadata["dicom_headers"][start:stop]
        positions = None if self.slice_positions_mm is None else self.slice_positions_mm[start:stop].copy()
        return dataclasses.replace(
            self,
            hu=self.hu[start:stop].copy(),
            origin_mm=tuple(positions[0]) if positions is not None else tuple(origin),
            direction=self.direction.copy(),
            metadata=metadata,
            slice_positions_mm=positions,
        )

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel index (x, y, z, 1) to LPS millimetres (regular grids only)."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing_mm)
        affine[:3, 3] = self.origin_mm
        return affine

    def describe(self) -> str:
        """One line for logs: shape, spacing and HU range."""
        z, y, x = self.shape
        sx, sy, sz = self.spacing_mm
        grid = "" if self.is_regular_grid else ", irregular slices"
        return (
            f"{x}x{y}x{z} voxels, {sx:.3g}x{sy:.3g}x{sz:.3g} mm{grid}, "
            f"HU {float(self.hu.min()):.0f}..{float(self.hu.max()):.0f}"
        )
