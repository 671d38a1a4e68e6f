"""`fedgan report`: one self-contained page from what a run folder holds."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from fedgan.audit_log import AuditLog
from fedgan.report import ReportError, build, reading, write


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def _run(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    records = [
        {
            "round": 1,
            "seconds": 12.0,
            "sites": ["site-1", "site-2"],
            "sites_sampled": 2,
            "g_loss": 1.5,
            "d_loss": 1.2,
            "epsilon": {"site-1": 2.0, "site-2": 2.5},
            "epsilon_budget": {"site-1": 10.0, "site-2": 8.0},
            "noise_figure": {"site-1": 6.2, "site-2": 23.6},
            "update_bytes": {"site-1": 100, "site-2": 100},
            "secagg": {
                "threshold": 2,
                "bits": 12,
                "modulus_bits": 13,
                "value_range": 0.04,
                "survivors": ["site-1", "site-2"],
                "dropped": [],
            },
        },
        {
            "round": 2,
            "seconds": 3.0,
            "sites": [],
            "sites_sampled": 2,
            "skipped": "round 2 abandoned <at masked input>",
            "secagg": {
                "threshold": 2,
                "bits": 12,
                "modulus_bits": 13,
                "value_range": 0.04,
                "survivors": [],
                "dropped": ["site-2"],
            },
        },
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "status.json").write_text(json.dumps({"status": "completed", "flower_run_id": 7}))
    (run / "samples_round_001.png").write_bytes(_png())
    log = AuditLog(tmp_path / "runs" / "audit.jsonl")
    log.append("run_started", run="r1")
    log.append("run_started", run="other-run")
    log.append("site_dropped", run="r1", round=2, site="site-2", reason="secagg_mask: timeout")
    return run


def test_report_is_self_contained_and_complete(tmp_path):
    run = _run(tmp_path)
    page = build(run)
    assert page.count("data:image/png;base64,") == 2  # the last grid, then every round's
    assert not re.search(r'(src|href)="https?:', page)  # nothing fetched
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        ET.fromstring(svg)  # well-formed
    assert "&lt;at masked input&gt;" in page and "<at masked input>" not in page
    assert "dropped: site-2" in page and "largest privacy loss spent is ε = 2.50" in page
    assert "Secure aggregation was on" in page and "threshold 2, 12-bit" in page
    assert "site_dropped" in page and "other-run" not in page
    assert "Not evaluated yet" in page
    path = write(run)
    assert path == run / "report.html" and path.read_text() == page


def test_the_reading_names_the_noisiest_site_and_warns_only_above_ten():
    from fedgan.report import reading

    def records(figures):
        return [
            {
                "round": 1,
                "sites": list(figures),
                "epsilon": dict.fromkeys(figures, 5.0),
                "noise_figure": figures,
            }
        ]

    loud = " ".join(reading(records({"site-1": 6.2, "site-2": 23.6}), {"status": "completed"}))
    assert "noisiest training (site-2)" in loud and "was 24 times" in loud
    assert "shape the generator only weakly" in loud
    quiet = " ".join(reading(records({"site-1": 6.2, "site-2": 4.0}), {"status": "completed"}))
    assert "noisiest training (site-1)" in quiet and "weakly" not in quiet
    assert "noise" not in " ".join(reading([{"round": 1, "sites": ["a"]}], {}))
    # A secure round knows only the sites' mean: no site is named.
    secure = [{"round": 1, "sites": ["a", "b"], "epsilon": {"a": 5.0, "b": 5.0}}]
    secure[0]["noise_figure_mean"] = 31.0
    mean = " ".join(reading(secure, {"status": "completed"}))
    assert "Across the hospitals" in mean and "was 31 times" in mean and "weakly" in mean


def test_the_reading_says_when_a_release_sum_was_fitted_after_a_resume():
    from fedgan.report import reading

    record = {"round": 1, "sites": ["site-1", "site-2"], "mechanism": "mean-embedding"}
    once = " ".join(reading([record], {"status": "completed"}))
    assert "released once a noisy summary" in once and "no hospital released twice" not in once
    resumed = " ".join(reading([record | {"release_kept": True}], {"status": "completed"}))
    assert "resumed from the sum it had kept, so no hospital released twice" in resumed


def test_an_empty_run_folder_is_refused(tmp_path):
    with pytest.raises(ReportError, match=r"no metrics\.jsonl"):
        build(tmp_path)


def test_a_conditional_runs_grid_names_the_class_of_each_row(tmp_path):
    run = _run(tmp_path)
    assert "one class per row" not in build(run)
    (run / "run-config.json").write_text(json.dumps({"classes": "normal,pneumonia,<b>"}))
    page = build(run)
    assert "one class per row (1: normal, 2: pneumonia, 3: &lt;b&gt;, 4: normal," in page
    (run / "run-config.json").write_text(json.dumps({"classes": "a,a"}))  # broken: no caption
    assert "one class per row" not in build(run)


def test_the_reading_leads_with_a_collapsed_discriminator():
    """The demo's DP defaults: G's loss falls to 0.002 while D's climbs."""
    collapsed = [
        {"round": r, "sites": ["a"], "g_loss": g, "d_loss": d}
        for r, (g, d) in enumerate([(0.056, 3.41), (0.010, 4.79), (0.002, 6.30)], 1)
    ]
    first = reading(collapsed, {"status": "completed"})[0]
    assert first.startswith("The discriminator collapsed") and "0.002" in first
    healthy = [dict(r, g_loss=r["g_loss"] + 1.5) for r in collapsed]
    assert not any("collapsed" in x for x in reading(healthy, {"status": "completed"}))


def test_the_reading_leads_with_no_model_when_every_round_was_abandoned():
    records = [{"round": r, "sites": [], "skipped": "fewer than 2 sites"} for r in (1, 2)]
    lines = reading(records, {"status": "failed"})
    assert lines[0].startswith("No round produced a model") and "fewer than 2" in lines[0]


def test_a_sites_evaluation_reading_leads_with_its_worst_finding():
    from fedgan.evaluate.results import reading as site_reading

    ev = {
        "site": "site-1",
        "quality": {"precision": 0.9, "recall": 0.8},
        "privacy": {"mia_discriminator_auc": 0.71, "memorized_fraction": 0.0},
    }
    lines = site_reading(ev)
    assert lines[0].startswith("An attacker") and lines[0].endswith(": review.")
    assert lines[1].startswith("At site-1, 90% of synthetic images")
    calm = site_reading(ev | {"privacy": {"mia_discriminator_auc": 0.52}})
    assert calm[0].startswith("At site-1")
