"""`fedgan evaluate` and `fedgan sample` on the generator of a real federated
run (the session's finished 2-site run), as a site runs them: its own silo as
members, images it held out as non-members; then the report carries the
site's numbers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from fedgan.silo.synth import synth_silo
from tests.runs import FEDGAN, evaluate_as_site_1

pytestmark = pytest.mark.integration


def test_a_site_evaluates_the_run_and_the_report_shows_it(finished_run, tmp_path):
    run_dir, _ = finished_run
    held = synth_silo(tmp_path / "held", "fundus", 24, seed=77, size=16)
    done = evaluate_as_site_1(run_dir, held, 128)
    assert done.returncode == 0, done.stderr
    assert "privacy       memorized" in done.stdout
    result = json.loads((run_dir / "evaluation" / "site-1.json").read_text())
    assert result["images"]["members"] == 24 and result["images"]["held_out"] == 24
    assert 0 <= result["privacy"]["mia_discriminator_auc"] <= 1
    report = subprocess.run(
        [FEDGAN, "report", str(run_dir)], capture_output=True, text=True, check=True, timeout=120
    )
    html = Path(report.stdout.split()[-1]).read_text()
    assert "site-1" in html and "MIA AUC (G, nearest)" in html

    out = tmp_path / "dicom"
    subprocess.run(
        [
            FEDGAN,
            "sample",
            "--generator",
            str(run_dir / "generator.pt"),
            "--n",
            "4",
            "--out",
            str(out),
            "--format",
            "dicom",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 4
    ds = pydicom.dcmread(files[0])
    assert ds.ConversionType == "SYN" and ds.pixel_array.shape == (16, 16, 3)
