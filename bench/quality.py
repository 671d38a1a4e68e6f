"""Quality, privacy and utility of synthetic images: centralized against
federated (3 and 5 sites, Dirichlet α = 0.5 label skew) against federated with
DP at ε = 10 and ε = 1.

Data, all offline:
- the handwritten digits scikit-learn ships (1,797 8×8 images, upsampled to
  32×32 or, with --size 64, 64×64; classes as labels);
- the project's synthetic fundus silos (32×32 or 64×64, their labels).

20 % of each set is held out. Those images are the non-members for the
membership-inference attacks and the test set for TSTR.

The federation is simulated in process with the trainer, the DP plan, update
clipping, FedAvg and the BatchNorm recalibration that the real sites and
ServerApp use. No Flower or secure aggregation here: those change transport,
not the model. Printed per configuration: domain-FID (one encoder per data set,
trained on its training images), MIA AUC (discriminator and nearest-neighbour),
memorized fraction, and TSTR accuracy against train-on-real. Goals (issue 8):
- federated DP at ε = 10 within 1.5× the centralized domain-FID;
- MIA AUC ≤ 0.55;
- TSTR ≥ 90 % of train-on-real.

    python bench/quality.py [--data digits synth] [--rounds 20] [--steps 40] [--device cpu]
        [--batch 32] [--dp-batch B] [--synth-images 1200] [--width 32] [--size 32|64]
        [--mode-seeking λ] [--pretrain-steps N] [--public-images 2000]
        [--only "federated 3 sites, DP ε=10" ...] [--json FILE] [--grids DIR]

`--pretrain-steps N` adds three rows: G and D pretrained without DP on a public
set that differs from the sites' (digits: a disjoint part with a shifted class mix;
fundus: the stand-in public set of `fedgan silo synth --profile public`), measured
as they are, then fine-tuned by 3 DP sites at ε = 10 and ε = 1 (lr-g 2e-5, as a
run with `model.init` does by default). Every row is measured against the same training
images, the public part included: on digits the membership attacks then also ask about images
the init saw without DP, a pessimistic reading of the pretrained rows' privacy.

`--grids DIR` writes one PNG per configuration: for each class a row of real training
images over a row of fakes. Look at them before reading a figure: on fundus at the
default 800 steps no generator here draws a recognisable fundus photograph
(RESULTS.md, "Looking at the fakes").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from fedgan.atomic import write_atomic
from fedgan.evaluate import encoder as domain
from fedgan.evaluate import metrics
from fedgan.evaluate.utility import accuracy, train_classifier
from fedgan.gan.models import GanSpec, Generator, build, recalibrate_batchnorm
from fedgan.privacy.accountant import epsilon
from fedgan.privacy.plan import plan_round
from fedgan.samples import grid_png
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloOptions
from fedgan.silo.synth import synth_silo
from fedgan.train import DPConfig, TrainConfig, train_local
from fedgan.update import apply_delta, clip_update, make_update, weighted_mean
from fedgan.weights import get_arrays, set_arrays


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x * 2 - 1, torch.tensor(d.target, dtype=torch.long)


def synth(n: int = 1200, root: Path = Path("/tmp/fedgan-bench-quality"), size: int = 32) -> tuple:
    name = f"fundus-{n}" if size == 32 else f"fundus-{n}-{size}px"
    silo = synth_silo(root / name, "fundus", n, seed=0, size=size)
    data = load_silo(silo, SiloOptions.from_mapping("fundus", size, 3, {}))
    classes = sorted({lab for lab in data.labels if lab is not None})
    keep = [i for i, lab in enumerate(data.labels) if lab is not None]
    x = torch.from_numpy(data.as_float())[keep]
    y = torch.tensor([classes.index(data.labels[i]) for i in keep])
    return x, y


def bench_spec(images: torch.Tensor, classes: int, size: int, width: int) -> GanSpec:
    """The bench's conditional DCGAN (latent 64), shared by every script whose rows
    compare with this one's tables."""
    return GanSpec(
        image_size=size,
        channels=images.shape[1],
        latent_dim=64,
        width=width,
        num_classes=classes,
    )


def recalibrate(gen: Generator, seed: int = 0) -> None:
    """G's BatchNorm statistics from its own outputs, classes drawn evenly, as the
    ServerApp recomputes them after averaging."""
    classes, latent = gen.spec.num_classes, gen.spec.latent_dim
    recalibrate_batchnorm(
        gen,
        lambda n, rng: (
            torch.randn(n, latent, generator=rng),
            torch.randint(0, classes, (n,), generator=rng),
            None,
        ),
        seed=seed,
    )


def held_out_split(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple:
    """(train_x, train_y, test_x, test_y): 20 % held out at random. Every bench
    that compares with this one's tables uses it at seed 0, so its held-out
    images are the same ones."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(0.8 * len(y))], perm[int(0.8 * len(y)) :]
    return x[tr], y[tr], x[te], y[te]


def write_grid(path: Path, gen, train_x, train_y, per_class: int = 8) -> None:
    """Per class, a row of real training images above a row of fakes of that class,
    so that a figure can be checked against what the generator draws."""
    rng = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for c in range(gen.spec.num_classes):
            real = train_x[train_y == c][:per_class]
            fake = gen(
                torch.randn(per_class, gen.spec.latent_dim, generator=rng),
                torch.full((per_class,), c, dtype=torch.long),
            )
            rows += [real, fake.cpu()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, grid_png(torch.cat(rows), columns=per_class))


def dirichlet_split(labels: torch.Tensor, sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed silos: each class spread over sites by Dirichlet(α)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(sites)]
    for c in labels.unique().tolist():
        idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * sites)) * len(idx)).astype(int)[:-1]
        for s, chunk in enumerate(np.split(idx, cuts)):
            parts[s] += chunk.tolist()
    return [np.array(sorted(p)) for p in parts]


def public_split(name: str, x, y, *, images: int, size: int, seed: int) -> tuple:
    """(public_x, public_y, site_x, site_y): a public set for pretraining whose
    distribution differs from the sites', disjoint from them. Digits: part of
    the training images with a shifted class mix (half of each of 0-4, a
    tenth of each of 5-9), the sites keep the rest. Fundus: the stand-in
    public set (`fedgan silo synth --profile public`: another camera, colour
    profile and grade mix); the sites keep every training image."""
    if name == "digits":
        rng = torch.Generator().manual_seed(seed + 1)
        share = torch.where(y < 5, 0.5, 0.1)
        public = torch.rand(len(y), generator=rng) < share
        return x[public], y[public], x[~public], y[~public]
    root = Path("/tmp/fedgan-bench-quality") / f"standin-public-{images}-{size}px"
    silo = synth_silo(root, "fundus", images, seed=10_000, size=size, profile="public")
    data = load_silo(silo, SiloOptions.from_mapping("fundus", size, 3, {}))
    keep = [i for i, lab in enumerate(data.labels) if lab is not None]
    px = torch.from_numpy(data.as_float())[keep]
    py = torch.tensor([int(data.labels[i]) for i in keep])
    return px, py, x, y


def pretrain(px, py, spec, *, steps: int, device: str, seed: int):
    """`fedgan pretrain`'s training (batch 32, lr 2e-4, no DP, the public set
    only), then G's BatchNorm statistics recomputed as the aggregator does."""
    gen, disc = build(spec, seed=seed)
    train_local(
        gen,
        disc,
        px,
        TrainConfig(local_steps=steps, batch_size=32, seed=seed),
        device=device,
        labels=py,
    )
    recalibrate(gen)
    return gen.cpu(), disc.cpu()


def train_federated(
    x,
    y,
    spec,
    *,
    sites,
    rounds,
    steps,
    batch,
    target_eps,
    device,
    seed,
    mode_seeking=0.0,
    init=None,
    lr_g=2e-4,
):
    """``init``: (G, D) to start from instead of random weights."""
    gen, disc = build(spec, seed=seed)
    if init is not None:
        gen.load_state_dict(init[0].state_dict())
        disc.load_state_dict(init[1].state_dict())
    silos = (
        [torch.arange(len(y))]
        if sites == 1
        else [torch.from_numpy(p) for p in dirichlet_split(y, sites, 0.5, seed)]
    )
    spent = []
    for r in range(1, rounds + 1):
        updates = []
        g0, d0 = get_arrays(gen), get_arrays(disc)
        for s, idx in enumerate(silos):
            if len(idx) < batch:
                continue
            lg, ld = build(spec)
            set_arrays(lg, g0)
            set_arrays(ld, d0)
            dp = None
            if target_eps:
                plan = plan_round(
                    noise_multiplier=0.0,
                    target_epsilon=target_eps,
                    max_grad_norm=1.0,
                    delta=0.0,
                    accountant="prv",
                    num_examples=len(idx),
                    batch_size=batch,
                    local_steps=steps,
                    rounds=rounds,
                )
                dp = DPConfig(plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate)
                if r == rounds:
                    spent.append(epsilon([plan.as_round] * rounds, plan.delta))
            train_local(
                lg,
                ld,
                x[idx],
                TrainConfig(
                    local_steps=steps,
                    batch_size=batch,
                    seed=seed + r * 31 + s,
                    mode_seeking=mode_seeking,
                    lr_g=lr_g,
                ),
                device=device,
                dp=dp,
                labels=y[idx],
            )
            update = make_update(get_arrays(lg), get_arrays(ld), g0, d0, 1)  # as sites do
            updates.append(clip_update(update, 20.0)[0] if sites > 1 else update)
        mean_g, mean_d = weighted_mean(updates)
        set_arrays(gen, apply_delta(g0, mean_g))
        set_arrays(disc, apply_delta(d0, mean_d))
        recalibrate(gen, seed=r)
    return gen.eval(), disc.eval(), (max(spent) if spent else None)


def evaluate(gen, disc, enc, train_x, train_y, test_x, test_y, classes, n_fake, seed, prior=None):
    """TSTR trains on fakes drawn evenly over the classes, while train-on-real
    learns the real class mix; `tstr_prior` draws the fakes' classes at
    ``prior`` instead (default: the training labels' frequencies), so both
    classifiers face the same mix."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y_fake = torch.arange(n_fake) % classes
        fake = gen(torch.randn(n_fake, gen.spec.latent_dim, generator=rng), y_fake)
        fid, _ = metrics.fid_kid(train_x, fake, enc)
        pick = torch.randperm(len(train_x), generator=rng)[: len(test_x)]
        members = train_x[pick]
        # No discriminator (bench/mean_embedding.py trains none): no attack on it.
        auc_d = (
            metrics.auc(disc(members, train_y[pick]), disc(test_x, test_y))
            if disc is not None
            else float("nan")
        )
    auc_g = metrics.mia_generator_auc(fake, members, test_x)
    memorized, _, _ = metrics.memorization(fake, train_x, test_x)
    tstr = accuracy(train_classifier(fake, y_fake, classes, seed=seed), test_x, test_y)
    if prior is None:
        prior = torch.bincount(train_y, minlength=classes).double()
    y_prior = torch.multinomial(prior.double(), n_fake, replacement=True, generator=rng)
    with torch.no_grad():
        fake_prior = gen(torch.randn(n_fake, gen.spec.latent_dim, generator=rng), y_prior)
    tstr_prior = accuracy(train_classifier(fake_prior, y_prior, classes, seed=seed), test_x, test_y)
    return {
        "domain_fid": fid,
        "mia_d": auc_d,
        "mia_g": auc_g,
        "memorized": memorized,
        "tstr": tstr,
        "tstr_prior": tstr_prior,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["digits", "synth"], choices=["digits", "synth"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--dp-batch", type=int, help="Batch of the DP rows (default: --batch); DP noise is σ/B."
    )
    ap.add_argument(
        "--only",
        nargs="+",
        help='Run only these configurations, by full name (e.g. "federated 3 sites, DP ε=10").',
    )
    ap.add_argument(
        "--synth-images",
        type=int,
        default=1200,
        help="Images in the synthetic fundus set; DP signal-to-noise grows with images per site.",
    )
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, choices=[32, 64], help="image size")
    ap.add_argument("--mode-seeking", type=float, default=0.0, help="λ of G's mode-seeking term.")
    ap.add_argument("--n-fake", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="> 0: add rows that start from G and D pretrained (no DP) this many steps on a "
        "public set that differs from the sites' (public_split), fine-tuned at lr-g 2e-5.",
    )
    ap.add_argument("--public-images", type=int, default=2000, help="Fundus stand-in set size.")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    ap.add_argument(
        "--grids", type=Path, help="Write each configuration's real-over-fake PNG in this folder."
    )
    args = ap.parse_args()
    if args.synth_images < 100:
        ap.error(f"--synth-images {args.synth_images}: use at least 100 (20 % are held out)")
    torch.manual_seed(args.seed)
    configs = [
        ("centralized, no DP", 1, None),
        ("federated 3 sites", 3, None),
        ("federated 5 sites", 5, None),
        ("federated 3 sites, DP ε=10", 3, 10.0),
        ("federated 3 sites, DP ε=1", 3, 1.0),
    ]
    if args.pretrain_steps:
        configs += [
            ("pretrained only (public)", 0, None),
            ("pretrained, 3 sites, DP ε=10", 3, 10.0),
            ("pretrained, 3 sites, DP ε=1", 3, 1.0),
        ]
    if args.only:
        unknown = set(args.only) - {c[0] for c in configs}
        if unknown:
            ap.error(
                f"--only: no configuration named {sorted(unknown)}; "
                f"the names are {[c[0] for c in configs]}"
            )
        configs = [c for c in configs if c[0] in args.only]
    results = {}
    for name in args.data:
        x, y = digits(args.size) if name == "digits" else synth(args.synth_images, size=args.size)
        train_x, train_y, test_x, test_y = held_out_split(x, y, args.seed)
        classes = int(y.max()) + 1
        spec = bench_spec(x, classes, args.size, args.width)
        init = site_x = site_y = None
        if args.pretrain_steps:
            px, py, site_x, site_y = public_split(
                name, train_x, train_y, images=args.public_images, size=args.size, seed=args.seed
            )
            t = time.perf_counter()
            init = pretrain(px, py, spec, steps=args.pretrain_steps, device=args.device, seed=0)
            what = "a disjoint part, shifted class mix" if name == "digits" else "another camera"
            print(
                f"pretrained on a stand-in public set of {len(py)} images ({what}; "
                f"{args.pretrain_steps} steps, "
                f"{time.perf_counter() - t:.0f} s); the pretrained rows' sites hold "
                f"{len(site_y)} of the training images",
                flush=True,
            )
        enc = domain.train_encoder(train_x, steps=600, seed=args.seed)
        trtr = accuracy(train_classifier(train_x, train_y, classes, seed=args.seed), test_x, test_y)
        print(
            f"\n{name}: {len(train_y)} training / {len(test_y)} held-out images, {classes} classes,"
            f" train-on-real accuracy {trtr:.3f}"
        )
        print(
            f"{'configuration':<28} {'ε':>6} {'domain-FID':>10} {'MIA D':>6} {'MIA G':>6} "
            f"{'memo':>5} {'TSTR':>6} {'/real':>6} {'@prior':>6} {'min':>5}"
        )
        rows = {}
        for label, sites, eps in configs:
            t = time.perf_counter()
            pretrained = label.startswith("pretrained")
            if sites == 0:  # the public starting point itself, before any site
                assert init is not None
                gen, disc, spent = init[0].eval(), init[1].eval(), None
            else:
                gen, disc, spent = train_federated(
                    site_x if pretrained else train_x,
                    site_y if pretrained else train_y,
                    spec,
                    sites=sites,
                    rounds=args.rounds,
                    steps=args.steps,
                    batch=(args.dp_batch or args.batch) if eps else args.batch,
                    target_eps=eps,
                    device=args.device,
                    seed=args.seed,
                    mode_seeking=args.mode_seeking,
                    init=init if pretrained else None,
                    lr_g=2e-5 if pretrained else 2e-4,
                )
            r = evaluate(
                gen, disc, enc, train_x, train_y, test_x, test_y, classes, args.n_fake, args.seed
            )
            r.update(
                epsilon=spent, tstr_ratio=r["tstr"] / trtr, minutes=(time.perf_counter() - t) / 60
            )
            rows[label] = r
            if args.grids:
                slug = label.replace(" ", "-").replace(",", "").replace("ε=", "eps")
                write_grid(args.grids / f"{name}-{slug}.png", gen, train_x, train_y)
            print(
                f"{label:<28} {spent if spent is not None else float('nan'):>6.2f} "
                f"{r['domain_fid']:>10.2f} {r['mia_d']:>6.3f} {r['mia_g']:>6.3f} "
                f"{r['memorized']:>5.1%} {r['tstr']:>6.3f} {r['tstr_ratio']:>6.0%} "
                f"{r['tstr_prior'] / trtr:>6.0%} {r['minutes']:>5.1f}",
                flush=True,
            )
        central = rows.get("centralized, no DP")
        dp10 = rows.get("federated 3 sites, DP ε=10")
        if central and dp10:
            print(
                f"goals: DP ε=10 FID {dp10['domain_fid'] / central['domain_fid']:.2f}× "
                f"centralized (≤ 1.5), max MIA AUC "
                f"{max(max(r['mia_d'], r['mia_g']) for r in rows.values()):.3f} (≤ 0.55), "
                f"DP ε=10 TSTR {dp10['tstr_ratio']:.0%} of train-on-real (≥ 90 %)"
            )
        results[name] = {"train_on_real": trtr, "configs": rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
