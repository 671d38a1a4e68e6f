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

Prints domain-FID, TSTR and the generator-side MIA AUC, computed as bench/quality.py
does (same split, same encoder training, same classifier), so the rows compare with
its tables.
"""

from __future__ import annotations

import argparse
import secrets
import time

import torch
from opacus.accountants.utils import get_noise_multiplier
from quality import digits, dirichlet_split, evaluate, synth

from fedgan.evaluate import encoder as domain
from fedgan.evaluate.utility import accuracy, train_classifier
from fedgan.gan.models import GanSpec, Generator, recalibrate_batchnorm


def feature_map(dim: int, features: int, scale: float, seed: int):
    """φ(x) = [cos(Wx), sin(Wx)] / √F, W ~ N(0, 1/ℓ²), ℓ = scale·√dim (pixels in [-1, 1])."""
    w = torch.randn(dim, features, generator=torch.Generator().manual_seed(seed))
    w /= scale * dim**0.5

    def phi(x: torch.Tensor) -> torch.Tensor:
        p = x.flatten(1) @ w
        return torch.cat([p.cos(), p.sin()], 1) / features**0.5

    return phi


def site_release(phi, x, y, classes: int, sigma: float, rng: torch.Generator) -> torch.Tensor:
    """The site's one release, [classes, 2F + 1]: feature sums and counts, plus
    N(0, (σ·√2)²) noise (√2: one image's largest effect on the release)."""
    f = phi(x)
    out = torch.zeros(classes, f.shape[1] + 1)
    out[:, :-1].index_add_(0, y, f)
    out[:, -1].index_add_(0, y, torch.ones(len(y)))
    if sigma > 0:
        out += torch.randn(out.shape, generator=rng) * sigma * 2**0.5
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits", choices=["digits", "synth"])
    ap.add_argument("--epsilon", type=float, default=10.0, help="0: no noise")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--features", type=int, default=4000)
    ap.add_argument("--scale", type=float, default=0.6, help="kernel length scale / √pixels")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x, y = digits() if args.data == "digits" else synth()
    # The split of bench/quality.py at seed 0, so the held-out set is the same.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    train_x, train_y, test_x, test_y = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    classes = int(y.max()) + 1
    phi = feature_map(train_x[0].numel(), args.features, args.scale, seed=args.seed)
    sigma = (
        get_noise_multiplier(
            target_epsilon=args.epsilon,
            target_delta=args.delta,
            sample_rate=1.0,
            steps=1,
            accountant="rdp",
        )
        if args.epsilon > 0
        else 0.0
    )
    noise = torch.Generator().manual_seed(secrets.randbits(63))
    total = sum(
        site_release(phi, train_x[idx], train_y[idx], classes, sigma, noise)
        for idx in (torch.from_numpy(p) for p in dirichlet_split(train_y, args.sites, 0.5, 0))
    )
    counts = total[:, -1].clamp(min=1.0)
    target = total[:, :-1] / counts[:, None]
    prior = counts / counts.sum()
    print(f"σ {sigma:.3f} for ε {args.epsilon} (one release per site); counts {counts.round()}")

    spec = GanSpec(image_size=32, channels=x.shape[1], latent_dim=64, width=32, num_classes=classes)
    gen = Generator(spec)
    opt = torch.optim.Adam(gen.parameters(), args.lr, betas=(0.5, 0.999))
    per_class = 64
    labels = torch.arange(per_class * classes) % classes
    t = time.perf_counter()
    for step in range(1, args.steps + 1):
        fake = gen(torch.randn(len(labels), spec.latent_dim), labels)
        means = torch.zeros_like(target).index_add(0, labels, phi(fake)) / per_class
        loss = ((means - target) ** 2 * prior[:, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps:
            print(
                f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - t:.0f} s)", flush=True
            )
    recalibrate_batchnorm(
        gen,
        lambda n, rng: (
            torch.randn(n, spec.latent_dim, generator=rng),
            torch.randint(0, classes, (n,), generator=rng),
            None,
        ),
    )
    gen.eval()
    enc = domain.train_encoder(train_x, steps=600, seed=0)
    r = evaluate(gen, None, enc, train_x, train_y, test_x, test_y, classes, 1000, seed=0)
    real = accuracy(train_classifier(train_x, train_y, classes, seed=0), test_x, test_y)
    print(
        f"{args.data}, {args.sites} sites, ε {args.epsilon}: domain-FID {r['domain_fid']:.2f}, "
        f"TSTR {r['tstr']:.3f} ({r['tstr'] / real:.0%} of train-on-real {real:.3f}), MIA AUC (G) "
        f"{r['mia_g']:.3f}, memorized {r['memorized']:.1%}, "
        f"{(time.perf_counter() - t) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
