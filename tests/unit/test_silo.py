"""Synthetic silos (`fedgan silo synth`): fundus JPEGs with labels, valid DICOM, reproducible
seeds."""

import csv

import numpy as np
import pydicom
import pytest

from fedgan.silo import SiloError, load_images
from fedgan.silo.synth import synth_silo


def test_fundus_silo_has_jpegs_and_aptos_labels(tmp_path):
    synth_silo(tmp_path, "fundus", 12, seed=3, size=64)
    with open(tmp_path / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert all((tmp_path / f"{r['id_code']}.jpg").exists() for r in rows)
    assert {int(r["diagnosis"]) for r in rows} <= {0, 1, 2, 3, 4}
    images = load_images(tmp_path, "fundus", 32, 3)
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1


def test_same_seed_same_silo(tmp_path):
    synth_silo(tmp_path / "a", "fundus", 3, seed=5, size=32)
    synth_silo(tmp_path / "b", "fundus", 3, seed=5, size=32)
    synth_silo(tmp_path / "c", "fundus", 3, seed=6, size=32)
    a = load_images(tmp_path / "a", "fundus", 32, 3)
    assert np.array_equal(a, load_images(tmp_path / "b", "fundus", 32, 3))
    assert not np.array_equal(a, load_images(tmp_path / "c", "fundus", 32, 3))


def test_dicom_silo_is_valid_dicom_with_rescale_window_spacing(tmp_path):
    synth_silo(tmp_path, "dicom", 4, seed=1, size=64)
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 4 and len({f.parent for f in files}) > 1
    ds = pydicom.dcmread(files[0])
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.BitsAllocated == 16 and ds.BitsStored == 12
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    assert "WindowCenter" in ds and "WindowWidth" in ds and len(ds.PixelSpacing) == 2
    assert ds.pixel_array.shape == (64, 64) and ds.pixel_array.dtype == np.uint16
    images = load_images(tmp_path, "dicom", 32, 1)
    assert images.shape == (4, 1, 32, 32)
    assert load_images(tmp_path, "dicom", 32, 3).shape == (4, 3, 32, 32)


def test_empty_or_missing_silo_names_the_directory(tmp_path):
    with pytest.raises(SiloError, match=str(tmp_path)):
        load_images(tmp_path, "fundus", 32, 3)
    with pytest.raises(SiloError, match="not a directory"):
        load_images(tmp_path / "nope", "dicom", 32, 1)
    with pytest.raises(SiloError, match="unknown silo kind"):
        load_images(tmp_path, "xray", 32, 1)
