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
    python bench/mean_embedding.py --data synth --size 64 --load g64.pt --grid g64.png
    python bench/mean_embedding.py --data synth --epsilon 0 --patch-weight 0.75
    python bench/mean_embedding.py --data synth --epsilon 0 --patch-weight 0.97 --classifier-seeds 5

`--patch-weight w` adds to φ the mean over positions of random Fourier features of k×k
patches (`PatchPixelMap`), with weight w against the whole-image features: a kernel
that sees how often lesion-like patches occur, which the whole-image kernel weighs
little (RESULTS.md). The norm of φ stays at most 1, so the sensitivity is still √2.
The release reads every position; the fit estimates each fake's patch mean from
`--patch-positions` random positions, which is post-processing.

`--save`/`--load` split the fit (where a GPU is) from the evaluation (anywhere): the
split is seeded, so a loaded G is evaluated on the same held-out images. The release is
drawn again (its noise is never seeded); only the prior-matched TSTR's class prior reads it.

Prints domain-FID, TSTR and the generator-side MIA AUC, computed as bench/quality.py
does (same split, same encoder training, same classifier), so the rows compare with
its tables. The release, the accounting and the fit are the product's own
(`privacy.mechanism: mean-embedding`: fedgan.privacy.mean_embedding,
fedgan.privacy.embedding_fit); only the federation around them is simulated.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from quality import (
    bench_spec,
    digits,
    dirichlet_split,
    evaluate,
    held_out_split,
    recalibrate,
    synth,
    write_grid,
)

from fedgan.evaluate import encoder as domain
from fedgan.evaluate.utility import accuracy, train_classifier, tstr
from fedgan.gan.models import Generator
from fedgan.privacy.accountant import calibrate_noise
from fedgan.privacy.embedding_fit import fit_generator
from fedgan.privacy.mean_embedding import FeatureMap, Target, release


class PatchPixelMap:
    """φ(x) = [√(1−w)·φ_pixels(x), √w·m(x)], m(x) the mean over k×k patch
    positions of [cos(Vp), sin(Vp)]/√P. ‖m(x)‖ ≤ 1 (a mean of unit vectors),
    so ‖φ(x)‖ ≤ 1 and one image still moves a release by at most √2. V is drawn
    from its own public seed, its length scale from the patch size."""

    def __init__(
        self,
        pixels: FeatureMap,
        channels: int,
        *,
        weight: float,
        size: int,
        features: int,
        length_scale: float,
        positions: int,
        seed: int,
    ) -> None:
        if not 0 < weight <= 1:
            raise ValueError("the patch weight is in (0, 1]")
        self.pixels, self.weight, self.size, self.positions = pixels, weight, size, positions
        d = channels * size * size
        v = torch.randn(features, d, generator=torch.Generator().manual_seed(seed + 1))
        self.v = v / (length_scale * math.sqrt(d))
        self.width = pixels.width + 2 * features

    def patch_mean(self, x: torch.Tensor) -> torch.Tensor:
        u = F.unfold(x.float(), self.size)  # [B, d, positions]
        if torch.is_grad_enabled() and 0 < self.positions < u.shape[2]:
            # In the fit: an unbiased estimate from a few random positions.
            pick = torch.randint(0, u.shape[2], (u.shape[0], 1, self.positions))
            u = torch.gather(u, 2, pick.expand(-1, u.shape[1], -1))
        p = u.transpose(1, 2) @ self.v.T  # [B, positions, P]
        return torch.cat([p.cos().mean(1), p.sin().mean(1)], 1) / math.sqrt(self.v.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The release (no grad) embeds 256 images at a time over every position:
        # 256 × positions × P floats; chunked to keep that under ~0.5 GB.
        if not torch.is_grad_enabled() and len(x) > 16:
            return torch.cat([self(part) for part in x.split(16)])
        w = self.weight
        return torch.cat([math.sqrt(1 - w) * self.pixels(x), math.sqrt(w) * self.patch_mean(x)], 1)


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
    ap.add_argument("--grid", type=Path, help="write a real-over-fake PNG per class here")
    ap.add_argument("--patch-weight", type=float, default=0.0, help="0: whole-image kernel only")
    ap.add_argument("--patch-size", type=int, default=3)
    ap.add_argument("--patch-features", type=int, default=1000)
    ap.add_argument("--patch-scale", type=float, default=0.3, help="length scale / √(patch values)")
    ap.add_argument("--patch-positions", type=int, default=64, help="per fake per fit step")
    ap.add_argument("--classifier-seeds", type=int, default=1, help="TSTR: mean of this many")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x, y = digits(args.size) if args.data == "digits" else synth(args.synth_images, size=args.size)
    train_x, train_y, test_x, test_y = held_out_split(x, y)  # quality.py's held-out images
    classes = int(y.max()) + 1
    phi = FeatureMap(train_x[0].numel(), args.features, args.scale, seed=args.seed)
    if args.patch_weight > 0:
        phi = PatchPixelMap(
            phi,
            x.shape[1],
            weight=args.patch_weight,
            size=args.patch_size,
            features=args.patch_features,
            length_scale=args.patch_scale,
            positions=args.patch_positions,
            seed=args.seed,
        )
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

    spec = bench_spec(x, classes, args.size, args.width)
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
        recalibrate(gen)
        if args.save:
            torch.save(gen.state_dict(), args.save)
    gen.eval()
    if args.grid:
        write_grid(args.grid, gen, train_x, train_y)
    if args.skip_eval:
        return
    enc = domain.train_encoder(train_x, steps=600, seed=0)
    # The prior-matched TSTR draws classes at the release's noisy class prior:
    # post-processing, no privacy cost.
    r = evaluate(
        gen, None, enc, train_x, train_y, test_x, test_y, classes, 1000, seed=0, prior=target.prior
    )
    real = accuracy(train_classifier(train_x, train_y, classes, seed=0), test_x, test_y)
    if args.classifier_seeds > 1:
        # The product's TSTR (mean and s.d. over classifier seeds) on fresh fakes.
        with torch.no_grad():
            y_fake = torch.arange(1000) % classes
            fake = gen(
                torch.randn(1000, spec.latent_dim, generator=torch.Generator().manual_seed(1)),
                y_fake,
            )
        t5 = tstr(
            fake, y_fake, train_x, train_y, test_x, test_y, classes, seeds=args.classifier_seeds
        )
        print(
            f"TSTR over {args.classifier_seeds} classifiers: {t5['tstr_accuracy']:.3f} ± "
            f"{t5['tstr_accuracy_sd']:.3f}, train-on-real {t5['trtr_accuracy']:.3f} ± "
            f"{t5['trtr_accuracy_sd']:.3f}: {t5['tstr_ratio']:.0%}"
        )
    print(
        f"{args.data}, {args.sites} sites, ε {args.epsilon}: domain-FID {r['domain_fid']:.2f}, "
        f"TSTR {r['tstr']:.3f} ({r['tstr'] / real:.0%} of train-on-real {real:.3f}), MIA AUC (G) "
        f"{r['mia_g']:.3f}, memorized {r['memorized']:.1%}, prior-matched TSTR "
        f"{r['tstr_prior']:.3f} ({r['tstr_prior'] / real:.0%}), "
        f"{(time.perf_counter() - t) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
