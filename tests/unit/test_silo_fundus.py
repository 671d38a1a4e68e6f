"""Fundus preprocessing: field of view, crop, local contrast, skipped files, public label
layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedgan.silo.fundus import decode_fundus_file, field_of_view
from fedgan.silo.loader import read_silo
from fedgan.silo.options import SiloOptions
from fedgan.silo.report import SkipFile

OPTS = SiloOptions(kind="fundus", image_size=32, channels=3)


def _retina(path, size=(400, 300), center=(120, 150), radius=80):
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    cx, cy = center
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(190, 80, 30))
    draw.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], fill=(250, 220, 140))
    img.save(path)
    return path


def test_field_of_view_is_the_bright_disc(tmp_path):
    rgb = np.asarray(Image.open(_retina(tmp_path / "a.png")))
    top, bottom, left, right = field_of_view(rgb)
    assert abs(top - 70) <= 2 and abs(bottom - 231) <= 2
    assert abs(left - 40) <= 2 and abs(right - 201) <= 2


def test_crop_makes_the_retina_fill_the_image(tmp_path):
    out = decode_fundus_file(_retina(tmp_path / "a.png"), 32, contrast=False)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    lit = (out.mean(axis=2) > 20).mean()
    assert lit > 0.7  # a disc inscribed in the square: π/4 ≈ 0.785


def test_local_contrast_changes_texture_and_keeps_border_black(tmp_path):
    path = _retina(tmp_path / "a.png")
    plain = decode_fundus_file(path, 32, contrast=False)
    norm = decode_fundus_file(path, 32, contrast=True)
    assert not np.array_equal(plain, norm)
    assert (norm[0, 0] == 0).all() and (norm[-1, -1] == 0).all()


def test_black_or_broken_images_are_skipped(tmp_path):
    Image.new("RGB", (50, 50)).save(tmp_path / "black.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(SkipFile, match="no field of view"):
        decode_fundus_file(tmp_path / "black.png", 32, False)
    with pytest.raises(SkipFile, match="unreadable image"):
        decode_fundus_file(tmp_path / "broken.jpg", 32, False)


@pytest.mark.parametrize(("header", "ext"), [("id_code,diagnosis", "png"), ("image,level", "jpeg")])
def test_public_label_layouts(tmp_path, header, ext):
    for name in ("a", "b", "c"):
        _retina(tmp_path / f"{name}.{ext}")
    key = "b" if header.startswith("id_code") else "b.jpeg"
    (tmp_path / "trainLabels.csv").write_text(f"{header}\na,0\n{key},3\nc,7\nghost,1\n")
    data = read_silo(tmp_path, OPTS)
    assert data.labels == ["0", "3"]
    assert (
        dict(data.report.skipped)[f"c.{ext}"]
        == "label '7' in trainLabels.csv is not a DR grade 0-4"
    )
    assert any("names 1 files not in the silo: ghost" in w for w in data.report.warnings)
    assert data.images.shape == (2, 3, 32, 32)
    gray = read_silo(tmp_path, SiloOptions(kind="fundus", image_size=16, channels=1))
    assert gray.images.shape == (2, 1, 16, 16)


def test_non_image_files_are_listed(tmp_path):
    _retina(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    report = read_silo(tmp_path, OPTS).report
    assert report.images == 1
    assert report.skipped == [("notes.txt", "not a JPEG/PNG/TIFF image (.txt)")]
    assert report.sizes == {"400x300": 1}
