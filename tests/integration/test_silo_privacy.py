"""Plant a distinctive patient name and pixel pattern in a site's DICOM silo,
run a real round through the mutual-TLS deployment, then search every log
and every stored message payload for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedgan.demo import run_demo
from fedgan.silo.synth import synth_dicom
from tests.federations import small_federation

pytestmark = pytest.mark.integration

CANARY_NAME = "ZZCANARY^PLANTED^4F1B"
CANARY_PIXELS = np.array([1234, 3210, 1111, 2222, 3333, 4000, 123, 4095] * 2, dtype="<u2")


def _plant(silo: Path) -> None:
    for path in sorted(silo.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName = CANARY_NAME
        ds.PatientID = "ZZCANARYID77"
        pixels = ds.pixel_array.copy()
        pixels[3, : CANARY_PIXELS.size] = CANARY_PIXELS
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)


def _preprocessed_rows(silos: list[Path], image_size: int) -> list[bytes]:
    """Rows of the silos' images after the site's preprocessing, those with
    at least 6 distinct values (a flat background row proves nothing), as
    uint8 and as float32 bytes."""
    from fedgan.silo.loader import read_silo
    from fedgan.silo.options import SiloOptions

    out = []
    for silo in silos:
        data = read_silo(silo, SiloOptions(kind="dicom", image_size=image_size, channels=1))
        for image in np.asarray(data.images)[:, 0]:
            for row in image:
                if len(set(row.tolist())) >= 6:
                    out.append(row.astype(np.uint8).tobytes())
                    out.append((row.astype(np.float32) / 127.5 - 1.0).tobytes())
    return out


def test_no_patient_tag_or_pixel_leaves_the_site(tmp_path):
    silos = []
    for i in range(2):
        silo = synth_dicom(tmp_path / f"silo-{i}", 6, seed=i, size=32)
        _plant(silo)
        silos.append(silo)
    assert CANARY_PIXELS.tobytes() in next(silos[0].rglob("*.dcm")).read_bytes()
    run_dir = run_demo(
        small_federation(tmp_path / "runs", "canary", kind="dicom", data=silos, local_steps=2),
        say=lambda _line: None,
    )
    needles = [CANARY_NAME.encode(), b"ZZCANARY", CANARY_PIXELS.tobytes()]
    # The raw DICOM bytes cannot survive windowing and resizing: search for
    # the images as training sees them too (issue 33), each distinctive row
    # as uint8 (the site's cache) and as float32 in [-1, 1] (the trainer's).
    rows = _preprocessed_rows(silos, image_size=16)
    assert len(rows) >= 20
    needles += rows
    in_cache = 0
    searched = 0
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir).parts
        if not path.is_file():
            continue
        data = path.read_bytes()
        if len(rel) > 2 and rel[0] == "sites" and rel[2] == "cache":
            # The site's own preprocessing cache legitimately holds its
            # images: the positive control, the needles are findable.
            in_cache += sum(row in data for row in rows)
            continue
        searched += 1
        for needle in needles:
            assert needle not in data, f"{needle[:12]!r} found in {path}"
    assert searched > 20
    assert in_cache >= len(rows) // 2  # the uint8 half at least
    # ...and the float32 half finds the images as a trainer holds them.
    leak = tmp_path / "leak.npy"
    from fedgan.silo.loader import read_silo
    from fedgan.silo.options import SiloOptions

    np.save(
        leak, read_silo(silos[0], SiloOptions(kind="dicom", image_size=16, channels=1)).as_float()
    )
    assert sum(row in leak.read_bytes() for row in rows[1::2]) >= len(rows) // 4
    # What the aggregator wrote and the logs were among them; Flower's state
    # (every message's payload) stays in the SuperLink's memory, never on disk.
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert not [p for p in run_dir.rglob("*.db") if "sites" not in p.parts]
    assert (run_dir / "logs" / "supernode-site-1.log").stat().st_size > 0
