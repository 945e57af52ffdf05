"""Read and write CT in Hounsfield units with its geometry: NIfTI, NRRD, MHA and DICOM series.

``load_ct`` checks that what it reads is one 3-D CT volume in HU and says clearly what is wrong when it
is not; ``save_ct`` writes atomically (temporary file or folder, then rename) and never over the input.
A DICOM series out is a derived series of the one read (new UIDs, patient and study kept).
"""

from __future__ import annotations

import bz2
import copy
import dataclasses
import datetime
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, generate_uid

from .atomic import atomic_output, default_mode
from .errors import CTInputError, CTOutputError
from .limits import InputLimits
from .volume import PADDING_THRESHOLD_HU, CTVolume

GRID_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
EXPLICIT_VR_LITTLE_ENDIAN = UID("1.2.840.10008.1.2.1")
# Positions of consecutive slices may differ by this much (mm) and still count as one regular grid.
SLICE_SPACING_TOLERANCE_MM = 0.01
# A step this close (fraction of the series' usual step) to a whole multiple k >= 2 of it is k - 1 missing slices.
MISSING_SLICE_TOLERANCE = 0.1
# Suffixes that name a file format save_ct cannot write (any other suffix-less path is a DICOM series folder).
UNWRITABLE_SUFFIXES = (
    ".nhdr",
    ".mhd",
    ".hdr",
    ".img",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".gz",
    ".zip",
    ".npy",
    ".npz",
    ".txt",
    ".json",
    ".pt",
)


# ----------------------------------------------------------------------------------------- reading


def load_ct(path: str | os.PathLike, series_uid: str | None = None, limits: InputLimits | None = None) -> CTVolume:
    """Read a CT volume in HU from a NIfTI/NRRD/MHA file, a DICOM file or a folder holding a DICOM series.

    ``series_uid`` picks one series when the folder holds several. ``limits`` bounds what the input may
    claim (``InputLimits.from_env()`` when None): headers are checked against it, and against the data
    actually present, before any voxel is read. Raises ``CTInputError`` naming the file and the problem
    for anything that is not one readable, complete 3-D CT volume in Hounsfield units.
    """
    path = Path(path)
    limits = InputLimits.from_env() if limits is None else limits
    if not path.exists():
        raise CTInputError(path, "no such file or folder")
    if path.is_dir():
        volume = _load_dicom_folder(path, series_uid, limits)
    else:
        if path.stat().st_size == 0:
            raise CTInputError(path, "the file is empty")
        if _grid_suffix(path):
            volume = _load_grid_file(path, limits)
        else:
            volume = _load_dicom_files(path, [path], series_uid, limits)
    _check_hounsfield(volume.hu, path)
    return volume


def _grid_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in GRID_SUFFIXES if name.endswith(s)), None)


def _load_grid_file(path: Path, limits: InputLimits) -> CTVolume:
    _check_grid_data(path, limits)  # SimpleITK allocates what the header says and zero-fills what is missing
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CTInputError(path, f"not a readable {_grid_suffix(path)} image ({_first_line(exc)})") from None
    suffix = _grid_suffix(path)
    assert suffix is not None  # load_ct sends only files with a grid suffix here
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(
            path,
            f"a colour/vector image with {image.GetNumberOfComponentsPerPixel()} "
            "components per voxel, not a CT volume",
        )
    size = image.GetSize()
    if image.GetDimension() == 4:
        if size[3] != 1:
            raise CTInputError(
                path,
                f"a 4-D image ({'x'.join(map(str, size))}); lowdose needs one 3-D "
                "CT volume (split the time points or phases first)",
            )
        image = image[:, :, :, 0]
    elif image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    elif image.GetDimension() != 3:
        raise CTInputError(path, f"a {image.GetDimension()}-D image; lowdose needs one 3-D CT volume")
    pixel_type = image.GetPixelIDTypeAsString()
    hu = sitk.GetArrayFromImage(image)
    if hu.dtype in (np.uint8, np.int8, np.bool_):
        raise CTInputError(
            path,
            f"stored as {pixel_type}: an 8-bit image cannot hold Hounsfield units "
            "(was it exported for display or as a label map?)",
        )
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing_mm=image.GetSpacing(),
        origin_mm=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        metadata={"format": suffix.lstrip("."), "path": str(path), "source_dtype": str(hu.dtype)},
    )


# --------------------------------------------------------------------- grid files: header against data


@dataclasses.dataclass
class _DataLayout:
    """Where a grid file's voxels are and how they are stored, as its header says."""

    shape_text: str  # e.g. "122x101x30 int16"
    voxels: int  # values, components included
    voxel_bytes: int  # bytes per value once decoded
    data_path: Path  # the file that holds the voxels (the header's own file unless detached)
    data_offset: int  # bytes before the voxels' stored form in data_path
    encoding: str  # raw, gzip (gzip or zlib stream), bzip2, ascii or hex
    skip: int = 0  # decoded bytes before the voxels (NIfTI header and extensions inside a .nii.gz)


def _check_grid_data(path: Path, limits: InputLimits) -> None:
    """Refuse, from the header and the stored sizes alone, a grid file that claims more than ``limits`` allow
    or holds less voxel data than its header describes (truncated); compressed data is decoded as a stream,
    never held, and never beyond what the limits allow."""
    suffix = _grid_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        layout = _nifti_layout(path)
    elif suffix == ".nrrd":
        layout = _nrrd_layout(path)
    else:
        layout = _metaimage_layout(path)
    limits.check_voxels(path, layout.voxels, layout.shape_text)
    nbytes = layout.voxels * layout.voxel_bytes
    data = layout.data_path
    if data != path and not data.is_file():
        raise CTInputError(path, f"its data file {data.name} is missing (the header names {data})")
    stored = data.stat().st_size - layout.data_offset
    described = f"the header describes {layout.shape_text} voxels ({nbytes:,} bytes)"
    if layout.encoding == "raw":
        if stored < layout.skip + nbytes:
            raise CTInputError(
                path,
                f"truncated: {described} but {_where(path, data)} holds only "
                f"{max(stored - layout.skip, 0):,} bytes of voxel data",
            )
        return
    if layout.encoding in ("ascii", "hex"):  # text: at least one digit and a separator per value
        needed = 2 * nbytes if layout.encoding == "hex" else 2 * layout.voxels - 1
        if stored < needed:
            raise CTInputError(
                path,
                f"truncated: {described} but {_where(path, data)} holds only {stored:,} "
                f"bytes of {layout.encoding} text, fewer than {needed:,}",
            )
        return
    expanded = layout.skip + nbytes
    what = f"its {layout.encoding}-compressed data ({layout.shape_text} voxels)"
    if expanded > limits.max_expanded_bytes:
        limits.check_expansion(path, expanded, stored, what)  # refused from the header alone
    # Decode no further than the ratio allows: a stream that ends first is truncated, one that goes on is a bomb.
    limit = min(expanded, int(stored * limits.max_compression_ratio) + 1)
    decoded = _decoded_length(path, data, layout.data_offset, layout.encoding, limit)
    if decoded < limit:
        raise CTInputError(
            path,
            f"truncated or damaged: {described} but {_where(path, data)} decompresses to only "
            f"{max(decoded - layout.skip, 0):,} bytes of voxel data",
        )
    limits.check_expansion(path, expanded, stored, what)


def _where(path: Path, data: Path) -> str:
    return "the file" if data == path else f"its data file {data.name}"


def _decoded_length(path: Path, data: Path, offset: int, encoding: str, limit: int) -> int:
    """How many bytes the compressed stream at ``offset`` of ``data`` decodes to, counting no further than
    ``limit``; decoded a megabyte at a time and thrown away, so memory stays small whatever the stream holds."""

    def new_decoder():
        # wbits 47: a gzip or a zlib stream (NRRD and .nii.gz are gzip, MetaImage zlib)
        return bz2.BZ2Decompressor() if encoding == "bzip2" else zlib.decompressobj(47)

    piece = 1 << 20
    decoded, decoder, pending = 0, new_decoder(), b""
    try:
        with open(data, "rb") as stream:
            stream.seek(offset)
            while decoded < limit:
                if encoding == "bzip2" and not decoder.needs_input:
                    chunk = b""  # output held back by the size cap: continue it
                else:
                    chunk, pending = pending or stream.read(piece), b""
                    if not chunk:
                        break  # the stored data ends here
                decoded += len(decoder.decompress(chunk, piece))
                if encoding != "bzip2":
                    pending = decoder.unconsumed_tail
                if decoder.eof:  # a gzip file may hold several members one after the other
                    pending, decoder = decoder.unused_data.lstrip(b"\0"), new_decoder()
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise CTInputError(
            path,
            f"not a readable {_grid_suffix(path)} image (compressed data truncated or damaged: " f"{_first_line(exc)})",
        ) from None
    return min(decoded, limit)


def _decoded_prefix(path: Path, size: int) -> bytes:
    """The first ``size`` decoded bytes of a gzip file (a .nii.gz header), read in small pieces."""
    decoder, out = zlib.decompressobj(47), b""
    try:
        with open(path, "rb") as stream:
            while len(out) < size and not decoder.eof:
                chunk = decoder.unconsumed_tail or stream.read(1 << 16)
                if not chunk:
                    break
                out += decoder.decompress(chunk, size - len(out))
    except zlib.error as exc:
        raise CTInputError(path, f"not a readable .nii.gz image (truncated or damaged: {_first_line(exc)})") from None
    return out


_NIFTI_TYPES = {
    2: "uint8",
    4: "int16",
    8: "int32",
    16: "float32",
    64: "float64",
    256: "int8",
    512: "uint16",
    768: "uint32",
    1024: "int64",
    1280: "uint64",
}


def _nifti_layout(path: Path) -> _DataLayout:
    """NIfTI-1 or -2 header, read by hand (348 or 540 bytes) so that nothing past it is read or allocated."""
    gz = path.name.lower().endswith(".gz")
    if gz:
        head = _decoded_prefix(path, 540)
    else:
        with open(path, "rb") as stream:
            head = stream.read(540)
    endian = next((e for e in "<>" if len(head) >= 4 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None)
    if endian is None:
        raise CTInputError(
            path, f"not a readable {_grid_suffix(path)} image (no NIfTI header: it starts with neither " "348 nor 540)"
        )
    header_size = struct.unpack(endian + "i", head[:4])[0]
    if len(head) < header_size:
        raise CTInputError(path, f"truncated: the file ends inside its {header_size}-byte NIfTI header")
    if header_size == 348:
        dim = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
        vox_offset = struct.unpack(endian + "f", head[108:112])[0]
        magic = head[344:348]
        if magic != b"n+1\0":
            raise CTInputError(
                path, f"not a single-file NIfTI-1 image (magic {magic!r}; a .hdr/.img pair or an " "ANALYZE file?)"
            )
    else:
        datatype, bitpix = struct.unpack(endian + "hh", head[12:16])
        dim = struct.unpack(endian + "8q", head[16:80])
        vox_offset = struct.unpack(endian + "q", head[168:176])[0]
        if head[4:12] != b"n+2\0\r\n\x1a\n":
            raise CTInputError(path, "not a single-file NIfTI-2 image (bad magic)")
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1 : ndim + 1]):
        raise CTInputError(path, f"damaged NIfTI header: dimensions {list(dim)}")
    if bitpix < 8 or bitpix % 8 or not math.isfinite(vox_offset) or vox_offset < 0:
        raise CTInputError(path, f"damaged NIfTI header: {bitpix} bits per voxel, data offset {vox_offset}")
    shape = [int(d) for d in dim[1 : ndim + 1]]
    offset = max(int(vox_offset), header_size)
    type_name = _NIFTI_TYPES.get(datatype, f"{bitpix}-bit")
    return _DataLayout(
        shape_text="x".join(map(str, shape)) + f" {type_name}",
        voxels=math.prod(shape),
        voxel_bytes=bitpix // 8,
        data_path=path,
        data_offset=0 if gz else offset,
        encoding="gzip" if gz else "raw",
        skip=offset if gz else 0,
    )


def _itk_header(path: Path) -> tuple[list[int], int, int, str]:
    """Size, components per voxel, bytes per component and pixel type (int16, ...), from the header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CTInputError(path, f"not a readable {_grid_suffix(path)} image ({_first_line(exc)})") from None
    one_voxel = sitk.Image([1, 1], reader.GetPixelID())
    components = int(reader.GetNumberOfComponents())
    pixel_type = str(sitk.GetArrayViewFromImage(one_voxel).dtype) + (f" x{components}" if components > 1 else "")
    return [int(s) for s in reader.GetSize()], components, int(one_voxel.GetSizeOfPixelComponent()), pixel_type


def _text_header(path: Path, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of a file with a text header (NRRD, MetaImage): headers are far smaller."""
    with open(path, "rb") as stream:
        return stream.read(limit)


def _detached(path: Path, name: str) -> Path:
    """A detached data file named in ``path``'s header; only beside the header (or below it) is read."""
    if name.upper() == "LIST" or "%" in name:
        raise CTInputError(
            path,
            f"its voxels are spread over several data files ({name!r}); lowdose reads one "
            "data file per volume (resave it as a single .nrrd, .mha or .nii.gz file)",
        )
    folder = path.parent.resolve()
    data = (folder / name).resolve()
    if folder not in data.parents:
        raise CTInputError(
            path,
            f"its data file {name!r} lies outside the header's folder; lowdose reads detached "
            "data only from the header's own folder",
        )
    return data


def _header_int(path: Path, fields: dict, key: str) -> int:
    try:
        return int(fields.get(key) or 0)
    except ValueError:
        raise CTInputError(path, f"damaged header: {key} is {fields[key]!r}, not a whole number") from None


def _nrrd_layout(path: Path) -> _DataLayout:
    size, components, component_bytes, pixel_type = _itk_header(path)
    raw = _text_header(path)
    if not raw.startswith(b"NRRD"):
        raise CTInputError(path, "not a readable .nrrd image (it does not start with NRRD)")
    # The header ends at the first blank line (the data follow it), or at the end of a detached header.
    ends = [i + len(blank) for blank in (b"\n\n", b"\r\n\r\n") if (i := raw.find(blank)) >= 0]
    header_end = min(ends) if ends else len(raw)
    fields = {}
    for line in raw[:header_end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    encoding = {
        "raw": "raw",
        "gzip": "gzip",
        "gz": "gzip",
        "bzip2": "bzip2",
        "bz2": "bzip2",
        "ascii": "ascii",
        "text": "ascii",
        "txt": "ascii",
        "hex": "hex",
    }.get(fields.get("encoding", "raw").lower())
    if encoding is None:
        raise CTInputError(path, f"NRRD encoding {fields.get('encoding')!r} is not supported")
    name = fields.get("data file", fields.get("datafile"))
    if name:
        data, offset = _detached(path, name), 0
    elif not ends:
        raise CTInputError(path, "truncated: the NRRD header has no end (no blank line) and names no data file")
    else:
        data, offset = path, header_end
    skip = _header_int(path, fields, "byte skip")
    return _layout(size, components, component_bytes, pixel_type, data, offset, encoding, skip)


def _layout(size, components, component_bytes, pixel_type, data: Path, offset: int, encoding: str, skip: int):
    """Where an ITK-style header's voxels are; ``skip`` -1 means the voxels are the last bytes of the file."""
    voxels = math.prod(size) * components
    if skip == -1 and encoding == "raw":
        offset, skip = max(data.stat().st_size - voxels * component_bytes, offset), 0
    return _DataLayout(
        shape_text="x".join(map(str, size)) + f" {pixel_type}",
        voxels=voxels,
        voxel_bytes=component_bytes,
        data_path=data,
        data_offset=offset,
        encoding=encoding,
        skip=max(skip, 0),
    )


def _metaimage_layout(path: Path) -> _DataLayout:
    size, components, component_bytes, pixel_type = _itk_header(path)
    raw = _text_header(path)
    fields, header_end, position = {}, None, 0
    for line in raw.split(b"\n"):
        position += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":  # the last line of a MetaImage header
            header_end = min(position, len(raw))
            break
    if header_end is None:
        raise CTInputError(path, "not a readable .mha image (no ElementDataFile line in the first MB)")
    name = fields["elementdatafile"]
    data, offset = (path, header_end) if name.upper() == "LOCAL" else (_detached(path, name), 0)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    binary = fields.get("binarydata", "true").lower() == "true"
    encoding = "gzip" if compressed else ("raw" if binary else "ascii")
    skip = _header_int(path, fields, "headersize") if encoding == "raw" else 0  # HeaderSize counts raw data only
    return _layout(size, components, component_bytes, pixel_type, data, offset, encoding, skip)


def _load_dicom_folder(folder: Path, series_uid: str | None, limits: InputLimits) -> CTVolume:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CTInputError(folder, "the folder is empty")
    return _load_dicom_files(folder, files, series_uid, limits)


def _load_dicom_files(source: Path, files: list[Path], series_uid: str | None, limits: InputLimits) -> CTVolume:
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
            raise CTInputError(
                source, f"no series with SeriesInstanceUID {series_uid}; " f"it holds: {_list_series(series)}"
            )
        chosen = series[series_uid]
    elif len(series) > 1:
        raise CTInputError(
            source,
            f"holds {len(series)} series; choose one by its SeriesInstanceUID "
            f"(series_uid= / --series): {_list_series(series)}",
        )
    else:
        chosen = next(iter(series.values()))
    return _assemble_series(source, chosen, limits)


def _list_series(series: dict[str, list]) -> str:
    parts = []
    for uid, items in series.items():
        ds = items[0][1]
        parts.append(f"{uid} ({ds.get('Modality', '?')}, '{ds.get('SeriesDescription', '')}', " f"{len(items)} files)")
    return "; ".join(parts)


def _assemble_series(source: Path, items: list, limits: InputLimits) -> CTVolume:
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
    limits.check_voxels(source, rows * cols * len(items), f"{len(items)} slices of {cols}x{rows}")
    storage = _pixel_storage(first)
    positions = np.array(
        [_checked_slice_position(f, ds, first, pixel_spacing, storage, len(items) > 1) for f, ds in items]
    )
    items, positions, along_normal = _sorted_along(source, items, positions, normal)
    hu, headers, padding_hu = _read_slices(items, rows, cols, storage)

    spacing_z = (
        float(np.median(np.diff(along_normal)))
        if len(items) > 1
        else float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    )
    # A regular grid needs equal steps along the normal and no in-plane shift (gantry tilt shifts it).
    expected = positions[0] + np.outer(along_normal - along_normal[0], normal)
    regular = bool(np.all(np.abs(positions - expected) < SLICE_SPACING_TOLERANCE_MM * 10)) and (
        len(items) < 3 or float(np.ptp(np.diff(along_normal))) < SLICE_SPACING_TOLERANCE_MM
    )
    metadata: dict[str, Any] = {
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


def _checked_slice_position(
    f: Path, ds, first, pixel_spacing: list[float], storage: tuple[int, int, int, int], several: bool
) -> np.ndarray:
    """The slice's ImagePositionPatient, after checking that it belongs to the series that ``first`` starts."""
    rows, cols = int(first.Rows), int(first.Columns)
    if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
        raise CTInputError(
            f, f"slice is {ds.Columns}x{ds.Rows} but the series starts at {cols}x{rows} " "(mixed series?)"
        )
    spacing = [float(v) for v in ds.get("PixelSpacing", pixel_spacing)]
    if not np.allclose(spacing, pixel_spacing, rtol=1e-4, atol=1e-5):
        raise CTInputError(
            f,
            f"pixel spacing {spacing[0]:g} x {spacing[1]:g} mm but the series starts at "
            f"{pixel_spacing[0]:g} x {pixel_spacing[1]:g} mm (mixed series?)",
        )
    if _pixel_storage(ds) != storage:
        raise CTInputError(
            f,
            f"pixels stored as {_storage_text(_pixel_storage(ds))} but the series starts with "
            f"{_storage_text(storage)} (mixed series?)",
        )
    orientation = np.array(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    iop = np.array(ds.get("ImageOrientationPatient", orientation), dtype=np.float64)
    if not np.allclose(iop, orientation, atol=1e-4):
        raise CTInputError(f, "slice orientation differs from the rest of the series (mixed series?)")
    if ds.get("Modality") != first.get("Modality"):
        raise CTInputError(f, f"modality {ds.get('Modality')} in a {first.get('Modality')} series (mixed series?)")
    if several and "ImagePositionPatient" not in ds:
        raise CTInputError(f, "no ImagePositionPatient: slices cannot be put in order")
    return np.array(ds.get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)


def _sorted_along(
    source: Path, items: list, positions: np.ndarray, normal: np.ndarray
) -> tuple[list, np.ndarray, np.ndarray]:
    """Slices, positions and distances along the normal in order, after refusing overlaps and missing slices."""
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    items = [items[i] for i in order]
    positions, along_normal = positions[order], along_normal[order]
    if len(items) > 1 and np.min(np.diff(along_normal)) < 1e-3:
        k = int(np.argmin(np.diff(along_normal)))
        raise CTInputError(
            source,
            f"two slices share the position {along_normal[k]:.2f} mm "
            f"({items[k][0].name}, {items[k + 1][0].name}): overlapping acquisitions "
            "or a mixed series; split it before loading",
        )
    missing = _missing_slices(items, along_normal)
    if missing:
        raise CTInputError(source, missing)
    return items, positions, along_normal


def _read_slices(
    items: list, rows: int, cols: int, storage: tuple[int, int, int, int]
) -> tuple[np.ndarray, list, float | None]:
    """The slices' HU ``[z, y, x]``, their headers (without pixel data) and the padding value in HU, if any."""
    hu = np.empty((len(items), rows, cols), dtype=np.float32)
    headers, padding_hu = [], None
    for k, (f, _) in enumerate(items):
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:
            raise CTInputError(f, f"damaged DICOM file ({_first_line(exc)})") from None
        _check_pixel_data_length(f, ds, rows, cols, storage)
        try:
            stored = ds.pixel_array
        except Exception as exc:
            raise CTInputError(
                f,
                f"cannot decode the pixel data ({_first_line(exc)}); compressed DICOM "
                "needs pylibjpeg with its openjpeg/libjpeg plug-ins (installed by setup)",
            ) from None
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        hu[k] = stored.astype(np.float32) * slope + intercept
        if "PixelPaddingValue" in ds:
            padding_hu = float(ds.PixelPaddingValue) * slope + intercept
        del ds.PixelData
        headers.append(ds)
    return hu, headers, padding_hu


def _pixel_storage(ds) -> tuple[int, int, int, int]:
    """(BitsAllocated, BitsStored, PixelRepresentation, SamplesPerPixel): how a slice's pixels are stored."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    return (
        bits,
        int(ds.get("BitsStored", bits) or bits),
        int(ds.get("PixelRepresentation", 0) or 0),
        int(ds.get("SamplesPerPixel", 1) or 1),
    )


def _storage_text(storage: tuple[int, int, int, int]) -> str:
    allocated, stored, signed, samples = storage
    return f"{stored} of {allocated} bits, {'signed' if signed else 'unsigned'}" + (
        f", {samples} samples" if samples != 1 else ""
    )


def _check_pixel_data_length(f: Path, ds, rows: int, cols: int, storage: tuple[int, int, int, int]) -> None:
    """Refuse native (uncompressed) pixel data shorter than Rows x Columns x samples x bytes: a cut slice."""
    if "PixelData" not in ds:
        raise CTInputError(f, "no pixel data in this slice")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return  # encapsulated frames: the decoder checks them
    allocated, _, _, samples = storage
    needed = rows * cols * samples * allocated // 8
    if len(ds.PixelData) < needed:
        raise CTInputError(
            f,
            f"pixel data holds {len(ds.PixelData):,} bytes but {rows} rows x {cols} columns x "
            f"{samples} sample(s) x {allocated // 8} bytes need {needed:,}: a truncated slice",
        )


def _missing_slices(items: list, along_normal: np.ndarray) -> str | None:
    """What is missing from a series sorted along its normal (None when nothing is).

    A step about k >= 2 times the series' usual step is k - 1 missing slices, unless the instance numbers
    on both sides of it are consecutive: then the spacing really changes there (the series is read slice
    by slice with its positions). Instance numbers that skip as many values as the step spans missing
    slices confirm the gap.
    """
    if len(items) < 3:
        return None
    steps = np.diff(along_normal)
    # The usual step: the one most other steps agree with (within 1 %), the smallest on a tie.
    agree = np.abs(steps[:, None] - steps[None, :]) <= np.maximum(0.01 * steps[:, None], SLICE_SPACING_TOLERANCE_MM)
    counts = agree.sum(axis=1)
    candidates = np.flatnonzero(counts == counts.max())
    usual_index = candidates[np.argmin(steps[candidates])]
    usual = float(np.median(steps[agree[usual_index]]))
    numbers = _instance_numbers(items)
    usual_number_step = None
    if numbers is not None:
        number_steps = np.abs(np.diff(numbers))
        usual_number_step = int(np.median(number_steps[agree[usual_index]]))
    gaps, missing = [], 0
    for i, step in enumerate(steps):
        ratio = step / usual
        k = int(round(ratio))
        geometric = k >= 2 and abs(ratio - k) <= MISSING_SLICE_TOLERANCE
        by_number = False
        if numbers is not None:
            number_step = abs(numbers[i + 1] - numbers[i])
            if number_step == usual_number_step:
                continue  # consecutive acquisitions: a genuine change of spacing, not a gap
            skipped = number_step / usual_number_step if usual_number_step else 0
            by_number = skipped >= 2 and skipped == int(skipped) and abs(ratio - skipped) <= 2 * MISSING_SLICE_TOLERANCE
            k = int(skipped) if by_number else k
        if geometric or by_number:
            missing += k - 1
            numbers_text = f", instance numbers {numbers[i]} and {numbers[i + 1]}" if numbers is not None else ""
            gaps.append(
                f"{step:.2f} mm between {items[i][0].name} and {items[i + 1][0].name} "
                f"(at {along_normal[i]:.2f} and {along_normal[i + 1]:.2f} mm{numbers_text})"
            )
    if not gaps:
        return None
    return (
        f"{missing} slice(s) missing from the series: it steps {usual:.2f} mm but has a gap of "
        + "; a gap of ".join(gaps[:3])
        + (f" and {len(gaps) - 3} more gaps" if len(gaps) > 3 else "")
        + "; export the complete series (lowdose does not fill missing slices)"
    )


def _instance_numbers(items: list) -> np.ndarray | None:
    """The slices' InstanceNumbers when they are usable to find gaps: all present, distinct, and rising or
    falling steadily along the slice normal; None otherwise."""
    try:
        numbers = np.array([int(ds.get("InstanceNumber")) for _, ds in items], dtype=np.int64)
    except (TypeError, ValueError):
        return None
    steps = np.diff(numbers)
    if len(set(numbers.tolist())) != len(numbers) or not (np.all(steps > 0) or np.all(steps < 0)):
        return None
    return numbers


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
    raise CTInputError(
        path,
        "multi-frame (enhanced) CT is not supported yet; export the study as " "single-frame CT Image Storage files",
    )


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
        raise CTInputError(
            path,
            f"values {lo:g}..{hi:g} with air near 0 look like stored pixel values "
            "without the rescale intercept (about -1024), not Hounsfield units",
        )


# ----------------------------------------------------------------------------------------- writing


def save_ct(volume: CTVolume, path: str | os.PathLike, *, description: str | None = None, dtype: str = "int16") -> Path:
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
    elif path.suffix.lower() in UNWRITABLE_SUFFIXES:
        raise CTOutputError(
            path,
            f"cannot write {path.suffix} files; use .nii.gz, .nii, .nrrd, .mha, or a " "folder name for a DICOM series",
        )
    else:
        _save_dicom_series(volume, path, description or "lowdose derived series")
    return path


def check_output_path(path: str | os.PathLike, inputs: tuple = ()) -> Path:
    """Refuse at once, before any compute, an output ``save_ct`` would refuse only after it.

    ``path`` is an output file (.nii.gz, .nii, .nrrd, .mha) or a new folder for a DICOM series; its folder
    must exist and be writable, its suffix be one lowdose writes, and it must be none of ``inputs`` nor lie
    inside an input folder. Raises ``CTOutputError`` naming the path and the problem; returns the path.
    """
    path = Path(path)
    suffix = _grid_suffix(path)
    if not suffix and path.suffix.lower() in UNWRITABLE_SUFFIXES:
        raise CTOutputError(
            path,
            f"cannot write {path.suffix} files; use .nii.gz, .nii, .nrrd, .mha, or a folder " "name for a DICOM series",
        )
    _check_output_parent(path)
    _check_not_an_input(path, inputs)
    if suffix and path.is_dir():
        raise CTOutputError(path, f"is a folder; a {suffix} output is a file")
    if not suffix and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CTOutputError(
            path,
            "already exists and is not an empty folder; a DICOM series is written into a new "
            "folder (lowdose never overwrites files it did not make)",
        )
    return path


def check_output_folder(path: str | os.PathLike, inputs: tuple = ()) -> Path:
    """Refuse at once a folder that outputs will be written into (made if missing): a file in its place, no
    writable folder to make it in, or one of ``inputs`` (or a folder inside one). Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CTOutputError(path, "is a file; an output folder is needed here")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CTOutputError(path, f"cannot create the folder {path} ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CTOutputError(path, f"the folder {existing} is not writable")
    _check_not_an_input(path, inputs)
    return path


def _check_output_parent(path: Path) -> None:
    parent = path.absolute().parent
    if not parent.exists():
        existing = next(p for p in parent.parents if p.exists())
        if not existing.is_dir():
            raise CTOutputError(path, f"cannot create the folder {parent} ({existing} is a file)")
        raise CTOutputError(path, f"the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise CTOutputError(path, f"cannot create the folder {parent} ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CTOutputError(path, f"the folder {parent} is not writable")


def _check_not_an_input(path: Path, inputs: tuple) -> None:
    target = path.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise CTOutputError(path, f"would overwrite or write into the input {source}; choose another output path")


def _refuse_overwriting_input(volume: CTVolume, path: Path) -> None:
    source = volume.metadata.get("path")
    if not source:
        return
    source, target = Path(source).resolve(), path.resolve()
    if target == source or source in target.parents or (source.is_file() and target == source.parent):
        raise CTOutputError(path, "would overwrite or write into the input; choose another output path")


def _save_grid_file(volume: CTVolume, path: Path, dtype: str) -> None:
    if not volume.is_regular_grid:
        raise CTOutputError(
            path,
            f"the slices are not on a regular grid "
            f"({volume.metadata.get('irregular_reason', 'irregular positions')}): "
            "write a DICOM series instead (an output path without a file suffix)",
        )
    image = sitk.GetImageFromArray(_to_stored(volume.hu, dtype))
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin_mm)
    image.SetDirection(tuple(volume.direction.reshape(-1)))
    suffix = _grid_suffix(path)
    assert suffix is not None  # save_ct sends only paths with a grid suffix here
    with atomic_output(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=suffix != ".nii")


def _to_stored(hu: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return hu.astype(np.float32)
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def _save_dicom_series(volume: CTVolume, folder: Path, description: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CTOutputError(
            folder,
            "already exists and is not an empty folder; a DICOM series is written "
            "into a new folder (lowdose never overwrites files it did not make)",
        )
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


# Elements of a source header that describe its own pixel data: dropped from each derived slice.
_SOURCE_PIXEL_KEYWORDS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingRangeLimit",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelData",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def _derived_datasets(volume: CTVolume, description: str) -> list[Dataset]:
    """One DICOM dataset per slice: a DERIVED\\SECONDARY CT series of the source, same geometry, int16 HU."""
    nz, ny, nx = volume.shape
    sources = volume.metadata.get("dicom_headers")
    if not sources or len(sources) != nz or any((int(h.Rows), int(h.Columns)) != (ny, nx) for h in sources):
        sources = None
    template = _new_study_header() if sources is None else None
    series_uid = generate_uid()
    # Anonymised exports sometimes blank the study and frame UIDs; a PACS refuses a series without them.
    missing_uids = {
        keyword: generate_uid()
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID")
        if sources is not None and not str(sources[0].get(keyword, "") or "")
    }
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
        base = source if source is not None else template
        assert base is not None  # the new study header stands in whenever there are no source headers
        ds = copy.deepcopy(base)
        for keyword in _SOURCE_PIXEL_KEYWORDS:
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


def _new_study_header() -> Dataset:
    """Header for a series whose source was not DICOM: a new anonymous patient and study."""
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
