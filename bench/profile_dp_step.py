"""Where a DP training step's GPU time goes: torch.profiler over a few steps
of `train_local`, plain and DP (our ghost clipping and Opacus's hooks),
printing the top kernels and the peak
memory. A diagnostic for the DP-speed work; never part of the tests.

    python bench/profile_dp_step.py [--size 64] [--batch 256] [--steps 10]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from fedgan.gan.models import GanSpec, build
from fedgan.train import DPConfig, TrainConfig, train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    spec = GanSpec(image_size=args.size, channels=3, latent_dim=100, width=64)
    images = torch.rand(4 * args.batch, 3, args.size, args.size) * 2 - 1
    for mode in ("plain", "dp-ghost", "dp-hooks"):
        gen, disc = build(spec, seed=0)
        dp = None
        if mode != "plain":
            dp = DPConfig(1.0, 1.0, 0.25, grad_sample_mode=mode.removeprefix("dp-"))
        cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch)
        train_local(
            gen, disc, images, TrainConfig(local_steps=2, batch_size=args.batch), "cuda", dp
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = train_local(gen, disc, images, cfg, "cuda", dp)
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
        rate = args.steps * args.batch / result.seconds
        print(
            f"== {mode}: {rate:,.0f} img/s, peak {peak:.2f} GiB, {args.size}px batch {args.batch}"
        )
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
