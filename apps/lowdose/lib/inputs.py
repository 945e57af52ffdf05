"""What a request brings: a CT file, a DICOM series folder, or a zip of either, read with lowdose.load_ct."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from lowdose import load_ct
from lowdose.errors import CTInputError
from lowdose.io import GRID_SUFFIXES

MAX_ZIP_MEMBERS = 20000


def read_ct(path: str | Path, max_unzipped_bytes: int):
    """The CTVolume in ``path``; a zip (a DICOM series or one NIfTI/NRRD/MHA file) is unpacked beside it."""
    path = Path(path)
    if path.is_file() and _is_zip(path):
        return load_ct(_unzip(path, max_unzipped_bytes))
    return load_ct(path)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _unzip(path: Path, max_bytes: int) -> Path:
    """Unpack under new names (never the archive's paths) and within a size limit; return what to load."""
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
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise CTInputError(path, f"the zip file unpacks to {declared / 2**20:.0f} MB, more than this server's "
                                     f"limit of {max_bytes / 2**20:.0f} MB")
        folder = Path(tempfile.mkdtemp(prefix="unzipped-", dir=path.parent))
        grids, written = [], 0
        for k, member in enumerate(members):
            suffix = next((s for s in GRID_SUFFIXES if member.filename.lower().endswith(s)), ".dcm")
            target = folder / f"{k:05d}{suffix}"
            try:
                with archive.open(member) as source, open(target, "wb") as sink:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:  # a header that lied about the sizes
                            raise CTInputError(path, "the zip file unpacks to more than this server's limit of "
                                                     f"{max_bytes / 2**20:.0f} MB")
                        sink.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError) as exc:
                raise CTInputError(path, f"a damaged zip file ({type(exc).__name__})") from None
            if suffix != ".dcm":
                grids.append(target)
    if grids:
        if len(grids) > 1 or len(grids) != len(members):
            raise CTInputError(path, f"the zip file holds {len(members)} files with {len(grids)} NIfTI/NRRD/MHA "
                                     "volumes; send one volume (or one DICOM series) per request")
        return grids[0]
    return folder


def _ignored(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith(".") or parts[-1].upper() == "DICOMDIR"
