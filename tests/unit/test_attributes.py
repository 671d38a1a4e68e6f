"""Tabular conditioning: the declaration, a site's attributes.csv, and a
generator that draws what the attribute vector asks for."""

from __future__ import annotations

import csv

import pytest
import torch

from fedgan.attributes import AttributesError, parse, read_site_attributes, sample, width
from fedgan.config.run import SiteSettings
from fedgan.gan.models import GanSpec, build
from fedgan.silo.options import SiloOptions
from fedgan.silo.synth import synth_silo
from fedgan.site.round import site_images
from fedgan.train import DPConfig, TrainConfig, train_local


def test_declaration_encoding_and_sampling():
    attrs = parse("age=0:100, sex=F|M")
    assert width(attrs) == 3
    age, sex = attrs
    assert age.encode("50") == [0.0] and age.encode("045Y") == pytest.approx([-0.1])
    assert age.encode("130") == [1.0] and age.encode("x") is None and age.encode("nan") is None
    assert sex.encode("M") == [0.0, 1.0] and sex.encode("O") is None
    drawn = sample(attrs, 500, torch.Generator().manual_seed(0))
    assert drawn.shape == (500, 3) and drawn[:, 0].abs().max() <= 1
    assert torch.equal(drawn[:, 1:].sum(1), torch.ones(500))
    assert 0.4 < float(drawn[:, 2].mean()) < 0.6
    for bad, match in [
        ("age", "name=low:high"),
        ("age=5:1", "high > low"),
        ("sex=F|F", "two or more"),
        ("sex=F", "name=low:high"),
        ("a=0:1,a=0:2", "twice"),
    ]:
        with pytest.raises(AttributesError, match=match):
            parse(bad)
    assert parse("") == ()


def test_site_reads_attributes_csv_and_leaves_out_unusable_rows(tmp_path):
    silo = synth_silo(tmp_path / "silo", "fundus", 10, seed=1, size=32)
    stems = sorted(p.stem for p in silo.glob("*.png")) or sorted(
        p.stem for p in silo.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    rows = [["id_code", "age", "sex"]] + [
        [s, str(20 + i), "F" if i % 2 else "M"] for i, s in enumerate(stems)
    ]
    rows[1][1] = "unknown"  # unusable: left out
    with open(silo / "attributes.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    site = SiteSettings("s", str(silo), "fundus", str(tmp_path / "work"), "cpu", 10.0)
    opts = SiloOptions(kind="fundus", image_size=16, channels=3)
    attrs = parse("age=0:100,sex=F|M")
    images, labels, vectors = site_images(site, opts, (), attrs)
    assert images.shape[0] == vectors.shape[0] == len(stems) - 1 and labels is None
    table = read_site_attributes(silo, "fundus", attrs)
    assert torch.allclose(vectors[0], torch.from_numpy(table[stems[1]]))
    (silo / "attributes.csv").write_text("id_code,age\nx,3\n")
    with pytest.raises(AttributesError, match="missing sex"):
        read_site_attributes(silo, "fundus", attrs)
    (silo / "attributes.csv").write_text("file,age,sex\nx,3,F\n")
    with pytest.raises(AttributesError, match=r"missing id_code or image$"):
        read_site_attributes(silo, "fundus", attrs)
    (silo / "attributes.csv").unlink()
    with pytest.raises(AttributesError, match=r"attributes\.csv not found.*id_code,age,sex"):
        read_site_attributes(silo, "fundus", attrs)


def _pictures(n: int, seed: int):
    """side=L: left half bright; side=T: top half bright. level in [-1, 1]
    shifts the whole image's brightness."""
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(0, 2, (n,), generator=g)
    level = torch.rand(n, generator=g) * 2 - 1
    x = torch.full((n, 1, 16, 16), -0.6)
    x[side == 0, :, :, :8] = 0.4
    x[side == 1, :, :8, :] = 0.4
    x = x + 0.3 * level.view(-1, 1, 1, 1) + 0.05 * torch.randn(x.shape, generator=g)
    attrs = torch.cat([torch.nn.functional.one_hot(side, 2).float(), level[:, None]], dim=1)
    return x.clamp(-1, 1), side, attrs


def test_attribute_conditioned_generator_draws_what_it_is_asked():
    declared = parse("side=L|T,level=-1:1")
    x, side, attrs = _pictures(256, 0)
    clf = torch.nn.Linear(256, 2)
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x.flatten(1)), side).backward()
        opt.step()
    spec = GanSpec(image_size=16, channels=1, latent_dim=16, width=16, attr_dim=3)
    gen, disc = build(spec, seed=0)
    cfg = TrainConfig(local_steps=300, batch_size=32, lr_g=2e-3, lr_d=2e-3, cond_lambda=1.0)
    train_local(
        gen, disc, x, cfg, attributes=attrs, sample_attributes=lambda n, g: sample(declared, n, g)
    )
    gen.eval()
    z = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    wanted = torch.arange(200) % 2
    onehot = torch.nn.functional.one_hot(wanted, 2).float()
    with torch.no_grad():
        dark = gen(z, None, torch.cat([onehot, -torch.ones(200, 1)], 1))
        bright = gen(z, None, torch.cat([onehot, torch.ones(200, 1)], 1))
    accuracy = float((clf(dark.flatten(1)).argmax(1) == wanted).float().mean())
    assert accuracy > 0.8  # chance is 0.5
    assert float(bright.mean() - dark.mean()) > 0.1  # the level attribute brightens


def test_attribute_models_need_vectors_and_train_with_dp():
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8, attr_dim=2)
    gen, disc = build(spec, seed=0)
    x = torch.rand(12, 1, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="attributes and a sampler"):
        train_local(gen, disc, x, TrainConfig(local_steps=1))
    with pytest.raises(ValueError, match="B×2 attributes"):
        gen(torch.randn(2, 8))
    attrs = torch.rand(12, 2)
    before = disc.attr_head.weight.detach().clone()
    result = train_local(
        gen,
        disc,
        x,
        TrainConfig(local_steps=2, batch_size=4),
        dp=DPConfig(1.0, 1.0, 0.3),
        attributes=attrs,
        sample_attributes=lambda n, g: torch.rand(n, 2, generator=g),
    )
    assert result.steps == 2
    # The attribute head learns, privately: it is part of D's DP step.
    assert not torch.equal(before, disc.attr_head.weight)


def test_cond_lambda_weighs_the_discriminators_attribute_term_too():
    """λ = 0 leaves D's attribute head untouched (no gradient reaches it);
    a λ > 0 trains it. Before, D used λ = 1 whatever the run config said."""
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8, attr_dim=2)
    x, attrs = torch.rand(12, 1, 16, 16) * 2 - 1, torch.rand(12, 2)
    heads = {}
    for weight in (0.0, 2.0):
        gen, disc = build(spec, seed=0)
        before = disc.attr_head.weight.detach().clone()
        train_local(
            gen,
            disc,
            x,
            TrainConfig(local_steps=2, batch_size=4, cond_lambda=weight),
            attributes=attrs,
            sample_attributes=lambda n, g: torch.rand(n, 2, generator=g),
        )
        heads[weight] = torch.equal(before, disc.attr_head.weight)
    assert heads == {0.0: True, 2.0: False}
