"""Read and write CT in Hounsfield units with its geometry: NIfTI, NRRD, MHA and DICOM series.

``load_ct`` checks that what it reads is one 3-D CT volume in HU and says clearly what is wrong when it
is not; ``save_ct`` writes atomically (temporary file or folder, then rename) and never over the input.
A DICOM series out is a derived series of the one read (new UIDs, patient and study kept).
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from .atomic import atomic_output, default_mode
from .errors import CTInputError, CTOutputError
from .volume import PADDING_THRESHOLD_HU, CTVolume

GRID_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# Positions of consecutive slices may differ by this much (mm) and still count as one regular grid.
SLICE_SPACING_TOLERANCE_MM = 0.01


# ----------------------------------------------------------------------------------------- reading


def load_ct(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a CT volume in HU from a NIfTI/NRRD/MHA file, a DICOM file or a folder holding a DICOM series.

    ``series_uid`` picks one series when the folder holds several. Raises ``CTInputError`` naming the
    file and the problem for anything that is not one readable 3-D CT volume in Hounsfield units.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(path, "no such file or folder")
    if path.is_dir():
        volume = _load_dicom_folder(path, series_uid)
    else:
        if path.stat().st_size == 0:
            raise CTInputError(path, "the file is empty")
        if _grid_suffix(path):
            volume = _load_grid_file(path)
        else:
            volume = _load_dicom_files(path, [path], series_uid)
    _check_hounsfield(volume.hu, path)
    return volume


def _grid_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in GRID_SUFFIXES if name.endswith(s)), None)


def _load_grid_file(path: Path) -> CTVolume:
    import SimpleITK as sitk

    if path.name.lower().endswith(".gz"):
        _check_gzip_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CTInputError(path, f"not a readable {_grid_suffix(path)} image ({_first_line(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(path, f"a colour/vector image with {image.GetNumberOfComponentsPerPixel()} "
                                 "components per voxel, not a CT volume")
    size = image.GetSize()
    if image.GetDimension() == 4:
        if size[3] != 1:
            raise CTInputError(path, f"a 4-D image ({'x'.join(map(str, size))}); lowdose needs one 3-D "
                                     "CT volume (split the time points or phases first)")
        image = image[:, :, :, 0]
    elif image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    elif image.GetDimension() != 3:
        raise CTInputError(path, f"a {image.GetDimension()}-D image; lowdose needs one 3-D CT volume")
    pixel_type = image.GetPixelIDTypeAsString()
    hu = sitk.GetArrayFromImage(image)
    if hu.dtype in (np.uint8, np.int8, np.bool_):
        raise CTInputError(path, f"stored as {pixel_type}: an 8-bit image cannot hold Hounsfield units "
                                 "(was it exported for display or as a label map?)")
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing_mm=image.GetSpacing(),
        origin_mm=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        metadata={"format": _grid_suffix(path).lstrip("."), "path": str(path),
                  "source_dtype": str(hu.dtype)},
    )


def _check_gzip_complete(path: Path) -> None:
    """SimpleITK fills a truncated .gz with zeros instead of failing: read the stream to its end first."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CTInputError(path, f"not a readable .nii.gz image (truncated or damaged: {_first_line(exc)})") from None


def _load_dicom_folder(folder: Path, series_uid: str | None) -> CTVolume:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CTInputError(folder, "the folder is empty")
    return _load_dicom_files(folder, files, series_uid)


def _load_dicom_files(source: Path, files: list[Path], series_uid: str | None) -> CTVolume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    single_file = source.is_file()
    series: dict[str, list] = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=single_file)
        except (InvalidDicomError, OSError, EOFError) as exc:
            if single_file:
                raise CTInputError(f, f"not a DICOM, NIfTI, NRRD or MHA file ({_first_line(exc)})") from None
            continue  # licences, READMEs, DICOMDIR helpers: not part of any series
        except Exception as exc:  # pydicom raises many types on damaged headers
            raise CTInputError(f, f"damaged DICOM header ({_first_line(exc)})") from None
        if "Rows" not in ds or "Columns" not in ds:
            if single_file and "SOPClassUID" not in ds:
                raise CTInputError(f, "not a DICOM, NIfTI, NRRD or MHA file")
            if single_file:
                raise CTInputError(f, "a DICOM file without an image (no Rows/Columns)")
            continue  # structured reports, presentation states, DICOMDIR
        series[str(ds.get("SeriesInstanceUID", "unknown"))].append((f, ds))
    if not series:
        raise CTInputError(source, "holds no DICOM images")
    if series_uid is not None:
        if series_uid not in series:
            raise CTInputError(source, f"no series with SeriesInstanceUID {series_uid}; "
                                       f"it holds: {_list_series(series)}")
        chosen = series[series_uid]
    elif len(series) > 1:
        raise CTInputError(source, f"holds {len(series)} series; choose one by its SeriesInstanceUID "
                                   f"(series_uid= / --series): {_list_series(series)}")
    else:
        chosen = next(iter(series.values()))
    return _assemble_series(source, chosen)


def _list_series(series: dict[str, list]) -> str:
    parts = []
    for uid, items in series.items():
        ds = items[0][1]
        parts.append(f"{uid} ({ds.get('Modality', '?')}, '{ds.get('SeriesDescription', '')}', "
                     f"{len(items)} files)")
    return "; ".join(parts)


def _assemble_series(source: Path, items: list) -> CTVolume:
    import pydicom

    first_file, first = items[0]
    modality = first.get("Modality")
    if modality not in (None, "", "CT"):
        raise CTInputError(source, f"modality is {modality}, not CT")
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise CTInputError(first_file, "a colour image (SamplesPerPixel > 1), not a CT slice")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        if len(items) > 1:
            raise CTInputError(source, "mixes multi-frame and single-frame files")
        return _assemble_multiframe(first_file)

    rows, cols = int(first.Rows), int(first.Columns)
    orientation = np.array(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    pixel_spacing = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    positions = []
    for f, ds in items:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise CTInputError(f, f"slice is {ds.Columns}x{ds.Rows} but the series starts at {cols}x{rows} "
                                  "(mixed series?)")
        iop = np.array(ds.get("ImageOrientationPatient", orientation), dtype=np.float64)
        if not np.allclose(iop, orientation, atol=1e-4):
            raise CTInputError(f, "slice orientation differs from the rest of the series (mixed series?)")
        if ds.get("Modality") != modality:
            raise CTInputError(f, f"modality {ds.get('Modality')} in a {modality} series (mixed series?)")
        if len(items) > 1 and "ImagePositionPatient" not in ds:
            raise CTInputError(f, "no ImagePositionPatient: slices cannot be put in order")
        positions.append(np.array(ds.get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64))
    positions = np.array(positions)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    items = [items[i] for i in order]
    positions, along_normal = positions[order], along_normal[order]
    if len(items) > 1 and np.min(np.diff(along_normal)) < 1e-3:
        k = int(np.argmin(np.diff(along_normal)))
        raise CTInputError(source, f"two slices share the position {along_normal[k]:.2f} mm "
                                   f"({items[k][0].name}, {items[k + 1][0].name}): overlapping acquisitions "
                                   "or a mixed series; split it before loading")

    hu = np.empty((len(items), rows, cols), dtype=np.float32)
    headers, padding_hu = [], None
    for k, (f, _) in enumerate(items):
        try:
            ds = pydicom.dcmread(f)
            stored = ds.pixel_array
        except Exception as exc:
            raise CTInputError(f, f"cannot decode the pixel data ({_first_line(exc)}); compressed DICOM "
                                  "needs pylibjpeg with its openjpeg/libjpeg plug-ins (installed by setup)") from None
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        hu[k] = stored.astype(np.float32) * slope + intercept
        if "PixelPaddingValue" in ds:
            padding_hu = float(ds.PixelPaddingValue) * slope + intercept
        del ds.PixelData
        headers.append(ds)

    spacing_z = float(np.median(np.diff(along_normal))) if len(items) > 1 else float(
        first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    # A regular grid needs equal steps along the normal and no in-plane shift (gantry tilt shifts it).
    expected = positions[0] + np.outer(along_normal - along_normal[0], normal)
    regular = bool(np.all(np.abs(positions - expected) < SLICE_SPACING_TOLERANCE_MM * 10)) and (
        len(items) < 3 or float(np.ptp(np.diff(along_normal))) < SLICE_SPACING_TOLERANCE_MM)
    metadata = {
        "format": "dicom",
        "path": str(source),
        "dicom_headers": headers,
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "series_description": str(first.get("SeriesDescription", "")),
    }
    if padding_hu is not None and padding_hu < PADDING_THRESHOLD_HU:
        metadata["padding_value_hu"] = padding_hu
    if not regular:
        metadata["irregular_reason"] = _irregularity(positions, along_normal, normal)
    return CTVolume(
        hu=hu,
        spacing_mm=(pixel_spacing[1], pixel_spacing[0], spacing_z),
        origin_mm=tuple(positions[0]),
        direction=np.stack([row_dir, col_dir, normal], axis=1),
        metadata=metadata,
        slice_positions_mm=None if regular else positions,
    )


def _irregularity(positions, along_normal, normal) -> str:
    steps = np.diff(along_normal)
    reasons = []
    if len(steps) > 1 and np.ptp(steps) >= SLICE_SPACING_TOLERANCE_MM:
        reasons.append(f"slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm")
    shift = positions[-1] - positions[0] - (along_normal[-1] - along_normal[0]) * normal
    if np.linalg.norm(shift) >= SLICE_SPACING_TOLERANCE_MM * 10:
        tilt = np.degrees(np.arctan2(np.linalg.norm(shift), along_normal[-1] - along_normal[0]))
        reasons.append(f"gantry tilt of {tilt:.1f} degrees")
    return " and ".join(reasons) or "slices off a regular grid"


def _assemble_multiframe(path: Path) -> CTVolume:
    raise CTInputError(path, "multi-frame (enhanced) CT is not supported yet; export the study as "
                             "single-frame CT Image Storage files")


def _check_hounsfield(hu: np.ndarray, path: Path) -> None:
    """Refuse voxel values that cannot be Hounsfield units (display exports, normalised or raw values)."""
    if hu.size == 0:
        raise CTInputError(path, "the image has no voxels")
    if not np.all(np.isfinite(hu)):
        raise CTInputError(path, "the image holds NaN or infinite values")
    lo, hi = float(hu.min()), float(hu.max())
    if hi - lo < 1.0:
        raise CTInputError(path, f"every voxel is {lo:g}: an empty or constant image, not a CT scan")
    if lo >= 0.0 and hi <= 1.0:
        raise CTInputError(path, f"values {lo:g}..{hi:g} look normalised to [0, 1], not Hounsfield units")
    if lo < -32768 or hi > 65535:
        raise CTInputError(path, f"values {lo:g}..{hi:g} are outside any Hounsfield range")
    inside = hu[hu > PADDING_THRESHOLD_HU]
    if lo >= 0.0 and inside.size and float(np.median(inside)) > 600.0:
        raise CTInputError(path, f"values {lo:g}..{hi:g} with air near 0 look like stored pixel values "
                                 "without the rescale intercept (about -1024), not Hounsfield units")


# ----------------------------------------------------------------------------------------- writing


def save_ct(volume: CTVolume, path: str | os.PathLike, *, description: str | None = None,
            dtype: str = "int16") -> Path:
    """Write ``volume`` to ``path`` atomically and return the path written.

    A path ending in .nii, .nii.gz, .nrrd or .mha gives that file; any other path is a folder that
    receives a DICOM series (derived from the source series when the volume came from DICOM).
    ``description`` becomes the DICOM SeriesDescription (and is recorded in grid files' metadata).
    ``dtype`` is the stored type of grid files: ``int16`` (rounded HU, as scanners store it) or
    ``float32`` (exact); DICOM is always int16 with a rescale to HU.
    """
    path = Path(path)
    _refuse_overwriting_input(volume, path)
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype must be 'int16' or 'float32', not {dtype!r}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTOutputError(path, f"cannot create the folder {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK):
        raise CTOutputError(path, f"the folder {parent} is not writable")
    if _grid_suffix(path):
        _save_grid_file(volume, path, dtype)
    elif path.suffix.lower() in (".nhdr", ".mhd", ".hdr", ".img", ".dcm", ".png", ".jpg"):
        raise CTOutputError(path, f"cannot write {path.suffix} files; use .nii.gz, .nii, .nrrd, .mha, or a "
                                  "folder name for a DICOM series")
    else:
        _save_dicom_series(volume, path, description or "lowdose derived series")
    return path


def _refuse_overwriting_input(volume: CTVolume, path: Path) -> None:
    source = volume.metadata.get("path")
    if not source:
        return
    source, target = Path(source).resolve(), path.resolve()
    if target == source or source in target.parents or (source.is_file() and target == source.parent):
        raise CTOutputError(path, "would overwrite or write into the input; choose another output path")


def _save_grid_file(volume: CTVolume, path: Path, dtype: str) -> None:
    import SimpleITK as sitk

    if not volume.is_regular_grid:
        raise CTOutputError(path, f"the slices are not on a regular grid "
                                  f"({volume.metadata.get('irregular_reason', 'irregular positions')}): "
                                  "write a DICOM series instead (an output path without a file suffix)")
    image = sitk.GetImageFromArray(_to_stored(volume.hu, dtype))
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin_mm)
    image.SetDirection(tuple(volume.direction.reshape(-1)))
    suffix = _grid_suffix(path)
    with atomic_output(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=suffix != ".nii")


def _to_stored(hu: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return hu.astype(np.float32)
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def _save_dicom_series(volume: CTVolume, folder: Path, description: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CTOutputError(folder, "already exists and is not an empty folder; a DICOM series is written "
                                    "into a new folder (lowdose never overwrites files it did not make)")
    datasets = _derived_datasets(volume, description)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        for k, ds in enumerate(datasets):
            ds.save_as(tmp / f"{k + 1:04d}.dcm", write_like_original=False)
        if folder.exists():
            folder.rmdir()
        os.rename(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CTOutputError(folder, f"could not be written ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _derived_datasets(volume: CTVolume, description: str) -> list:
    """One DICOM dataset per slice: a DERIVED\\SECONDARY CT series of the source, same geometry, int16 HU."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    nz, ny, nx = volume.shape
    sources = volume.metadata.get("dicom_headers")
    if not sources or len(sources) != nz or any(
            (int(h.Rows), int(h.Columns)) != (ny, nx) for h in sources):
        sources = None
    template = _new_study_header() if sources is None else None
    series_uid = generate_uid()
    # Anonymised exports sometimes blank the study and frame UIDs; a PACS refuses a series without them.
    missing_uids = {keyword: generate_uid() for keyword in ("StudyInstanceUID", "FrameOfReferenceUID")
                    if sources is not None and not str(sources[0].get(keyword, "") or "")}
    now = datetime.datetime.now()
    row_dir, col_dir = volume.direction[:, 0], volume.direction[:, 1]
    sx, sy, sz = volume.spacing_mm
    positions = volume.slice_positions_mm
    if positions is None:
        positions = np.asarray(volume.origin_mm) + np.outer(np.arange(nz) * sz, volume.direction[:, 2])
    stored = _to_stored(volume.hu, "int16")
    datasets = []
    for k in range(nz):
        source = sources[k] if sources is not None else None
        ds = copy.deepcopy(source if source is not None else template)
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingRangeLimit",
                        "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "PixelData",
                        "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in ds:
                delattr(ds, keyword)
        for keyword, uid in missing_uids.items():
            setattr(ds, keyword, uid)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        image_type = list(ds.get("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]))
        ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
        ds.SeriesDescription = description[:64]
        ds.DerivationDescription = description[:1024]
        ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
        ds.InstanceNumber = k + 1
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.ImageOrientationPatient = [_ds_float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [_ds_float(v) for v in positions[k]]
        ds.SliceLocation = _ds_float(float(positions[k] @ np.cross(row_dir, col_dir)))
        ds.PixelSpacing = [_ds_float(sy), _ds_float(sx)]
        if source is None or "SliceThickness" not in ds:
            ds.SliceThickness = _ds_float(sz)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        if "PixelPaddingValue" in ds:
            padding = volume.metadata.get("padding_value_hu")
            if padding is None:
                del ds.PixelPaddingValue
            else:
                ds.PixelPaddingValue = int(np.clip(np.rint(padding), -32768, 32767))
        if source is not None and str(source.get("SOPInstanceUID", "") or ""):
            reference = Dataset()
            reference.ReferencedSOPClassUID = source.SOPClassUID
            reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
            ds.SourceImageSequence = [reference]
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored[k]).tobytes())  # PixelData
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        datasets.append(ds)
    return datasets


def _new_study_header():
    """Header for a series whose source was not DICOM: a new anonymous patient and study."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.PatientName = "Anonymous"
    ds.PatientID = "LOWDOSE-" + generate_uid()[-12:]
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
    ds.StudyTime = ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "lowdose"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesNumber = 0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


def _ds_float(value: float) -> str:
    """A DICOM decimal string of at most 16 characters that keeps 1e-4 mm precision."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= 16 else f"{value:.9g}"[:16]


# ----------------------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

