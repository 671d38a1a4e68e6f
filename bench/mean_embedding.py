"""A private alternative to DP-SGD on D, measured: sites release one noisy class-wise
mean embedding (DP-MERF, Harder et al. 2021); G is fitted to the sum of the releases.

Why try it: DP-SGD on D adds noise to every one of D's weights at every step, and on
silos of a few hundred images that noise is 12-24x the clipped signal (RESULTS.md).
Here each site adds noise once, to one vector: Σ_i φ(x_i) ⊗ onehot(y_i) and the class
counts, where φ are random Fourier features of a Gaussian kernel with ‖φ(x)‖ = 1, so
one image moves the release by at most √2 (its feature row and its count), whatever
the image. That is one Gaussian mechanism (sample rate 1, one step); the sum across
sites is what secure aggregation already computes; G's fit reads only that sum, so it
is post-processing. The features come from a public seed and the length scale from the
image size, never from the data.

    python bench/mean_embedding.py --data digits --epsilon 10
    python bench/mean_embedding.py --data digits --epsilon 1
    python bench/mean_embedding.py --data synth --epsilon 10
    python bench/mean_embedding.py --data synth --synth-images 12000 --epsilon 10
    python bench/mean_embedding.py --data synth --size 64 --device cuda --save g64.pt --skip-eval
    python bench/mean_embedding.py --data synth --size 64 --load g64.pt

`--save`/`--load` split the fit (where a GPU is) from the evaluation (anywhere): the
split is seeded, so a loaded G is evaluated on the same held-out images. The release is
drawn again (its noise is never seeded); only the prior-matched TSTR's class prior reads it.

Prints domain-FID, TSTR and the generator-side MIA AUC, computed as bench/quality.py
does (same split, same encoder training, same classifier), so the rows compare with
its tables. The release, the accounting and the fit are the product's own
(`privacy.mechanism: mean-embedding`: fedgan.privacy.mean_embedding,
fedgan.gan.embedding_fit); only the federation around them is simulated.
"""

from __future__ import annotations

import argparse
import time

import torch
from quality import digits, dirichlet_split, evaluate, synth

from fedgan.evaluate import encoder as domain
from fedgan.evaluate.utility import accuracy, train_classifier
from fedgan.gan.embedding_fit import fit_generator
from fedgan.gan.models import GanSpec, Generator, recalibrate_batchnorm
from fedgan.privacy.accountant import calibrate_noise
from fedgan.privacy.mean_embedding import FeatureMap, Target, release


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits", choices=["digits", "synth"])
    ap.add_argument("--epsilon", type=float, default=10.0, help="0: no noise")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--features", type=int, default=4000)
    ap.add_argument("--scale", type=float, default=0.3, help="kernel length scale / √pixels")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--width", type=int, default=32, help="G's width (product default 32)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synth-images", type=int, default=1200, help="synthetic fundus silo size")
    ap.add_argument("--size", type=int, default=32, choices=[32, 64], help="image size")
    ap.add_argument("--device", default="cpu", help="where G is fitted")
    ap.add_argument("--save", help="write the fitted G's weights here")
    ap.add_argument("--load", help="evaluate these weights instead of fitting")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x, y = digits(args.size) if args.data == "digits" else synth(args.synth_images, size=args.size)
    # The split of bench/quality.py at seed 0, so the held-out set is the same.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    train_x, train_y, test_x, test_y = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    classes = int(y.max()) + 1
    phi = FeatureMap(train_x[0].numel(), args.features, args.scale, seed=args.seed)
    # As a site calibrates it: one step at sampling rate 1.
    sigma = (
        calibrate_noise(args.epsilon, args.delta, 1.0, 1, args.accountant)
        if args.epsilon > 0
        else 0.0
    )
    total = sum(
        release(phi, train_x[idx], train_y[idx], classes, sigma)
        for idx in (torch.from_numpy(p) for p in dirichlet_split(train_y, args.sites, 0.5, 0))
    )
    print(f"σ {sigma:.3f} for ε {args.epsilon} ({args.accountant}, one release per site)")

    spec = GanSpec(
        image_size=args.size,
        channels=x.shape[1],
        latent_dim=64,
        width=args.width,
        num_classes=classes,
    )
    gen = Generator(spec)
    t = time.perf_counter()

    def progress(step: int, steps: int, loss: float) -> None:
        if step % 250 == 0 or step == steps:
            print(f"step {step}: loss {loss:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    target = Target.from_sum(total)
    if args.load:
        gen.load_state_dict(torch.load(args.load, weights_only=True))
    else:
        fit = fit_generator(
            gen,
            phi,
            target,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            progress=progress,
        )
        print(
            f"fit on {args.device}: {fit.seconds / fit.steps * 1000:.1f} ms/step, "
            f"loss {fit.loss:.4f}"
        )
        recalibrate_batchnorm(
            gen,
            lambda n, rng: (
                torch.randn(n, spec.latent_dim, generator=rng),
                torch.randint(0, classes, (n,), generator=rng),
                None,
            ),
        )
        if args.save:
            torch.save(gen.state_dict(), args.save)
    gen.eval()
    if args.skip_eval:
        return
    enc = domain.train_encoder(train_x, steps=600, seed=0)
    # The prior-matched TSTR draws classes at the release's noisy class prior:
    # post-processing, no privacy cost.
    r = evaluate(
        gen, None, enc, train_x, train_y, test_x, test_y, classes, 1000, seed=0, prior=target.prior
    )
    real = accuracy(train_classifier(train_x, train_y, classes, seed=0), test_x, test_y)
    print(
        f"{args.data}, {args.sites} sites, ε {args.epsilon}: domain-FID {r['domain_fid']:.2f}, "
        f"TSTR {r['tstr']:.3f} ({r['tstr'] / real:.0%} of train-on-real {real:.3f}), MIA AUC (G) "
        f"{r['mia_g']:.3f}, memorized {r['memorized']:.1%}, prior-matched TSTR "
        f"{r['tstr_prior']:.3f} ({r['tstr_prior'] / real:.0%}), "
        f"{(time.perf_counter() - t) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
