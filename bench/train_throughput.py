"""Images per second of a full local GAN step (D step + G step) at a site,
without DP and with DP on D's real half (Opacus hooks or functorch, or our
ghost-norm clipping, fedgan.privacy.clipped_gradient).
Prints figures; never part of the tests.

    .venv/bin/python bench/train_throughput.py [--device cuda] [--sizes 64 128]
        [--batches 64 256] [--steps 20] [--width 64]
        [--modes plain dp-hooks dp-functorch dp-ghost plain+bf16 dp-ghost+bf16+cl ...]

`+compile` (torch.compile of G and D) and `+cg` (its "reduce-overhead" mode, CUDA
graphs) are measured for the plain step only: the private half's hooks record
activations per step, which compiled graphs do not replay. They answer how far
the non-DP goal is from eager PyTorch, before the product takes them on.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import fedgan.train
from fedgan.gan.models import GanSpec, build
from fedgan.train import DPConfig, TrainConfig, train_local

# A mode is the DP method, optionally followed by +bf16 (autocast), +cl
# (channels_last), +compile or +cg (plain only), +padN (ghost mode's Poisson
# batches padded to a multiple of N; +pad1: unpadded), e.g. "dp-hooks+bf16+cl".
PADDED = fedgan.train.PAD_MULTIPLE
MODES = ("plain", "dp-hooks", "dp-functorch", "dp-ghost")


def throughput(size: int, batch: int, steps: int, width: int, mode: str, device: str) -> float:
    method, *flags = mode.split("+")
    spec = GanSpec(image_size=size, channels=3, latent_dim=100, width=width)
    gen, disc = build(spec, seed=0)
    if "compile" in flags or "cg" in flags:
        if method != "plain":
            raise ValueError("+compile and +cg are measured for the plain step only")
        compile_mode = "reduce-overhead" if "cg" in flags else "default"
        gen = torch.compile(gen, mode=compile_mode)
        disc = torch.compile(disc, mode=compile_mode)
    # +padN: ghost mode's Poisson batches padded to a multiple of N instead of
    # train.PAD_MULTIPLE (+pad1: raw sizes; train.padded_rows says why).
    pads = [int(f.removeprefix("pad")) for f in flags if f.startswith("pad")]
    fedgan.train.PAD_MULTIPLE = pads[0] if pads else PADDED
    images = torch.rand(4 * batch, 3, size, size) * 2 - 1
    dp = None
    if method != "plain":
        dp = DPConfig(1.0, 1.0, 0.25, grad_sample_mode=method.removeprefix("dp-"))
    options = {"precision": "bf16" if "bf16" in flags else "fp32", "channels_last": "cl" in flags}
    # Compiled modes record their graphs (and CUDA graphs) in the first steps.
    warm = 5 if "compile" in flags or "cg" in flags else 2
    cfg = TrainConfig(local_steps=warm, batch_size=batch, **options)
    train_local(gen, disc, images, cfg, device=device, dp=dp)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    cfg = TrainConfig(local_steps=steps, batch_size=batch, **options)
    train_local(gen, disc, images, cfg, device, dp)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="e.g. plain+bf16+cl")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        f"device {args.device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, width {args.width}, {args.steps} steps"
    )
    print(f"{'size':>5} {'batch':>6} " + " ".join(f"{m:>16}" for m in args.modes) + "   DP/plain")
    # DP/plain compares each DP mode with the plain mode of the same flags.
    for size in args.sizes:
        for batch in args.batches:
            rates = {}
            for m in args.modes:
                try:
                    rates[m] = throughput(size, batch, args.steps, args.width, m, args.device)
                except Exception as exc:  # a mode that fails still lets the others report
                    print(f"  {m} at {size}/{batch}: {type(exc).__name__}: {exc}"[:300])
                    rates[m] = float("nan")
            ratios = []
            for m, rate in rates.items():
                method, *flags = m.split("+")
                flags = [f for f in flags if not f.startswith("pad")]  # plain is never padded
                plain = rates.get("+".join(["plain", *flags]))
                if method != "plain" and plain:
                    ratios.append(f"{m} {rate / plain:.2f}x")
            ratio = "   " + ", ".join(ratios)
            print(
                f"{size:>5} {batch:>6} "
                + " ".join(f"{r:>12.1f} i/s" for r in rates.values())
                + ratio,
                flush=True,
            )


if __name__ == "__main__":
    main()
