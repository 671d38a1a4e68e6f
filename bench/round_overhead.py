"""Where a federated round's time goes, per stage and per process: a real
`fedgan demo` (SuperLink, edge, sidecars, SuperNodes, one ClientApp process
per message) with every process marking its steps in one timeline
(`fedgan.timeline`, switched on by FEDGAN_TIMELINE), then a table per round.
Round 1 pays one-time costs (caches, first imports); later rounds are the
steady state. Never part of the tests.

    .venv/bin/python bench/round_overhead.py [--sites 3] [--rounds 3]
        [--local-steps 1] [--no-secagg] [--timeline FILE]   # FILE: only read it

Columns, for the slowest site of each stage:
  deliver   the aggregator's send to the ClientApp process's start
  flower    process start to FedGAN's first line (interpreter, Flower, bundle)
  imports   FedGAN's ClientApp module
  handler   the stage's own work at the site
  back      the handler's end to the aggregator holding every reply
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedgan import timeline


def run_demo(args: argparse.Namespace, out: Path) -> Path:
    marks = out / "timeline.jsonl"
    fedgan = Path(sys.executable).with_name("fedgan")
    argv = [str(fedgan), "demo", "--sites", str(args.sites), "--rounds", str(args.rounds)]
    argv += ["--local-steps", str(args.local_steps), "--image-size", "16"]
    argv += ["--images-per-site", "32", "--no-pretrain", "--no-evaluate"]
    argv += ["--out", str(out), "--run-id", "overhead", "--config", "batch-size=8"]
    if args.no_secagg:
        argv += ["--config", "secagg=false"]
    env = {**os.environ, timeline.ENV: str(marks)}
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(
            f"fedgan demo failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    print(
        f"demo: {args.sites} sites, {args.rounds} rounds, {time.monotonic() - started:.0f} s in all"
    )
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--no-secagg", action="store_true")
    parser.add_argument("--timeline", type=Path, help="read this timeline instead of running")
    args = parser.parse_args()
    marks = args.timeline or run_demo(args, Path(tempfile.mkdtemp(prefix="fedgan-overhead-")))
    for times in timeline.rounds(timeline.read(marks)):
        print()
        print("\n".join(timeline.table(times)))
    print(f"\ntimeline: {marks}")


if __name__ == "__main__":
    main()
