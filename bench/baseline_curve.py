"""The centralized, non-private GAN trained far past the bench's 800 steps, evaluated
along the way: how good does the baseline that issue 8's goals are measured against
get on these silos, and does it keep improving?

Why: every fundus row of quality.py compares generators after 800 GAN steps, where
none of them, the centralized one included, draws a fundus photograph (RESULTS.md,
"Looking at the fakes"). Whether TSTR ≥ 90 % of train-on-real is reachable on the
synthetic fundus silos at all is a question about a baseline trained to its plateau.

One GAN on the pooled training images (the seed-0 split of quality.py, so the held-out
images are the same), trained in chunks of --chunk steps with the product's trainer (a
fresh Adam per chunk, as a federated round has; G's BatchNorm statistics recomputed
before each evaluation). Every --every steps it prints domain-FID (quality.py's
encoder), TSTR (the mean ± s.d. of --classifier-seeds classifiers trained on 1,000
fakes drawn evenly over the classes) against train-on-real, and TRTS (the share of the
fakes that the real-trained classifiers put in the class asked for), and writes the
real-over-fake grid and G. `--ema β` also keeps an exponential moving average of G's
weights over the steps (post-processing of G: no image is read) and evaluates it
beside G.

    python bench/baseline_curve.py --data synth --steps 40000 --every 8000 --out DIR
    python bench/baseline_curve.py --data synth --steps 16000 --mode-seeking 0 --out DIR
    python bench/baseline_curve.py --data synth --size 64 --width 64 --steps 100000 --every 20000 \
        --device cuda --out DIR
    python bench/baseline_curve.py --data synth --steps 16000 --lr-g 1e-4 --lr-d 4e-4 --ema 0.999 \
        --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from quality import bench_spec, digits, held_out_split, recalibrate, synth, write_grid

from fedgan.atomic import write_text_atomic
from fedgan.evaluate import encoder as domain
from fedgan.evaluate import metrics
from fedgan.evaluate.utility import accuracy, train_classifier
from fedgan.gan.models import build
from fedgan.train import TrainConfig, train_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synth", choices=["digits", "synth"])
    ap.add_argument("--synth-images", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=40000, help="GAN steps in all")
    ap.add_argument("--chunk", type=int, default=2000, help="steps per call of the trainer")
    ap.add_argument("--every", type=int, default=8000, help="evaluate every this many steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, choices=[32, 64], help="image size")
    ap.add_argument("--mode-seeking", type=float, default=1.0, help="λ of G's mode-seeking term")
    ap.add_argument("--lr-g", type=float, default=2e-4)
    ap.add_argument("--lr-d", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.0, help="β of G's weight average; 0: none")
    ap.add_argument("--classifier-seeds", type=int, default=3)
    ap.add_argument("--n-fake", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True, help="folder for grids, Gs and log.json")
    args = ap.parse_args()
    if args.every % args.chunk or args.steps % args.chunk:
        ap.error(f"--steps and --every must be multiples of --chunk ({args.chunk})")
    if not 0 <= args.ema < 1:
        ap.error(f"--ema {args.ema}: use 0 (off) or a β in (0, 1)")

    torch.manual_seed(0)
    x, y = digits(args.size) if args.data == "digits" else synth(args.synth_images, size=args.size)
    train_x, train_y, test_x, test_y = held_out_split(x, y, 0)
    classes = int(y.max()) + 1
    spec = bench_spec(x, classes, args.size, args.width)
    enc = domain.train_encoder(train_x, steps=600, seed=0)
    seeds = range(args.classifier_seeds)
    real_clfs = [train_classifier(train_x, train_y, classes, seed=s) for s in seeds]
    trtr = statistics.fmean(accuracy(c, test_x, test_y) for c in real_clfs)
    print(
        f"{args.data}: {len(train_y)} training / {len(test_y)} held out; train-on-real {trtr:.3f}"
    )

    gen, disc = build(spec, seed=0)
    ema = copy.deepcopy(gen).to(args.device) if args.ema else None

    def average(_step: int, _total: int) -> None:
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), gen.parameters(), strict=True):
                    pe.lerp_(p.detach(), 1 - args.ema)

    args.out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    start = time.perf_counter()
    for done in range(args.chunk, args.steps + 1, args.chunk):
        gen.train()
        cfg = TrainConfig(
            local_steps=args.chunk,
            batch_size=args.batch,
            seed=done,
            lr_g=args.lr_g,
            lr_d=args.lr_d,
            mode_seeking=args.mode_seeking,
        )
        train_local(gen, disc, train_x, cfg, args.device, labels=train_y, progress=average)
        if done % args.every:
            continue
        for name, g in [("G", gen)] + ([("EMA", ema)] if ema is not None else []):
            g = g.cpu()
            recalibrate(g, seed=done)
            g.eval()
            rng = torch.Generator().manual_seed(0)
            fake_y = torch.arange(args.n_fake) % classes
            with torch.no_grad():
                fake = g(torch.randn(args.n_fake, spec.latent_dim, generator=rng), fake_y)
            fid, _ = metrics.fid_kid(train_x, fake, enc)
            tstr = [
                accuracy(train_classifier(fake, fake_y, classes, seed=s), test_x, test_y)
                for s in seeds
            ]
            trts = statistics.fmean(accuracy(c, fake, fake_y) for c in real_clfs)
            row = {
                "steps": done,
                "weights": name,
                "domain_fid": fid,
                "tstr": statistics.fmean(tstr),
                "tstr_sd": statistics.stdev(tstr) if len(tstr) > 1 else 0.0,
                "trtr": trtr,
                "trts": trts,
                "minutes": (time.perf_counter() - start) / 60,
            }
            log.append(row)
            print(
                f"{done:>7} steps {name:<3}  domain-FID {fid:7.2f}  TSTR {row['tstr']:.3f} ± "
                f"{row['tstr_sd']:.3f} ({row['tstr'] / trtr:.0%} of real)  TRTS {trts:.3f}  "
                f"{row['minutes']:.1f} min",
                flush=True,
            )
            tag = f"{name.lower()}_{done:06d}"
            write_grid(args.out / f"grid_{tag}.png", g, train_x, train_y)
            torch.save(g.state_dict(), args.out / f"{tag}.pt")
            g.to(args.device)
        write_text_atomic(args.out / "log.json", json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
