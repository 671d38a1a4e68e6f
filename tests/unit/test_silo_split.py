"""Splitting a public set into site silos: every item once, label and quantity skew, DICOM paths."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedgan.attributes import parse as parse_attributes
from fedgan.attributes import read_site_attributes
from fedgan.silo.labels import fundus_labels
from fedgan.silo.loader import read_silo
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.silo.partition import dirichlet_split, write_split
from fedgan.silo.synth import synth_silo

LABELS = [str(i % 5) for i in range(1000)]


def _mean_entropy(parts):
    total = 0.0
    for part in parts:
        counts = Counter(LABELS[i] for i in part)
        n = sum(counts.values())
        total += -sum(c / n * math.log(c / n) for c in counts.values())
    return total / len(parts)


def test_every_item_goes_to_exactly_one_site_reproducibly():
    parts = dirichlet_split(LABELS, 4, 0.5, seed=7)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(LABELS)))
    assert parts == dirichlet_split(LABELS, 4, 0.5, seed=7)
    assert parts != dirichlet_split(LABELS, 4, 0.5, seed=8)


def test_small_alpha_skews_labels_more_than_large_alpha():
    skewed = _mean_entropy(dirichlet_split(LABELS, 5, 0.1, seed=1))
    even = _mean_entropy(dirichlet_split(LABELS, 5, 100.0, seed=1))
    assert even > math.log(5) * 0.95 and skewed < even * 0.7


def test_quantity_skew_makes_site_sizes_unequal():
    sizes = [len(p) for p in dirichlet_split(LABELS, 5, 100.0, seed=3, quantity_alpha=0.5)]
    assert max(sizes) > 2 * min(sizes)


def test_bad_arguments():
    with pytest.raises(SiloError, match="cannot fill"):
        dirichlet_split(["a"], 2, 1.0)
    with pytest.raises(SiloError, match="alpha"):
        dirichlet_split(LABELS, 2, 0.0)


def test_write_split_makes_readable_site_silos(tmp_path):
    src = synth_silo(tmp_path / "src", "fundus", 40, seed=2, size=32)
    dirs = write_split(src, tmp_path / "out", "fundus", 3, 0.5, seed=4)
    assert [d.name for d in dirs] == ["site-1", "site-2", "site-3"]
    total = 0
    for d in dirs:
        data = read_silo(d, SiloOptions(kind="fundus", image_size=16, channels=3))
        assert data.report.images == len(fundus_labels(d).by_key) > 0
        assert None not in data.labels
        total += data.report.images
    assert total == 40
    with pytest.raises(SiloError, match="not empty"):
        write_split(src, tmp_path / "out", "fundus", 3, 0.5, seed=4)


def test_dicom_split_keeps_relative_paths(tmp_path):
    src = synth_silo(tmp_path / "src", "dicom", 12, seed=2, size=32)
    dirs = write_split(src, tmp_path / "out", "dicom", 2, 5.0, seed=1)
    opts = SiloOptions(kind="dicom", image_size=16, channels=1)
    assert sum(read_silo(d, opts).report.images for d in dirs) == 12
    assert all(list(d.rglob("series*/IMG*.dcm")) for d in dirs)


def test_split_gives_each_site_the_attribute_rows_of_its_images(tmp_path):
    src = synth_silo(tmp_path / "src", "fundus", 30, seed=5, size=32)
    source_rows = (src / "attributes.csv").read_text().splitlines()
    dirs = write_split(src, tmp_path / "out", "fundus", 3, 0.5, seed=2)
    declared = parse_attributes("age=0:100,sex=F|M")
    rows = []
    for d in dirs:
        lines = (d / "attributes.csv").read_text().splitlines()
        assert lines[0] == source_rows[0]
        rows += lines[1:]
        # Exactly the site's own images, and the site reads them as a run would.
        assert set(read_site_attributes(d, "fundus", declared)) == set(fundus_labels(d).by_key)
    assert sorted(rows) == sorted(source_rows[1:])


def test_dicom_split_keys_attributes_by_path_and_refuses_a_keyless_file(tmp_path):
    src = synth_silo(tmp_path / "src", "dicom", 8, seed=2, size=32)
    dirs = write_split(src, tmp_path / "out", "dicom", 2, 5.0, seed=1)
    declared = parse_attributes("age=0:100")
    for d in dirs:
        paths = {p.relative_to(d).as_posix() for p in d.rglob("*.dcm")}
        assert set(read_site_attributes(d, "dicom", declared)) == paths
    (src / "attributes.csv").unlink()
    dirs = write_split(src, tmp_path / "bare", "dicom", 2, 5.0, seed=1)
    assert not any((d / "attributes.csv").exists() for d in dirs)
    (src / "attributes.csv").write_text("file,age\nx.dcm,40\n")
    with pytest.raises(SiloError, match=r"attributes\.csv: header needs a key column \(path\)"):
        write_split(src, tmp_path / "out2", "dicom", 2, 5.0, seed=1)
    assert not (tmp_path / "out2").exists()
