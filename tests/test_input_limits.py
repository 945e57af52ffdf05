"""Bounded input: headers are checked against the data present and against InputLimits before any voxel is
read or allocated; truncated files, decompression bombs and zip bombs are refused with one clear error."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lowdose import CTInputError, LowdoseError, load_ct
from lowdose.limits import InputLimits

from .conftest import REPO, SAMPLE_DICOM, shared

SMALL_CT = "totalsegmentator/example_ct_sm.nii.gz"  # 122x101x30 int16, 739,320 bytes of voxels


def _app_inputs():
    """apps/lowdose/lib/inputs.py, the server's upload reader (the app folder is not a package)."""
    spec = importlib.util.spec_from_file_location("lowdose_app_inputs", REPO / "apps" / "lowdose" / "lib" / "inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _resave(path: Path, compress: bool) -> Path:
    """The small shared CT rewritten in ``path``'s format, compressed or not."""
    sitk.WriteImage(sitk.ReadImage(str(shared(SMALL_CT))), str(path), useCompression=compress)
    return path


def _cut(path: Path, fraction: float = 2 / 3) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ------------------------------------------------------------------------------------------------ limits


def test_limits_defaults_and_environment():
    assert InputLimits() == InputLimits(1024 * 1024 * 3000, 2 * 2**30, 100.0)
    assert InputLimits.from_env({}) == InputLimits()
    limits = InputLimits.from_env(
        {"LOWDOSE_MAX_VOXELS": "1000", "LOWDOSE_MAX_EXPANDED_MB": "1.5", "LOWDOSE_MAX_COMPRESSION_RATIO": "20"}
    )
    assert limits == InputLimits(max_voxels=1000, max_expanded_bytes=int(1.5 * 2**20), max_compression_ratio=20.0)
    for name, bad in (
        ("LOWDOSE_MAX_VOXELS", "lots"),
        ("LOWDOSE_MAX_VOXELS", "1e6"),
        ("LOWDOSE_MAX_EXPANDED_MB", "-5"),
        ("LOWDOSE_MAX_COMPRESSION_RATIO", "0"),
        ("LOWDOSE_MAX_COMPRESSION_RATIO", "nan"),
    ):
        with pytest.raises(LowdoseError, match=f"^{name}='{bad}': must be") as info:
            InputLimits.from_env({name: bad})
        assert "\n" not in str(info.value)
    with pytest.raises(LowdoseError, match="max_voxels must be a positive number"):
        InputLimits(max_voxels=0)


def test_load_ct_reads_the_limits_from_the_environment(monkeypatch):
    ct = shared(SMALL_CT)
    monkeypatch.setenv("LOWDOSE_MAX_VOXELS", str(122 * 101 * 30 - 1))
    with pytest.raises(CTInputError, match=r"122x101x30 int16 = 369,660 voxels, more than the limit of 369,659"):
        load_ct(ct)
    monkeypatch.setenv("LOWDOSE_MAX_VOXELS", str(122 * 101 * 30))
    assert load_ct(ct).shape == (30, 101, 122)
    monkeypatch.setenv("LOWDOSE_MAX_VOXELS", "many")
    with pytest.raises(LowdoseError, match="LOWDOSE_MAX_VOXELS='many'"):
        load_ct(ct)


# ------------------------------------------------------------------------------------ truncated grid files


def test_truncated_nifti_is_refused_instead_of_zero_filled(tmp_path):
    """SimpleITK reads a cut .nii as the full volume with zeros where the data is missing; load_ct refuses it."""
    original = load_ct(shared(SMALL_CT))
    cut = _cut(_resave(tmp_path / "ct.nii", compress=False))
    zero_filled = sitk.GetArrayFromImage(sitk.ReadImage(str(cut)))  # the hazard, as SimpleITK has it
    assert zero_filled.shape == original.shape and np.all(zero_filled[-5:] == 0)
    assert not np.all(original.hu[-5:] == 0)
    with pytest.raises(
        CTInputError,
        match=r"truncated: the header describes 122x101x30 int16 voxels "
        r"\(739,320 bytes\) but the file holds only [\d,]+ bytes",
    ) as info:
        load_ct(cut)
    assert str(cut) in str(info.value)


@pytest.mark.parametrize(
    "name, compress, problem",
    [
        ("ct.nrrd", False, "truncated: the header describes 122x101x30 int16"),
        ("ct.nrrd", True, "truncated or damaged: the header describes 122x101x30 int16"),
        ("ct.mha", False, "truncated: the header describes 122x101x30 int16"),
        ("ct.mha", True, "truncated or damaged: the header describes 122x101x30 int16"),
        ("ct.nii.gz", True, "truncated or damaged: the header describes 122x101x30 int16"),
    ],
)
def test_truncated_nrrd_mha_and_gzip_name_the_file_and_the_sizes(tmp_path, name, compress, problem):
    path = _cut(_resave(tmp_path / name, compress))
    with pytest.raises(CTInputError, match=problem) as info:
        load_ct(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert load_ct(_resave(tmp_path / f"whole_{name}", compress)).shape == (30, 101, 122)  # the uncut file reads


def test_detached_data_files_are_checked_too(tmp_path):
    """An NRRD/MetaImage header may name its data file: it must exist, be complete, and lie beside the header."""
    original = load_ct(shared(SMALL_CT))
    sitk.WriteImage(sitk.ReadImage(str(shared(SMALL_CT))), str(tmp_path / "n.nhdr"), useCompression=False)
    sitk.WriteImage(sitk.ReadImage(str(shared(SMALL_CT))), str(tmp_path / "m.mhd"), useCompression=False)
    # lowdose reads the .nrrd / .mha suffixes: the same headers under those names
    nrrd, mha = tmp_path / "detached.nrrd", tmp_path / "detached.mha"
    shutil.copy(tmp_path / "n.nhdr", nrrd)
    shutil.copy(tmp_path / "m.mhd", mha)
    [nrrd_data] = [
        line.split(":", 1)[1].strip() for line in nrrd.read_text().splitlines() if line.startswith("data file")
    ]
    [mha_data] = [
        line.split("=", 1)[1].strip() for line in mha.read_text().splitlines() if line.startswith("ElementDataFile")
    ]
    for header in (nrrd, mha):
        np.testing.assert_array_equal(load_ct(header).hu, original.hu)
    _cut(tmp_path / nrrd_data)
    with pytest.raises(CTInputError, match=f"truncated: .* but its data file {nrrd_data} holds only"):
        load_ct(nrrd)
    (tmp_path / mha_data).unlink()
    with pytest.raises(CTInputError, match=f"its data file {mha_data} is missing"):
        load_ct(mha)
    # a header in an upload folder must not make the server read another file on its disk
    outside = tmp_path.parent / f"{tmp_path.name}_elsewhere.raw"
    outside.write_bytes(bytes(739_320))
    try:
        mha.write_text(mha.read_text().replace(f"ElementDataFile = {mha_data}", f"ElementDataFile = {outside}"))
        with pytest.raises(CTInputError, match="lies outside the header's folder"):
            load_ct(mha)
    finally:
        outside.unlink()


# ------------------------------------------------------------------------------------ decompression bombs


def _nifti_header_bomb(path: Path, shape=(2048, 2048, 64), zero_bytes=1 << 20) -> Path:
    """A .nii.gz of about 1 kB whose header claims ``shape`` int16 voxels (512 MiB) over 1 MiB of zeros."""
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    raw = io.BytesIO()
    header.write_to(raw)
    raw.write(b"\0" * (352 - raw.tell()))  # empty extension block: the voxels start at 352
    with gzip.open(path, "wb", compresslevel=9) as stream:
        stream.write(raw.getvalue())
        stream.write(bytes(zero_bytes))
    return path


def test_nifti_header_bomb_is_refused_at_once_without_allocating(tmp_path):
    """Measured in a fresh process: how long load_ct takes to refuse, and the process's peak memory."""
    bomb = _nifti_header_bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 1500
    # VmHWM, not getrusage: ru_maxrss keeps the high-water mark of the pytest process the child was forked from
    script = (
        "import json, re, sys, time\n"
        "import SimpleITK\n"  # imported before the clock starts: the refusal is timed, not the imports
        "from lowdose import load_ct\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_ct(sys.argv[1]); error = None\n"
        "except Exception as exc:\n"
        "    error = f'{type(exc).__name__}: {exc}'\n"
        "seconds = time.perf_counter() - t\n"
        "peak_kb = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "print(json.dumps({'seconds': seconds, 'error': error, 'peak_mb': peak_kb / 1024}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["error"].startswith(
        f"CTInputError: {bomb}: its gzip-compressed data (2048x2048x64 int16 voxels) " "would expand"
    ), measured
    assert "LOWDOSE_MAX_COMPRESSION_RATIO" in measured["error"]
    # the voxels alone would be 512 MiB (int16) and 1 GiB more as float32
    assert measured["peak_mb"] < 400, measured
    assert measured["seconds"] < 1.0, measured


def test_header_without_its_data_is_truncated_not_a_bomb(tmp_path):
    """The same header over no voxels at all: the stream ends long before the limits, so it is truncated."""
    bomb = _nifti_header_bomb(tmp_path / "empty.nii.gz", zero_bytes=0)
    with pytest.raises(CTInputError, match="truncated or damaged: .* decompresses to only 0 bytes of voxel data"):
        load_ct(bomb)


def _gzip_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip stream
    piece = bytes(1 << 20)
    return b"".join(compressor.compress(piece) for _ in range(size // len(piece))) + compressor.flush()


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_compressed_nrrd_and_mha_bombs_are_refused(tmp_path, suffix):
    """64 slices of 512x512 zeros (32 MiB) gzip to 33 kB: 1000:1, far beyond CT's 3:1."""
    zeros = _gzip_zeros(512 * 512 * 64 * 2)
    if suffix == ".nrrd":
        header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 64\nencoding: gzip\nendian: little\n\n"
    else:
        header = (
            "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"CompressedData = True\nCompressedDataSize = {len(zeros)}\nDimSize = 512 512 64\n"
            "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
        )
    bomb = tmp_path / f"zeros{suffix}"
    bomb.write_bytes(header.encode() + zeros)
    started = time.perf_counter()
    with pytest.raises(CTInputError, match=r"512x512x64 int16 voxels\) would expand [\d,]+ times"):
        load_ct(bomb)
    assert time.perf_counter() - started < 2.0
    with pytest.raises(CTInputError, match="would expand to 32.0 MiB, more than the limit of 16.0 MiB"):
        load_ct(bomb, limits=InputLimits(max_expanded_bytes=16 * 2**20, max_compression_ratio=1e6))
    # with limits that allow it, the same file is read: the check refuses bombs, not the format
    with pytest.raises(CTInputError, match="every voxel is 0"):
        load_ct(bomb, limits=InputLimits(max_compression_ratio=1e6))


def test_real_compressed_ct_passes_the_limits_and_a_lower_ratio_refuses_it(tmp_path):
    import nibabel

    ct = shared(SMALL_CT)
    header = nibabel.load(ct).header
    expanded = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    ratio = expanded / ct.stat().st_size
    assert 1.2 < ratio < 5  # what real CT compresses to
    assert load_ct(ct, limits=InputLimits(max_compression_ratio=ratio * 1.01)).shape == (30, 101, 122)
    with pytest.raises(CTInputError, match="would expand"):
        load_ct(ct, limits=InputLimits(max_compression_ratio=ratio * 0.99))


# ------------------------------------------------------------------------------------ zip uploads


def _zip_of_zeros(path: Path, size: int, name: str = "ct.nii", declared_size: int | None = None) -> Path:
    """A zip with one member of ``size`` zero bytes deflated about 1000:1, written by hand (fast: the same
    compressed megabyte repeated) so that a 2 GiB member takes a second to make; ``declared_size`` lets the
    central directory lie about it."""
    piece = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(piece) + compressor.flush(zlib.Z_FULL_FLUSH)  # self-contained: repeatable
    data = block * (size // len(piece)) + compressor.flush()
    crc = 0
    for _ in range(size // len(piece)):
        crc = zlib.crc32(piece, crc)
    declared = size if declared_size is None else declared_size
    encoded = name.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), declared, len(encoded), 0)
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        20,
        20,
        0,
        8,
        0,
        0,
        crc,
        len(data),
        declared,
        len(encoded),
        0,
        0,
        0,
        0,
        0o100644 << 16,
        0,
    )
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(encoded), len(local) + len(encoded) + len(data), 0
    )
    path.write_bytes(local + encoded + data + central + encoded + end)
    return path


def test_zip_bomb_is_refused_from_its_declared_sizes_before_extracting(tmp_path):
    inputs = _app_inputs()
    upload = tmp_path / "upload"
    upload.mkdir()
    bomb = _zip_of_zeros(upload / "bomb.zip", 2 * 2**30)
    assert bomb.stat().st_size < 2.5e6
    with zipfile.ZipFile(bomb) as archive:  # a well-formed zip: Python's own reader sees 2 GiB in it
        assert archive.infolist()[0].file_size == 2 * 2**30
    started = time.perf_counter()
    with pytest.raises(CTInputError, match=r"the zip file would expand 1,01\d times .* than the limit of 100"):
        inputs.read_ct(bomb, InputLimits())
    seconds = time.perf_counter() - started
    with pytest.raises(CTInputError, match="would expand to 2.0 GiB, more than the limit of 1.0 GiB"):
        inputs.read_ct(bomb, InputLimits(max_expanded_bytes=2**30, max_compression_ratio=1e6))
    assert seconds < 1.0
    # nothing was extracted: the upload folder holds the 2 MB zip and nothing else
    assert sorted(p.name for p in upload.iterdir()) == ["bomb.zip"]
    assert _folder_bytes(upload) == bomb.stat().st_size


def test_zip_whose_directory_understates_its_sizes_is_refused_and_cleaned_up(tmp_path):
    """The central directory says 64 kB, the member really holds 64 MiB: extraction stops at the declared size."""
    inputs = _app_inputs()
    upload = tmp_path / "upload"
    upload.mkdir()
    liar = _zip_of_zeros(upload / "liar.zip", 64 * 2**20, declared_size=64 * 1024)
    with pytest.raises(CTInputError, match="a damaged zip file"):
        inputs.read_ct(liar, InputLimits())
    assert sorted(p.name for p in upload.iterdir()) == ["liar.zip"]


def test_zipped_real_ct_still_reads_within_the_limits(tmp_path):
    inputs = _app_inputs()
    series = tmp_path / "series.zip"
    with zipfile.ZipFile(series, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in sorted(SAMPLE_DICOM.iterdir()):
            archive.write(f, f"study/{f.name}")
    volume = inputs.read_ct(series, InputLimits())
    np.testing.assert_array_equal(volume.hu, load_ct(SAMPLE_DICOM).hu)
    nifti = tmp_path / "nifti.zip"
    with zipfile.ZipFile(nifti, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(shared(SMALL_CT), "ct.nii.gz")
    assert inputs.read_ct(nifti, InputLimits()).shape == (30, 101, 122)
    # the limits reach load_ct: the unzipped volume is judged by them too
    with pytest.raises(CTInputError, match="more than the limit of 1,000"):
        inputs.read_ct(nifti, InputLimits(max_voxels=1000))
