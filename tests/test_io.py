"""CT I/O on real data: HU and geometry survive every format; bad input gives a clear, named error."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lowdose import CTInputError, CTOutputError, CTVolume, load_ct, save_ct

from .conftest import SAMPLE_DICOM, shared


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def _assert_same_geometry(a: CTVolume, b: CTVolume, tol: float = 1e-4):
    np.testing.assert_allclose(a.spacing_mm, b.spacing_mm, atol=tol)
    np.testing.assert_allclose(a.origin_mm, b.origin_mm, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


# ------------------------------------------------------------------------------------ reading


def test_sample_dicom_matches_an_independent_reader(sample_volume):
    """Our pydicom path (JPEG 2000, rescale, slice order) agrees with SimpleITK/GDCM voxel for voxel."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SAMPLE_DICOM)))
    reference = reader.Execute()
    assert sample_volume.shape == (20, 512, 512)
    np.testing.assert_array_equal(sample_volume.hu, sitk.GetArrayFromImage(reference).astype(np.float32))
    np.testing.assert_allclose(sample_volume.spacing_mm, reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(sample_volume.origin_mm, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(sample_volume.direction.reshape(-1), reference.GetDirection(), atol=1e-6)
    assert sample_volume.hu.dtype == np.float32
    assert (sample_volume.hu.min(), sample_volume.hu.max()) == (-1024.0, 1839.0)
    assert sample_volume.is_regular_grid


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path):
    """Files renamed in reverse order still give slices sorted along the slice normal."""
    source = shared("tcia_pancreatic_ct_cbct_seg")
    files = sorted(source.glob("*.dcm"))[:6]
    for k, f in enumerate(files):
        shutil.copy(f, tmp_path / f"{len(files) - k:02d}.dcm")
    volume = load_ct(tmp_path)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert volume.origin_mm[2] == pytest.approx(min(z))
    assert volume.spacing_mm[2] == pytest.approx(3.0, abs=1e-3)
    first = pydicom.dcmread(files[int(np.argmin(z))])
    np.testing.assert_array_equal(
        volume.hu[0], first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    )


def test_single_slice_files_and_compressed_transfer_syntax():
    j2k = load_ct(shared("pydicom/pancreas_ct_0001_slice_j2k.dcm"))
    assert j2k.shape == (1, 512, 512)
    assert j2k.hu.min() == -1024 and j2k.hu.max() == 1186
    small = load_ct(shared("pydicom/CT_small.dcm"))
    assert small.shape == (1, 128, 128)
    assert small.spacing_mm[0] == pytest.approx(0.661468)


def test_headerless_series_without_modality_loads():
    volume = load_ct(shared("lungmask_chest"))
    assert volume.shape == (2, 512, 512)
    assert volume.spacing_mm[:2] == pytest.approx((0.625, 0.625))


def test_gantry_tilted_series_keeps_every_slice_position(tmp_path):
    """The GE head series (18.5 degree tilt, 4 and 7 mm slices) is not a regular grid: say so, and keep
    each slice's own position when writing it back as DICOM."""
    source = shared("dcmqa_ge_head")
    volume = load_ct(source)
    assert volume.shape == (28, 512, 512)
    assert not volume.is_regular_grid
    reason = volume.metadata["irregular_reason"]
    assert "tilt of 18.5 degrees" in reason and "spacing varies" in reason
    assert volume.metadata["padding_value_hu"] == -1500
    with pytest.raises(CTOutputError, match="not on a regular grid"):
        save_ct(volume, tmp_path / "head.nii.gz")
    save_ct(volume, tmp_path / "head_dicom")
    back = load_ct(tmp_path / "head_dicom")
    np.testing.assert_allclose(back.slice_positions_mm, volume.slice_positions_mm, atol=1e-4)
    np.testing.assert_array_equal(back.hu, volume.hu)
    assert back.metadata["padding_value_hu"] == -1500


# ------------------------------------------------------------------------------------ round trips


def test_dicom_to_nifti_to_dicom_keeps_hu_and_geometry(tmp_path):
    """The 134-slice TCIA series survives DICOM -> NIfTI -> DICOM exactly (int16 HU) to 1e-4 mm."""
    source = shared("tcia_pancreatic_ct_cbct_seg")
    original = load_ct(source)
    assert original.shape == (134, 512, 512)
    save_ct(original, tmp_path / "ct.nii.gz")
    nifti = load_ct(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(nifti.hu, original.hu)
    _assert_same_geometry(nifti, original)
    save_ct(nifti, tmp_path / "dicom_again")
    again = load_ct(tmp_path / "dicom_again")
    np.testing.assert_array_equal(again.hu, original.hu)
    _assert_same_geometry(again, original)


def test_nifti_to_nrrd_and_mha_keep_hu_and_geometry(tmp_path):
    original = load_ct(shared("totalsegmentator/example_ct_sm.nii.gz"))
    assert original.shape == (30, 101, 122)
    for name in ("ct.nrrd", "ct.mha", "ct.nii"):
        save_ct(original, tmp_path / name)
        back = load_ct(tmp_path / name)
        np.testing.assert_array_equal(back.hu, original.hu)
        _assert_same_geometry(back, original)


def test_a_slab_of_slices_keeps_its_place_in_space(tmp_path):
    """volume.slices(a, b) is the same voxels in the same place, through a DICOM round trip too
    (regular and gantry-tilted series)."""
    for source in (SAMPLE_DICOM, shared("dcmqa_ge_head")):
        volume = load_ct(source)
        slab = volume.slices(3, 7)
        assert slab.shape == (4, *volume.shape[1:])
        np.testing.assert_array_equal(slab.hu, volume.hu[3:7])
        written = load_ct(save_ct(slab, tmp_path / f"slab_{Path(source).name}"))
        np.testing.assert_allclose(written.hu, np.rint(volume.hu[3:7]), atol=0.5)
        if volume.is_regular_grid:
            # voxel (0, 0, 3) of the volume is voxel (0, 0, 0) of the slab
            np.testing.assert_allclose(written.affine_lps()[:3, 3], (volume.affine_lps() @ [0, 0, 3, 1])[:3], atol=1e-3)
            np.testing.assert_allclose(written.affine_lps(), slab.affine_lps(), atol=1e-3)
        else:
            np.testing.assert_allclose(written.slice_positions_mm, volume.slice_positions_mm[3:7], atol=1e-3)
    with pytest.raises(ValueError, match="no slices"):
        volume.slices(5, 5)


def test_outputs_get_the_permissions_of_plain_files_not_of_temporary_ones(tmp_path, sample_volume):
    """Atomic writes go through temporary files (0600, folders 0700); the results must be readable by
    whoever the umask allows, e.g. a PACS gateway account reading the server's outputs."""
    import os

    from lowdose.bundle import atomic_torch_save

    old = os.umask(0o022)
    try:
        volume = sample_volume.slices(0, 2)
        written = [
            save_ct(volume, tmp_path / "v.nii.gz"),
            save_ct(volume, tmp_path / "v.mha"),
            save_ct(volume, tmp_path / "series"),
        ]
        atomic_torch_save({"weights": 1}, tmp_path / "model.pt")
    finally:
        os.umask(old)
    for path in [*written[:2], tmp_path / "model.pt", *sorted((tmp_path / "series").iterdir())]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "series").stat().st_mode & 0o777 == 0o755


def test_float32_output_keeps_fractional_hu(tmp_path, sample_volume):
    volume = CTVolume(
        hu=sample_volume.hu[:3] + 0.25,
        spacing_mm=sample_volume.spacing_mm,
        origin_mm=sample_volume.origin_mm,
        direction=sample_volume.direction,
    )
    save_ct(volume, tmp_path / "f.nii.gz", dtype="float32")
    np.testing.assert_array_equal(load_ct(tmp_path / "f.nii.gz").hu, volume.hu)
    save_ct(volume, tmp_path / "i.nii.gz")
    assert np.abs(load_ct(tmp_path / "i.nii.gz").hu - volume.hu).max() <= 0.5


def test_dicom_output_is_a_proper_derived_series(tmp_path):
    _copy_series(shared("tcia_pancreatic_ct_cbct_seg"), tmp_path / "source", 6)
    volume = load_ct(tmp_path / "source")
    save_ct(volume, tmp_path / "derived", description="lowdose test series")
    files = sorted((tmp_path / "derived").iterdir())
    assert len(files) == 6
    sources = {ds.SOPInstanceUID: ds for ds in volume.metadata["dicom_headers"]}
    series_uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        series_uids.add(ds.SeriesInstanceUID)
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "lowdose test series"
        assert ds.SOPInstanceUID not in sources
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert list(ds.ImagePositionPatient) == pytest.approx(list(source.ImagePositionPatient), abs=1e-4)
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
        assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, 0)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert len(series_uids) == 1 and volume.metadata["series_uid"] not in series_uids
    back = load_ct(tmp_path / "derived")
    np.testing.assert_array_equal(back.hu, volume.hu)
    _assert_same_geometry(back, volume)


def test_derived_series_of_an_export_with_blank_uids_gets_valid_ones(tmp_path, sample_volume):
    """The bundled sample has blank Study/SOP Instance UIDs; its derived series must still be storable."""
    save_ct(sample_volume, tmp_path / "derived")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((tmp_path / "derived").iterdir())]
    assert len({h.StudyInstanceUID for h in headers}) == 1 and headers[0].StudyInstanceUID
    assert len({h.SOPInstanceUID for h in headers}) == 20 and all(h.SOPInstanceUID for h in headers)
    assert headers[0].FrameOfReferenceUID == sample_volume.metadata["dicom_headers"][0].FrameOfReferenceUID
    back = load_ct(tmp_path / "derived")
    np.testing.assert_array_equal(back.hu, sample_volume.hu)
    _assert_same_geometry(back, sample_volume)


def test_inputs_are_never_modified(tmp_path, sample_volume):
    before = _tree_digest(SAMPLE_DICOM)
    volume = load_ct(SAMPLE_DICOM)
    volume.hu += 100
    save_ct(volume, tmp_path / "out")
    save_ct(volume, tmp_path / "out.nii.gz")
    assert _tree_digest(SAMPLE_DICOM) == before
    with pytest.raises(CTOutputError, match="overwrite or write into the input"):
        save_ct(volume, SAMPLE_DICOM / "inside")
    nifti = load_ct(tmp_path / "out.nii.gz")
    with pytest.raises(CTOutputError, match="overwrite"):
        save_ct(nifti, tmp_path / "out.nii.gz")


# ------------------------------------------------------------------------------------ bad input


def _write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_4d_nifti(path: Path) -> Path:
    """A 4-D (time series) image as nibabel writes it: dim[0] = 4."""
    import nibabel

    data = np.random.default_rng(0).normal(0, 100, (8, 8, 3, 2)).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda d: d / "missing.nii.gz", "no such file"),
        (lambda d: _write_bytes(d / "empty.nii.gz", b""), "empty"),
        (lambda d: _write_bytes(d / "corrupt.nii.gz", b"\x1f\x8b garbage" * 50), "not a readable .nii.gz image"),
        (lambda d: _write_bytes(d / "notes.txt", b"hello"), "not a DICOM, NIfTI"),
        (
            lambda d: _write_bytes(
                d / "truncated.nii.gz", shared("totalsegmentator/example_ct_sm.nii.gz").read_bytes()[:4000]
            ),
            "truncated or damaged",
        ),
        (lambda d: (d / "emptydir").mkdir() or d / "emptydir", "folder is empty"),
        (
            lambda d: _write_nifti(
                d / "display.nii.gz", np.full((4, 8, 8), 7, np.uint8) + np.arange(8, dtype=np.uint8)
            ),
            "8-bit image cannot hold Hounsfield",
        ),
        (
            lambda d: _write_nifti(d / "normalised.nii.gz", np.linspace(0, 1, 256, dtype=np.float32).reshape(4, 8, 8)),
            "normalised to \\[0, 1\\]",
        ),
        (
            lambda d: _write_nifti(
                d / "raw.nii.gz", np.concatenate([np.zeros((1, 8, 8)), np.full((3, 8, 8), 1040.0)]).astype(np.int16)
            ),
            "without the rescale intercept",
        ),
        (lambda d: _write_4d_nifti(d / "four_d.nii.gz"), "4-D image"),
        (lambda d: _write_nifti(d / "constant.nii.gz", np.full((3, 8, 8), -1000, np.int16)), "constant image"),
    ],
)
def test_bad_input_names_the_file_and_the_problem(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(CTInputError, match=problem) as info:
        load_ct(path)
    assert str(path) in str(info.value)


def _copy_series(source: Path, target: Path, count: int, edit=None) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for k, f in enumerate(sorted(source.glob("*.dcm"))[:count]):
        ds = pydicom.dcmread(f)
        if edit:
            edit(k, ds)
        ds.save_as(target / f.name)
        out.append(target / f.name)
    return out


def test_non_ct_modality_is_refused(tmp_path):
    _copy_series(shared("tcia_pancreatic_ct_cbct_seg"), tmp_path / "mr", 2, lambda k, ds: setattr(ds, "Modality", "MR"))
    with pytest.raises(CTInputError, match="modality is MR, not CT"):
        load_ct(tmp_path / "mr")


def test_folder_with_two_series_lists_them_and_series_uid_selects(tmp_path):
    source = shared("tcia_pancreatic_ct_cbct_seg")
    _copy_series(source, tmp_path / "study", 3)
    other_uid = "1.2.826.0.1.3680043.8.498.1"
    _copy_series(source, tmp_path / "study" / "second", 2, lambda k, ds: setattr(ds, "SeriesInstanceUID", other_uid))
    with pytest.raises(CTInputError, match="holds 2 series") as info:
        load_ct(tmp_path / "study")
    assert other_uid in str(info.value) and "3 files" in str(info.value)
    assert load_ct(tmp_path / "study", series_uid=other_uid).shape == (2, 512, 512)
    with pytest.raises(CTInputError, match="no series with SeriesInstanceUID 9.9"):
        load_ct(tmp_path / "study", series_uid="9.9")


def test_mixed_series_and_overlapping_slices_are_refused(tmp_path):
    source = shared("tcia_pancreatic_ct_cbct_seg")
    files = _copy_series(source, tmp_path / "mixed", 3)
    small = pydicom.dcmread(shared("pydicom/CT_small.dcm"))
    small.SeriesInstanceUID = pydicom.dcmread(files[0]).SeriesInstanceUID
    small.save_as(tmp_path / "mixed" / "odd.dcm")
    with pytest.raises(CTInputError, match="mixed series"):
        load_ct(tmp_path / "mixed")
    _copy_series(source, tmp_path / "twice", 2)
    _copy_series(
        source, tmp_path / "twice" / "again", 1, lambda k, ds: setattr(ds, "SOPInstanceUID", ds.SOPInstanceUID + ".9")
    )
    with pytest.raises(CTInputError, match="share the position"):
        load_ct(tmp_path / "twice")


def test_corrupt_pixel_data_names_the_slice(tmp_path):
    files = _copy_series(shared("tcia_pancreatic_ct_cbct_seg"), tmp_path / "broken", 3)
    data = bytearray(files[1].read_bytes())
    files[1].write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CTInputError) as info:
        load_ct(tmp_path / "broken")
    assert files[1].name in str(info.value)


def test_unwritable_output_and_no_half_written_files(tmp_path, sample_volume, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CTOutputError, match="cannot create the folder"):
        save_ct(sample_volume, blocker / "out.nii.gz")
    with pytest.raises(CTOutputError, match="cannot write .png"):
        save_ct(sample_volume, tmp_path / "out.png")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(CTOutputError, match="not an empty folder"):
        save_ct(sample_volume, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "user data"

    calls = {"n": 0}
    real_save = pydicom.dataset.Dataset.save_as

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", failing_save)
    with pytest.raises(CTOutputError, match="No space left"):
        save_ct(sample_volume, tmp_path / "series")
    monkeypatch.undo()

    def failing_write(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(CTOutputError, match="disk full"):
        save_ct(sample_volume, tmp_path / "vol.nii.gz")
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["a_file", "taken"], leftovers


def test_a_series_with_a_missing_slice_is_refused(tmp_path):
    """Slice 4 of 8 gone: a 6 mm gap in a 3 mm series, and instance numbers that skip one. Without instance
    numbers the gap alone, a whole multiple of the spacing, says the same."""
    source = shared("tcia_pancreatic_ct_cbct_seg")
    files = _copy_series(source, tmp_path / "gap", 8)
    files[3].unlink()
    with pytest.raises(
        CTInputError,
        match=r"1 slice\(s\) missing from the series: it steps 3.00 mm but has a gap "
        r"of 6.00 mm between .* instance numbers",
    ) as info:
        load_ct(tmp_path / "gap")
    assert str(tmp_path / "gap") in str(info.value)
    files = _copy_series(source, tmp_path / "unnumbered", 8, lambda k, ds: delattr(ds, "InstanceNumber"))
    files[2].unlink()
    files[3].unlink()
    with pytest.raises(CTInputError, match=r"2 slice\(s\) missing .* gap of 9.00 mm"):
        load_ct(tmp_path / "unnumbered")


def test_a_real_change_of_spacing_is_read_slice_by_slice_not_refused(tmp_path):
    """The same 6 mm step with consecutive instance numbers is how the scanner numbered it: spacing that
    really varies (as in the GE head series), kept slice by slice."""
    source = shared("tcia_pancreatic_ct_cbct_seg")
    numbers = {}

    def renumber(k, ds):
        numbers[k] = int(ds.InstanceNumber)

    files = _copy_series(source, tmp_path / "varying", 8, renumber)
    files[3].unlink()
    # consecutive numbers over the 6 mm step: 134, 133, 132, (131 gone) 130 -> 131, ...
    for k, f in enumerate(files):
        if k > 3:
            ds = pydicom.dcmread(f)
            ds.InstanceNumber = numbers[k] + (1 if numbers[1] < numbers[0] else -1)
            ds.save_as(f)
    volume = load_ct(tmp_path / "varying")
    assert volume.shape == (7, 512, 512) and not volume.is_regular_grid
    assert "slice spacing varies from 3.00 to 6.00 mm" in volume.metadata["irregular_reason"]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda ds: setattr(ds, "PixelSpacing", [0.7, 0.7]), "pixel spacing 0.7 x 0.7 mm but the series starts at"),
        (
            lambda ds: setattr(ds, "PixelRepresentation", 1),
            "pixels stored as 12 of 16 bits, signed but the series starts with 12 of 16 bits, unsigned",
        ),
        (
            lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]),
            "pixel data holds 262,144 bytes but 512 rows x 512 columns x 1 sample\\(s\\) x 2 bytes need 524,288",
        ),
    ],
)
def test_mismatched_or_short_slices_name_the_slice(tmp_path, edit, problem):
    files = _copy_series(
        shared("tcia_pancreatic_ct_cbct_seg"), tmp_path / "series", 4, lambda k, ds: edit(ds) if k == 2 else None
    )
    with pytest.raises(CTInputError, match=problem) as info:
        load_ct(tmp_path / "series")
    assert str(files[2]) in str(info.value)


def test_dicom_voxel_limit_is_checked_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    from lowdose.limits import InputLimits

    decoded = []
    real = pydicom.dataset.Dataset.pixel_array
    monkeypatch.setattr(
        pydicom.dataset.Dataset, "pixel_array", property(lambda ds: decoded.append(ds.filename) or real.fget(ds))
    )
    limits = InputLimits(max_voxels=20 * 512 * 512 - 1)
    with pytest.raises(CTInputError, match=r"20 slices of 512x512 = 5,242,880 voxels, more than the limit"):
        load_ct(SAMPLE_DICOM, limits=limits)
    assert decoded == []
    assert load_ct(SAMPLE_DICOM, limits=InputLimits(max_voxels=20 * 512 * 512)).shape == (20, 512, 512)
    assert len(decoded) == 20  # the spy sees decoding when it happens
