"""The DICOM loader against pydicom's own real test files and against
synthetic files built to exercise one rule each."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fedgan.silo import SiloError, load_images
from fedgan.silo.dicom import decode_dicom_file
from fedgan.silo.loader import read_silo
from fedgan.silo.options import SiloOptions
from fedgan.silo.report import SkipFile
from fedgan.silo.synth import synth_dicom

OPTS = SiloOptions(kind="dicom", image_size=32, channels=1)
BUNDLED = [Path(f) for f in get_testdata_files() if Path(f).is_file()]


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def test_every_bundled_file_decodes_or_gives_a_named_reason():
    decoded = skipped = 0
    for path in BUNDLED:
        try:
            result = decode_dicom_file(path, OPTS)
        except SkipFile as skip:
            assert str(skip), path
            skipped += 1
            continue
        decoded += 1
        assert result.frames, path
        for frame in result.frames:
            assert frame.shape == (result.rows, result.columns) and frame.dtype == np.uint8
    assert decoded >= 80 and skipped >= 50  # pydicom 3.0.2 ships 89 decodable files


def test_bundled_silo_loads_as_training_tensor(tmp_path):
    for path in BUNDLED:
        shutil.copy(path, tmp_path / path.name)
    data = read_silo(tmp_path, OPTS)
    assert data.images.shape[1:] == (1, 32, 32) and data.images.dtype == np.uint8
    assert data.report.images == data.images.shape[0] >= 89
    reasons = dict(data.report.skipped)
    assert reasons["DICOMDIR"] == "DICOMDIR (a directory index, not an image)"
    assert reasons["rtplan.dcm"] == "no pixel data (RT Plan Storage)"
    assert reasons["README.txt"] == "not a DICOM file"
    assert reasons["MR_truncated.dcm"].startswith("unreadable DICOM")
    floats = load_images(tmp_path, "dicom", 32, 1)
    assert floats.min() >= -1 and floats.max() <= 1


def _pydicom_reference(ds, frame):
    """Display values in [0, 1] computed with pydicom's own LUT functions."""
    modality = apply_modality_lut(frame, ds).astype(np.float64)
    if "WindowCenter" not in ds:
        low, high = modality.min(), modality.max()
        out = (modality - low) / (high - low) if high > low else np.zeros_like(modality)
    else:
        bits = int(ds.BitsStored)
        y_min, y_max = (
            (0, 2**bits - 1)
            if ds.PixelRepresentation == 0
            else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        )
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out = (apply_voi_lut(modality, ds) - y_min) / (y_max - y_min)
    return 1 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


def test_values_match_pydicoms_modality_and_voi_lut():
    compared = 0
    for path in BUNDLED:
        try:
            result = decode_dicom_file(path, OPTS)
        except SkipFile:
            continue
        ds = _read(path)
        if ds.PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2"):
            continue
        if "VOILUTSequence" in ds or "ModalityLUTSequence" in ds:
            continue
        frames = ds.pixel_array
        frames = frames[None] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else frames
        for ours, frame in zip(result.frames, frames, strict=True):
            expected = np.rint(_pydicom_reference(ds, frame) * 255)
            # Equal display levels, give or take a rounding tie.
            np.testing.assert_allclose(ours, expected, atol=1, err_msg=str(path))
        compared += 1
    assert compared >= 50


def _write(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def one(tmp_path):
    synth_dicom(tmp_path / "src", 1, seed=2, size=32)
    path = next((tmp_path / "src").rglob("*.dcm"))
    return pydicom.dcmread(path), tmp_path


def test_monochrome1_is_inverted(one):
    ds, tmp = one
    mono2 = decode_dicom_file(_write(ds, tmp / "m2.dcm"), OPTS).frames[0]
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = decode_dicom_file(_write(ds, tmp / "m1.dcm"), OPTS).frames[0]
    np.testing.assert_allclose(mono1.astype(int), 255 - mono2.astype(int), atol=1)


def test_rescale_then_window(one):
    ds, tmp = one
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -2000.0
    ds.WindowCenter, ds.WindowWidth = 0.0, 1001.0
    frame = decode_dicom_file(_write(ds, tmp / "r.dcm"), OPTS).frames[0]
    values = ds.pixel_array * 2.0 - 2000.0
    expected = np.clip((values - (0.0 - 0.5)) / 1000.0 + 0.5, 0, 1)
    np.testing.assert_allclose(frame, np.rint(expected * 255), atol=1)


def test_site_window_overrides_the_files(one):
    ds, tmp = one
    path = _write(ds, tmp / "w.dcm")
    own = decode_dicom_file(path, OPTS).frames[0]
    bone = SiloOptions(kind="dicom", image_size=32, channels=1, window=(400.0, 1800.0))
    overridden = decode_dicom_file(path, bone).frames[0]
    assert not np.allclose(own, overridden)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu - 399.5) / 1799.0 + 0.5, 0, 1)
    np.testing.assert_allclose(overridden, np.rint(expected * 255), atol=1)


def test_multiframe_is_split_into_frames(tmp_path):
    path = Path(get_testdata_file("rtdose.dcm"))
    shutil.copy(path, tmp_path / "dose.dcm")
    data = read_silo(tmp_path, OPTS)
    assert data.report.images == 15 and data.images.shape == (15, 1, 32, 32)


def test_color_is_converted_or_refused(tmp_path):
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), tmp_path / "rgb.dcm")
    assert read_silo(tmp_path, OPTS).report.images == 2
    refuse = SiloOptions(kind="dicom", image_size=32, channels=1, color="refuse")
    report = read_silo(tmp_path, refuse).report
    assert report.images == 0 and report.skipped[0][1].startswith("colour image (RGB)")


def test_truncated_and_non_image_files_are_skipped_with_reasons(one):
    ds, tmp = one
    silo = tmp / "silo"
    silo.mkdir()
    good = _write(ds, silo / "good.dcm")
    (silo / "cut.dcm").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    shutil.copy(get_testdata_file("rtstruct.dcm"), silo / "struct")
    shutil.copy(get_testdata_file("test-SR.dcm"), silo / "sr.dcm")
    (silo / "DICOMDIR").write_bytes(Path(get_testdata_file("DICOMDIR")).read_bytes())
    report = read_silo(silo, OPTS).report
    reasons = dict(report.skipped)
    assert report.images == 1
    assert reasons["struct"] == "no pixel data (RT Structure Set Storage)"
    assert reasons["sr.dcm"] == "no pixel data (Comprehensive SR Storage)"
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert "cut.dcm" in reasons


def test_filters_keep_comparable_images(one):
    ds, tmp = one
    silo = tmp / "silo"
    silo.mkdir()
    for name, modality, view in (
        ("pa.dcm", "DX", "PA"),
        ("ap.dcm", "DX", "AP"),
        ("ct.dcm", "CT", ""),
    ):
        ds.Modality, ds.ViewPosition = modality, view
        _write(ds, silo / name)
    pa_only = SiloOptions(
        kind="dicom", image_size=32, channels=1, modality=("DX",), view_position=("PA",)
    )
    report = read_silo(silo, pa_only).report
    assert report.images == 1
    reasons = dict(report.skipped)
    assert reasons["ap.dcm"] == "filtered out: ViewPosition AP not in PA"
    assert reasons["ct.dcm"] == "filtered out: Modality CT not in DX"
    chest = SiloOptions(kind="dicom", image_size=32, channels=1, body_part=("HEAD",))
    assert read_silo(silo, chest).report.images == 0


def test_labels_from_csv_uid_or_tag_and_unknown_rows_warned(one):
    ds, tmp = one
    silo = tmp / "silo"
    silo.mkdir()
    _write(ds, silo / "a.dcm")
    (silo / "labels.csv").write_text(
        f"sop_instance_uid,label\n{ds.SOPInstanceUID},effusion\n9.9.9,x\n"
    )
    data = read_silo(silo, OPTS)
    assert data.labels == ["effusion"]
    assert any("names 1 files not in the silo" in w for w in data.report.warnings)
    (silo / "labels.csv").unlink()
    by_tag = SiloOptions(kind="dicom", image_size=32, channels=1, label_tag="BodyPartExamined")
    assert read_silo(silo, by_tag).labels == ["CHEST"]
    (silo / "labels.csv").write_text("file,label\na.dcm,x\n")
    with pytest.raises(SiloError, match="path,label"):
        read_silo(silo, OPTS)
    # A CSV without its header: its first row is a patient's, and the error
    # (which reaches the aggregator) must not repeat it (issue 33).
    (silo / "labels.csv").write_text("PAT-0042,Nordmann^Kari,effusion\n")
    with pytest.raises(SiloError) as refused:
        read_silo(silo, OPTS)
    assert "3 columns" in str(refused.value)
    assert "PAT-0042" not in str(refused.value) and "Nordmann" not in str(refused.value)


def test_empty_directory_is_an_error_naming_it(tmp_path):
    assert read_silo(tmp_path, OPTS).report.images == 0
    with pytest.raises(SiloError, match="fedgan silo check"):
        load_images(tmp_path, "dicom", 32, 1)


def _enhanced(ds, per_frame_window=None):
    """``ds`` rewritten as an Enhanced CT object keeps its rescale and window
    (intercept −1024, window 40/80 shared by all frames; optionally another
    window in the frame's own group) in functional groups, none at the top."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter"):
        if keyword in ds:
            delattr(ds, keyword)
    if "WindowWidth" in ds:
        del ds.WindowWidth
    transform, voi = Dataset(), Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
    voi.WindowCenter, voi.WindowWidth = 40, 80
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    shared.FrameVOILUTSequence = Sequence([voi])
    frame = Dataset()
    if per_frame_window:
        own = Dataset()
        own.WindowCenter, own.WindowWidth = per_frame_window
        frame.FrameVOILUTSequence = Sequence([own])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    ds.NumberOfFrames = 1
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    return ds


def test_an_enhanced_ct_frame_is_windowed_from_its_functional_groups(one):
    ds, tmp = one
    stored = ds.pixel_array.astype(np.float64)
    frame = decode_dicom_file(_write(_enhanced(ds), tmp / "e.dcm"), OPTS).frames[0]
    # By hand, one pixel: HU = stored − 1024; linear window 40/80 (PS3.3
    # C.11.2.1.2.1): (HU − 39.5) / 79 + 0.5, clipped, times 255.
    y, x = np.unravel_index(np.argmin(np.abs(stored - 1024 - 50)), stored.shape)
    hu = stored[y, x] - 1024
    assert frame[y, x] == round(min(max((hu - 39.5) / 79 + 0.5, 0.0), 1.0) * 255)
    expected = np.rint(np.clip((stored - 1024 - 39.5) / 79 + 0.5, 0, 1) * 255)
    np.testing.assert_array_equal(frame, expected)
    # A frame's own group overrides the shared one.
    ds2 = _enhanced(pydicom.dcmread(tmp / "e.dcm"), per_frame_window=(0, 400))
    own = decode_dicom_file(_write(ds2, tmp / "e2.dcm"), OPTS).frames[0]
    np.testing.assert_array_equal(
        own, np.rint(np.clip((stored - 1024 + 0.5) / 399 + 0.5, 0, 1) * 255)
    )


def test_missing_layout_is_named_not_a_python_error(one):
    ds, tmp = one
    del ds.Rows
    reason = _skip_reason(_write(ds, tmp / "norows.dcm"))
    assert reason == "missing Rows: the pixel data cannot be laid out"
    ds, tmp = one
    ds = pydicom.dcmread(next((tmp / "src").rglob("*.dcm")))
    del ds.PhotometricInterpretation
    assert "missing PhotometricInterpretation" in _skip_reason(_write(ds, tmp / "nophoto.dcm"))
    ds = pydicom.dcmread(next((tmp / "src").rglob("*.dcm")))
    del ds.file_meta.TransferSyntaxUID
    path = tmp / "nots.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    assert _skip_reason(path).startswith("no Transfer Syntax UID")


def _skip_reason(path):
    with pytest.raises(SkipFile) as skipped:
        decode_dicom_file(path, OPTS)
    return str(skipped.value)


def test_silo_check_warns_about_what_makes_a_poor_training_set(tmp_path):
    """Every file decodes, yet: CT beside MR, images below the run's size,
    and an RT Dose grid (15 frames of dose, not anatomy)."""
    from fedgan.silo.loader import load_silo

    for name in ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    opts = SiloOptions(kind="dicom", image_size=128, channels=1)
    warnings_ = load_silo(tmp_path, opts, workers=1).report.warnings
    assert any(w.startswith("mixed modalities (RTDOSE: 15, CT: 1, MR: 1)") for w in warnings_)
    assert "16 of 17 images are smaller than the run's 128 px" in " ".join(warnings_)
    assert any("15 images are dose grids (RT Dose Storage)" in w for w in warnings_)
    assert not any("no label" in w for w in warnings_)


def test_labels_missing_for_most_images_are_warned():
    from collections import Counter

    from fedgan.silo.report import SiloReport, content_warnings

    report = SiloReport("silo", "fundus", images=10, labels=Counter({"(none)": 7, "2": 3}))
    assert content_warnings(report, 32) == [
        "7 of 10 images have no label: a class-conditional run leaves them out"
    ]
    report.labels = Counter({"(none)": 10})  # an unlabelled silo: nothing to warn about
    assert content_warnings(report, 32) == []


def test_a_tag_value_pydicom_complains_about_reaches_no_log_or_warning(
    one, tmp_path, caplog, capfd, recwarn
):
    """pydicom reports an invalid element value by quoting it, through its
    logger as well as `warnings`: the site's log printed a real file's
    SOPInstanceUID that way. Reading a silo with such files shows neither."""
    import logging

    from pydicom.dataelem import DataElement

    canary = "1.2.CANARY-UID_x"
    ds = one[0].copy()
    ds.add(DataElement(0x00080018, "UI", canary))  # SOPInstanceUID, invalid characters
    ds.add(DataElement(0x00100010, "PN", "CANARY^" + "X" * 70))  # PatientName, too long
    silo = tmp_path / "silo"
    silo.mkdir()
    _write(ds, silo / "bad.dcm")
    caplog.clear()  # what writing the file said is the test's, not the site's
    capfd.readouterr()
    recwarn.clear()
    with caplog.at_level(logging.DEBUG):
        data = read_silo(
            silo, SiloOptions.from_mapping("dicom", 32, 1, {}), [silo / "bad.dcm"], None, 1
        )
    assert data.report.images == 1  # read, and quiet about it
    out, err = capfd.readouterr()
    said = caplog.text + out + err + "".join(str(w.message) for w in recwarn)
    assert "CANARY" not in said, said
