"""One whole site round without Flower, on whatever device the site would use:
synthesize a DICOM silo, load it, plan and record the DP spend, train, clip.
It is the GPU path's end-to-end check (run it on the device tool) and prints
where the round's time goes. Never part of the tests.

    .venv/bin/python bench/site_round.py [--device cuda] [--size 64] [--n 2000]
        [--steps 200] [--batch 64] [--rounds 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedgan.config.appbundle import default_run_config
from fedgan.config.run import RunSettings, SiteSettings
from fedgan.gan.models import build
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.silo.synth import synth_silo
from fedgan.site.round import run_round
from fedgan.train import resolve_device
from fedgan.weights import get_arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=2000, help="images in the silo")
    parser.add_argument("--steps", type=int, default=200, help="local steps per round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="run-config KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    overrides: dict[str, object] = {
        "image-size": args.size,
        "channels": 1,
        "local-steps": args.steps,
        "batch-size": args.batch,
        "num-server-rounds": args.rounds,
        "run-dir": "runs/bench",
    }
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = type(default_run_config()[key])(value)
    settings = RunSettings.from_run_config(default_run_config() | overrides)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = synth_silo(Path(tmp) / "silo", "dicom", args.n, seed=1, size=2 * args.size)
        print(f"synthesized {args.n} DICOM files in {time.perf_counter() - start:.1f} s")
        site = SiteSettings.from_node_config(
            {
                "site-id": "bench",
                "data-dir": str(data),
                "kind": "dicom",
                "work-dir": str(Path(tmp) / "work"),
                "device": args.device,
                "epsilon-budget": 1e9,
            }
        )
        device = resolve_device(site.device)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        print(f"device {device} ({name}), torch {torch.__version__}")
        gen, disc = build(settings.spec, seed=0)
        g, d = get_arrays(gen), get_arrays(disc)
        for server_round in range(1, args.rounds + 1):
            start = time.perf_counter()
            outcome = run_round(site, {}, "bench", settings.round_config(server_round), g, d)
            wall = time.perf_counter() - start
            assert outcome.update is not None, outcome.refusal
            m = outcome.metrics
            print(
                f"round {server_round}: {wall:.2f} s wall, {m['train-seconds']:.2f} s training "
                f"({args.steps * args.batch / m['train-seconds']:.0f} img/s), "
                f"ε={m.get('epsilon', float('nan')):.3f} σ={m.get('noise-multiplier', 0):.3f} "
                f"g-loss {m['g-loss']:.3f} d-loss {m['d-loss']:.3f} "
                f"update norm {m['update-norm']:.2f}"
            )
            assert all(np.isfinite(a).all() for a in outcome.update.gen)
        spends = PrivacyLedger.in_work_dir(Path(site.work_dir)).spends()
        print(f"ledger: {len(spends)} spends, last ε {spends[-1].epsilon_after:.3f}")


if __name__ == "__main__":
    main()
