"""What a request brings: a CT file, a DICOM series folder, or a zip of either, read with lowdose.load_ct.

A zip is judged by the sizes its central directory declares before anything is extracted (total expanded
size, expansion ratio overall and per member), then unpacked under new names while the bytes actually
written are counted against the same limit, in case the directory lied.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from lowdose import load_ct
from lowdose.errors import CTInputError
from lowdose.io import GRID_SUFFIXES
from lowdose.limits import InputLimits

MAX_ZIP_MEMBERS = 20000
# Members smaller than this are not judged alone (a short text file may compress oddly); the total still is.
MEMBER_RATIO_MIN_BYTES = 1 << 20


def read_ct(path: str | Path, limits: InputLimits):
    """The CTVolume in ``path``; a zip (a DICOM series or one NIfTI/NRRD/MHA file) is unpacked beside it.

    ``limits`` bounds the zip's expanded size and ratio and is passed on to ``load_ct``.
    """
    path = Path(path)
    if path.is_file() and _is_zip(path):
        return load_ct(_unzip(path, limits), limits=limits)
    return load_ct(path, limits=limits)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _unzip(path: Path, limits: InputLimits) -> Path:
    """Unpack under new names (never the archive's paths) and within ``limits``; return what to load."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CTInputError(path, f"a damaged zip file ({exc})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not _ignored(m.filename)]
        if not members:
            raise CTInputError(path, "the zip file holds no files")
        if len(members) > MAX_ZIP_MEMBERS:
            raise CTInputError(path, f"the zip file holds {len(members)} files; at most {MAX_ZIP_MEMBERS} are read")
        _check_declared_sizes(path, members, limits)
        folder = Path(tempfile.mkdtemp(prefix="unzipped-", dir=path.parent))
        try:
            grids = _extract(path, archive, members, folder, limits.max_expanded_bytes)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # nothing half-unpacked stays on the server's disk
            raise
    if grids:
        if len(grids) > 1 or len(grids) != len(members):
            shutil.rmtree(folder, ignore_errors=True)
            raise CTInputError(
                path,
                f"the zip file holds {len(members)} files with {len(grids)} NIfTI/NRRD/MHA "
                "volumes; send one volume (or one DICOM series) per request",
            )
        return grids[0]
    return folder


def _check_declared_sizes(path: Path, members: list[zipfile.ZipInfo], limits: InputLimits) -> None:
    """Refuse, from the central directory alone, a zip that would expand beyond ``limits``."""
    expanded = sum(m.file_size for m in members)
    compressed = sum(m.compress_size for m in members)
    limits.check_expansion(path, expanded, compressed, what="the zip file")
    for m in members:
        if m.file_size >= MEMBER_RATIO_MIN_BYTES:
            limits.check_expansion(path, m.file_size, m.compress_size, what=f"the zip member {m.filename!r}")


def _extract(
    path: Path, archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], folder: Path, max_bytes: int
) -> list[Path]:
    """Write the members into ``folder`` as 00000.dcm, 00001.nii.gz, ...; return the grid files written."""
    grids, written = [], 0
    for k, member in enumerate(members):
        suffix = next((s for s in GRID_SUFFIXES if member.filename.lower().endswith(s)), ".dcm")
        target = folder / f"{k:05d}{suffix}"
        try:
            with archive.open(member) as source, open(target, "wb") as sink:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:  # a directory that lied about the sizes
                        raise CTInputError(
                            path,
                            "the zip file unpacks to more than the limit of "
                            f"{max_bytes / 2**20:.0f} MiB (LOWDOSE_MAX_EXPANDED_MB)",
                        )
                    sink.write(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
            if isinstance(exc, CTInputError):
                raise
            raise CTInputError(path, f"a damaged zip file ({type(exc).__name__}: {exc})") from None
        if suffix != ".dcm":
            grids.append(target)
    return grids


def _ignored(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith(".") or parts[-1].upper() == "DICOMDIR"
