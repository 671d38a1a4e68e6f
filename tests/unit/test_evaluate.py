"""Evaluation: the metrics' known answers, the synthetic DICOM export, a
whole `fedgan evaluate` on a small run, and its place in the report and the
exporter."""

from __future__ import annotations

import json
import re

import pydicom
import pytest
import torch
from typer.testing import CliRunner

from fedgan.aggregator.exporter import RunsCollector
from fedgan.aggregator.run_store import RunOutputs
from fedgan.cli import app
from fedgan.evaluate import encoder as domain
from fedgan.evaluate import metrics
from fedgan.evaluate.results import load_all, reading
from fedgan.evaluate.site import EvaluationError, evaluate
from fedgan.evaluate.utility import accuracy, anomaly_auc, train_classifier, tstr
from fedgan.gan.models import GanSpec, build
from fedgan.report import write as write_report
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloOptions
from fedgan.silo.synth import synth_silo
from fedgan.synthetic import SERIES_DESCRIPTION, SampleError, export, generate, load_generator
from fedgan.train import TrainConfig, train_local
from tests import inception_weights as stand_in
from tests.images import blobs as _blobs


@pytest.fixture(scope="module")
def enc():
    return domain.train_encoder(_blobs(128, 0), steps=60)


def test_identical_sets_have_zero_fid_and_full_precision_recall(enc):
    x = _blobs(96, 1)
    fid, kid = metrics.fid_kid(x, x.clone(), enc)
    _, kid_far = metrics.fid_kid(x, _blobs(96, 2, shift=1.5), enc)
    # KID is an unbiased estimate over random subsets: near 0, either sign.
    assert abs(fid) < 1e-2 and abs(kid) < 0.05 * kid_far
    with torch.no_grad():
        assert metrics.precision_recall(enc(x), enc(x)) == (1.0, 1.0)


def test_a_shifted_set_is_far_and_outside_the_real_manifold(enc):
    real, fake = _blobs(96, 1), _blobs(96, 2, shift=1.5)
    fid, kid = metrics.fid_kid(real, fake, enc)
    same, _ = metrics.fid_kid(real, _blobs(96, 3), enc)
    assert fid > 10 * max(same, 0.1) and kid > 0
    with torch.no_grad():
        precision, recall = metrics.precision_recall(enc(real), enc(fake))
    assert precision < 0.2 and recall < 0.2


def test_a_generator_that_returns_training_images_is_caught():
    members, non_members = _blobs(80, 4), _blobs(80, 5)
    copies = members[torch.randperm(80)[:64]]
    memorized, threshold, _ = metrics.memorization(copies, members, non_members)
    assert memorized == 1.0 and threshold > 0
    assert metrics.mia_generator_auc(copies, members, non_members) > 0.85
    ssim, psnr = metrics.ssim_psnr_to_nearest(copies, members)
    assert ssim > 0.999 and psnr > 60


def test_a_model_that_never_saw_the_members_gives_attacks_nothing(tmp_path):
    """Members and non-members from the same distribution; the GAN trained on
    a third, disjoint set: both attacks are near a coin flip."""
    opts = SiloOptions.from_mapping("fundus", 16, 3, {})

    def images(seed: int, n: int) -> torch.Tensor:
        silo = synth_silo(tmp_path / f"s{seed}", "fundus", n, seed=seed, size=16)
        return torch.from_numpy(load_silo(silo, opts).as_float())

    others, members, non_members = images(1, 64), images(2, 96), images(3, 96)
    spec = GanSpec(image_size=16, channels=3, latent_dim=16, width=8)
    gen, disc = build(spec, seed=0)
    train_local(gen, disc, others, TrainConfig(local_steps=30, batch_size=16))
    gen.eval()
    disc.eval()
    with torch.no_grad():
        fake = gen(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)))
        auc_d = metrics.auc(disc(members), disc(non_members))
    auc_g = metrics.mia_generator_auc(fake, members, non_members)
    assert abs(auc_d - 0.5) < 0.15 and abs(auc_g - 0.5) < 0.15
    memorized, _, _ = metrics.memorization(fake, members, non_members)
    assert memorized < 0.1


def test_anomaly_detector_trained_on_normals_separates_abnormal_images():
    normal = _blobs(200, 6)
    test = torch.cat([_blobs(60, 7), _blobs(60, 8, shift=1.2)])
    abnormal = torch.cat([torch.zeros(60), torch.ones(60)])
    result = anomaly_auc(normal, test, abnormal, steps=150)
    assert result["anomaly_auc"] > 0.9 and result["anomaly_detected"] > 0.5
    assert result["anomaly_false_alarms"] < 0.3


def test_tstr_is_the_mean_of_several_classifiers_with_their_spread():
    # Two overlapping classes; the figures are checked against three
    # single-seed classifiers, whatever their spread.
    def two_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        return torch.cat([_blobs(n // 2, seed), _blobs(n // 2, seed + 1, shift=0.3)]), y.sort()[0]

    fake, fake_y = two_classes(64, 20)
    real, real_y = two_classes(64, 30)
    test, test_y = two_classes(64, 40)
    one = [
        accuracy(train_classifier(fake, fake_y, 2, steps=40, seed=s), test, test_y)
        for s in (5, 6, 7)
    ]
    mean = sum(one) / 3
    u = tstr(fake, fake_y, real, real_y, test, test_y, 2, seed=5, seeds=3, steps=40)
    assert u["classifier_seeds"] == 3
    assert u["tstr_accuracy"] == pytest.approx(mean)
    assert u["tstr_accuracy_sd"] == pytest.approx((sum((a - mean) ** 2 for a in one) / 2) ** 0.5)
    assert u["tstr_ratio"] == pytest.approx(u["tstr_accuracy"] / u["trtr_accuracy"])
    single = tstr(fake, fake_y, real, real_y, test, test_y, 2, seed=5, seeds=1, steps=40)
    assert single["tstr_accuracy"] == pytest.approx(one[0]) and single["tstr_accuracy_sd"] == 0
    with pytest.raises(ValueError, match="seeds"):
        tstr(fake, fake_y, real, real_y, test, test_y, 2, seeds=0)


def test_auc_orders_scores():
    assert metrics.auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert metrics.auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0


# -- synthetic export --------------------------------------------------------------


@pytest.fixture()
def generator_file(tmp_path):
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8, num_classes=2)
    gen, _ = build(spec, seed=0)
    out = RunOutputs(tmp_path / "run")
    out.save_generator(gen, 1)
    return out.generator_path


def test_dicom_export_rereads_and_is_marked_synthetic(generator_file, tmp_path):
    paths = export(generator_file, 515, tmp_path / "dcm", "dicom", seed=3, class_index=1)
    assert len(paths) == 515 and len(set(paths)) == 515  # two chunks, no name reused
    first, last = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
    for ds in (first, last):
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "SYN" and "SYNTHETIC" in ds.SeriesDescription
        assert ds.SeriesDescription == SERIES_DESCRIPTION
        assert str(ds.PatientName) == "" and ds.PatientID == "" and ds.PatientBirthDate == ""
        assert ds.pixel_array.shape == (16, 16) and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SeriesInstanceUID == last.SeriesInstanceUID  # one synthetic series
    assert first.SOPInstanceUID != last.SOPInstanceUID
    assert (first.InstanceNumber, last.InstanceNumber) == (1, 515)
    # Which generator, by name and hash; never where it lies on the aggregator's disk.
    described = str(first.DerivationDescription)
    assert generator_file.name in described and str(generator_file.parent) not in described
    assert "/" not in described and "sha256" in described


def test_a_class_mix_is_drawn_in_proportion_and_checked(generator_file):
    """Evaluation draws a second synthetic set at the site's class mix, so
    the TSTR classifier can face the same mix as the one trained on real."""
    gen = load_generator(generator_file)
    _, labels = generate(gen, 2000, seed=4, class_weights=[9, 1])
    assert labels is not None
    share = float((labels == 0).double().mean())
    assert 0.87 < share < 0.93  # 0.9 ± 5 standard errors
    _, even = generate(gen, 2000, seed=4)
    assert even is not None and int((even == 0).sum()) == 1000
    for bad in ([1.0], [0.0, 0.0], [-1.0, 2.0]):
        with pytest.raises(SampleError, match="class weights must be 2"):
            generate(gen, 4, class_weights=bad)
    with pytest.raises(SampleError, match="one class or for class weights"):
        generate(gen, 4, class_index=0, class_weights=[1, 1])


def test_png_export_and_its_errors(generator_file, tmp_path):
    paths = export(generator_file, 3, tmp_path / "png", "png")
    assert [p.name for p in paths] == [f"synthetic_{i:05d}.png" for i in range(3)]
    with pytest.raises(SampleError, match="--format 'jpeg'"):
        export(generator_file, 3, tmp_path / "x", "jpeg")
    with pytest.raises(SampleError, match="class 5 does not exist"):
        export(generator_file, 3, tmp_path / "x", "png", class_index=5)
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    result = CliRunner().invoke(app, ["sample", "--generator", str(tmp_path / "bad.pt")])
    assert result.exit_code != 0


# -- a whole evaluation ------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A small conditional run trained on site-1's silo, evaluated there with
    a held-out silo, then reported."""
    root = tmp_path_factory.mktemp("eval")
    silo = synth_silo(root / "silo", "fundus", 48, seed=1, size=16)
    held = synth_silo(root / "held", "fundus", 32, seed=2, size=16)
    opts = SiloOptions.from_mapping("fundus", 16, 3, {})
    data = load_silo(silo, opts)
    classes = sorted({lab for lab in data.labels if lab is not None})
    labels = torch.tensor([classes.index(lab) for lab in data.labels])
    spec = GanSpec(image_size=16, channels=3, latent_dim=16, width=8, num_classes=len(classes))
    gen, disc = build(spec, seed=0)
    train_local(
        gen,
        disc,
        torch.from_numpy(data.as_float()),
        TrainConfig(local_steps=20, batch_size=16),
        labels=labels,
    )
    run = RunOutputs(root / "runs" / "r1")
    run.save_generator(gen, 1)
    run.save_checkpoint(gen, disc, 1)
    run.append_metrics(
        {
            "round": 1,
            "sites": ["site-1"],
            "sites_sampled": 1,
            "seconds": 1.0,
            "g_loss": 1.0,
            "d_loss": 1.0,
        }
    )
    run.write_status("completed", rounds=1)
    (run.dir / "run-config.json").write_text(json.dumps({"classes": ",".join(classes)}))
    lines: list[str] = []
    path = evaluate(
        run.dir,
        silo,
        "fundus",
        site_id="site-1",
        holdout=held,
        n_synthetic=96,
        encoder_steps=40,
        classifier_steps=40,
        normal_class=classes[0],
        say=lines.append,
    )
    return run.dir, path, lines


def test_evaluation_writes_numbers_only_and_names_the_site(evaluated):
    run_dir, path, lines = evaluated
    result = json.loads(path.read_text())
    assert result["site"] == "site-1" and result["images"] == {
        "members": 48,
        "held_out": 32,
        "synthetic": 96,
    }
    q, p, u = result["quality"], result["privacy"], result["utility"]
    assert q["domain_fid"] > 0 and 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1
    assert 0 < q["realism"] < 1 and -1 <= q["ssim_nearest"] <= 1
    assert 0 <= p["mia_discriminator_auc"] <= 1 and 0 <= p["mia_generator_auc"] <= 1
    assert 0 <= p["memorized_fraction"] <= 1
    assert 0 <= u["tstr_accuracy"] <= 1 and 0 < u["trtr_accuracy"] <= 1
    assert u["tstr_mix_ratio"] == pytest.approx(u["tstr_mix_accuracy"] / u["trtr_accuracy"])
    assert u["classifier_seeds"] == 3
    assert u["tstr_accuracy_sd"] >= 0 and u["trtr_accuracy_sd"] >= 0
    assert any("± " in line and "of 3 classifiers" in line for line in lines)
    assert any("at this site's class mix" in line for line in lines)
    assert 0 <= u["anomaly_auc"] <= 1 and 0 <= u["anomaly_detected"] <= 1
    assert (run_dir / "evaluation" / "site-1-encoder.pt").exists()
    # Nothing but numbers and names: no pixel arrays in the file.
    assert not re.search(r"\[\s*-?\d+\.\d+\s*,\s*-?\d+\.\d+\s*,", path.read_text())
    assert any(line.startswith("quality") for line in lines)


def test_a_second_evaluation_reuses_the_encoder(evaluated, tmp_path):
    run_dir, path, _ = evaluated
    first = json.loads(path.read_text())["quality"]["domain_fid"]
    lines: list[str] = []
    silo = run_dir.parents[1] / "silo"
    classes = json.loads((run_dir / "run-config.json").read_text())["classes"].split(",")
    evaluate(
        run_dir,
        silo,
        "fundus",
        site_id="site-1",
        holdout=run_dir.parents[1] / "held",
        n_synthetic=96,
        encoder_steps=40,
        classifier_seeds=1,
        classifier_steps=20,
        normal_class=classes[0],
        say=lines.append,
    )
    assert any("reused" in line for line in lines)
    assert "one classifier" in next(line for line in lines if line.startswith("utility"))
    assert json.loads(path.read_text())["quality"]["domain_fid"] == pytest.approx(first)


def test_the_starting_model_is_measured_on_the_same_encoder(evaluated, tmp_path):
    """--start: the domain-FID of the generator the federation started from.
    Given the run's own generator, it equals the run's figure; given an
    untrained one, it is further from the site's images."""
    import shutil

    from fedgan.model_init import save_init

    original, _, _ = evaluated
    run_dir = shutil.copytree(original, tmp_path / "runs" / "r1")  # its own evaluation folder
    untrained_gen, untrained_disc = build(load_generator(run_dir / "generator.pt").spec, seed=5)
    untrained = save_init(tmp_path / "init.pt", untrained_gen, untrained_disc, data={}, steps=0)
    assert untrained.steps == 0
    figures = {}
    for name, start in (("same", run_dir / "generator.pt"), ("untrained", tmp_path / "init.pt")):
        out = evaluate(
            run_dir,
            original.parents[1] / "silo",
            "fundus",
            site_id=f"start-{name}",
            n_synthetic=96,
            encoder_path=original / "evaluation" / "site-1-encoder.pt",
            start=start,
            say=lambda _: None,
        )
        figures[name] = json.loads(out.read_text())
    same, far = figures["same"]["quality"], figures["untrained"]["quality"]
    assert same["domain_fid_start"] == pytest.approx(same["domain_fid"])
    assert far["domain_fid_start"] > far["domain_fid"]
    assert any("brought it closer" in line for line in reading(figures["untrained"]))
    # A run that records its init refuses a --start that is not that init.
    config = run_dir / "run-config.json"
    recorded = json.loads(config.read_text()) | {"model-init-record": {"weights_sha256": "0" * 64}}
    config.write_text(json.dumps(recorded))
    with pytest.raises(EvaluationError, match="is not the init the run started from"):
        evaluate(
            run_dir, original.parents[1] / "silo", "fundus", site_id="x", start=tmp_path / "init.pt"
        )


def test_report_and_exporter_show_the_evaluation(evaluated):
    run_dir, _, _ = evaluated
    html = write_report(run_dir).read_text()
    assert "<h2>Evaluation</h2>" in html and "Not evaluated yet" not in html
    assert "domain-FID" in html and "MIA AUC (D)" in html and "TSTR accuracy" in html
    # Cells and readings are HTML-escaped (quote=True): ' is &#x27;.
    assert "TSTR at the site&#x27;s class mix" in html
    assert "when the synthetic classes follow site-1&#x27;s mix" in html
    assert "coin flip" in html
    (ev,) = load_all(run_dir)
    assert len(reading(ev)) == 5 and "anomaly detector AUC" in html
    families = {m.name: m for m in RunsCollector(run_dir.parent).collect()}
    fid = families["fedgan_eval_domain_fid"].samples
    assert fid[0].labels == {"run": "r1", "site": "site-1"}
    assert fid[0].value == pytest.approx(ev["quality"]["domain_fid"])
    attacks = {s.labels["attack"] for s in families["fedgan_eval_mia_auc"].samples}
    assert attacks == {"discriminator", "generator"}


def test_evaluation_without_holdout_says_why_there_is_no_attack(evaluated):
    run_dir, _, _ = evaluated
    silo = run_dir.parents[1] / "silo"
    path = evaluate(
        run_dir,
        silo,
        "fundus",
        site_id="site-2",
        n_synthetic=32,
        encoder_steps=5,
        say=lambda _m: None,
    )
    privacy = json.loads(path.read_text())["privacy"]
    assert "mia_generator_auc" not in privacy and "--holdout" in privacy["mia"]


def test_inception_fid_is_added_from_a_local_weights_file(evaluated, tmp_path):
    run_dir, _, _ = evaluated
    weights = stand_in.write(stand_in.network(), tmp_path / "pt_inception-test.pth")
    lines: list[str] = []
    path = evaluate(
        run_dir,
        run_dir.parents[1] / "silo",
        "fundus",
        site_id="site-3",
        n_synthetic=16,
        encoder_steps=5,
        inception_weights=weights,
        say=lines.append,
    )
    ev = json.loads(path.read_text())
    assert ev["quality"]["inception_fid"] > 0
    assert ev["inception_weights"]["file"] == weights.name
    assert ev["inception_weights"]["standard"] is False
    assert any(line.startswith("inception     ") for line in lines)  # progress
    assert any("not comparable with published FIDs" in line for line in lines)
    assert any("non-standard weights" in line for line in reading(ev))
    assert "Inception FID" in write_report(run_dir, tmp_path / "r.html").read_text()
    families = {m.name: m for m in RunsCollector(run_dir.parent).collect()}
    (served,) = families["fedgan_eval_inception_fid"].samples  # only site-3 passed weights
    assert served.labels["site"] == "site-3"
    assert served.value == pytest.approx(ev["quality"]["inception_fid"])


def test_an_unknown_normal_class_is_named(evaluated):
    run_dir, _, _ = evaluated
    with pytest.raises(EvaluationError, match="--normal-class 'tumour' is not one of"):
        evaluate(
            run_dir,
            run_dir.parents[1] / "silo",
            "fundus",
            site_id="x",
            holdout=run_dir.parents[1] / "held",
            normal_class="tumour",
            n_synthetic=8,
            say=lambda _m: None,
        )


def test_report_compares_baselines_evaluated_with_the_same_encoder(evaluated, tmp_path):
    import shutil

    run_dir, _, _ = evaluated
    root = run_dir.parents[1]
    same, other = tmp_path / "centralized", tmp_path / "no-dp"
    for dest in (same, other):
        shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("evaluation", "report.html"))
    quiet = {
        "n_synthetic": 48,
        "say": lambda _m: None,
        "holdout": root / "held",
        "classifier_seeds": 1,
        "classifier_steps": 20,
    }
    evaluate(
        same,
        root / "silo",
        "fundus",
        site_id="site-1",
        encoder_path=run_dir / "evaluation" / "site-1-encoder.pt",
        **quiet,
    )
    evaluate(other, root / "silo", "fundus", site_id="site-1", encoder_steps=5, **quiet)
    html = write_report(run_dir, tmp_path / "r.html", [("centralized", same), ("no DP", other)])
    baselines = html.read_text().split("<h2>Baselines</h2>")[1]
    # Other tests in this module may have evaluated more sites: site-1's table only.
    section = baselines.split("<h3>At site-1</h3>")[1].split("<h3>")[0]
    rows = re.findall(
        r"<tr><td>([^<]+)</td>.*?<td>(same|other: FID not comparable)</td></tr>", section
    )
    assert rows == [
        ("this run", "same"),
        ("centralized", "same"),
        ("no DP", "other: FID not comparable"),
    ]
    bad = CliRunner().invoke(app, ["report", str(run_dir), "--baseline", "nolabel"])
    assert bad.exit_code != 0


def test_too_few_real_or_held_out_images_are_refused_naming_the_minimum(evaluated, tmp_path):
    """Pure noise measured against 6 real images read 'precision 1.00': below
    the minimums the evaluation refuses before any work, in one line."""
    from fedgan.evaluate.site import MIN_MIA, MIN_REAL

    run_dir, _, _ = evaluated
    few = synth_silo(tmp_path / "few", "fundus", 6, seed=3, size=16)
    quiet = {"site_id": "x", "n_synthetic": 8, "say": lambda _m: None}
    with pytest.raises(EvaluationError, match=f"6 real images: .* at least {MIN_REAL}") as err:
        evaluate(run_dir, few, "fundus", **quiet)
    assert "\n" not in str(err.value)
    silo = run_dir.parents[1] / "silo"
    with pytest.raises(EvaluationError, match=f"48 members and 6 held-out .* {MIN_MIA} of each"):
        evaluate(run_dir, silo, "fundus", holdout=few, **quiet)
