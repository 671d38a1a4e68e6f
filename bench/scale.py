"""How a secure round's cost grows with the number of sites: a real `fedgan
demo` (SuperLink, edge, one sidecar and SuperNode per site, a ClientApp
process per message) for each site count, one local step on small silos,
secure aggregation on, every process on this one host. Never part of the
tests.

    .venv/bin/python bench/scale.py [--sites 3 10 20 30] [--rounds 2] [--png bench/scale.png]

Per site count it prints the last round (the steady state): wall time; the
overhead beyond the slowest site's training steps; the aggregator's CPU
seconds in that round and its peak memory over the run (SuperLink, SuperExec
and ServerApp together); the largest site's peak memory (its SuperNode with the
warm ClientApp runtime and every task forked from it; memory is PSS, so
pages a fork shares with its parent count once); bytes each site sent for its update; and
the aggregator's secure-aggregation time (its work between the exchanges
and the unmasking). On one host every site shares the same cores, so wall
time here is an upper bound for a consortium whose sites train in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedgan import timeline
from fedgan.deploy.process import descendants

AGGREGATOR = ("flower-superlink", "flower-superexec", "flwr-serverapp")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def _proc(pid: int) -> tuple[str, str, float, int] | None:
    """(program name, site it works for or "", CPU seconds, RSS bytes), or
    None if gone. A site's processes (SuperNode, warm runtime, tasks, shims)
    all work in its folder, ``<run>/sites/<id>``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    names = [Path(a.decode(errors="replace")).name for a in argv[:2]]
    name = next((n for n in names if n.startswith(("flower-", "flwr-"))), names[0])
    site = cwd.name if cwd.parent.name == "sites" else ""
    cpu = (int(stat[11]) + int(stat[12])) / TICK
    return name, site, cpu, _pss(pid) or int(stat[21]) * PAGE


def _pss(pid: int) -> int | None:
    """Proportional set size: pages shared between processes (a warm runtime
    and its forks) counted once in a sum, where RSS would count them in each."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Sampler:
    """Samples every process below ``root`` twice a second."""

    root: int
    samples: list[tuple[float, float, int, dict[str, int]]] = field(default_factory=list)
    cpu_seen: dict[int, float] = field(default_factory=dict)  # pid -> last CPU seconds
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.5)

    def sample(self) -> None:
        procs = {pid: p for pid in descendants({self.root}) if (p := _proc(pid))}
        agg_rss, site_rss = 0, {}
        for pid, (name, site, cpu, rss) in procs.items():
            if site:  # first: each SuperNode has a flower-superexec of its own
                site_rss[site] = site_rss.get(site, 0) + rss
            elif name in AGGREGATOR:
                self.cpu_seen[pid] = cpu
                agg_rss += rss
        self.samples.append((time.time(), sum(self.cpu_seen.values()), agg_rss, site_rss))

    def cpu_between(self, a: float, b: float) -> float:
        def at(t: float) -> float:
            before = [cpu for when, cpu, _, _ in self.samples if when <= t]
            return before[-1] if before else 0.0

        return at(b) - at(a)


def run(sites: int, rounds: int, out: Path) -> dict[str, float]:
    marks = out / "timeline.jsonl"
    fedgan = Path(sys.executable).with_name("fedgan")
    argv = [str(fedgan), "demo", "--sites", str(sites), "--rounds", str(rounds)]
    argv += ["--local-steps", "1", "--image-size", "16", "--images-per-site", "16"]
    argv += ["--no-pretrain", "--no-evaluate", "--out", str(out), "--run-id", "scale"]
    # Every site's processes share this host's cores, so a stage's wall time
    # here grows with n (30 sites' first preflights, each a noise calibration,
    # took 100-125 s on 2 cores, past the default 120 s); at a consortium
    # each site works on its own machine and a stage does not grow with n.
    argv += ["--config", "batch-size=8", "--config", f"secagg-timeout={max(120, 15 * sites)}"]
    log = open(out / "demo.log", "wb")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        argv, env={**os.environ, timeline.ENV: str(marks)}, stdout=log, stderr=subprocess.STDOUT
    )
    sampler = Sampler(demo.pid)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    code = demo.wait()
    sampler.stop.set()
    thread.join()
    log.close()
    if code != 0:
        sys.exit(f"{sites} sites: fedgan demo exited {code}; see {out / 'demo.log'}")
    last = timeline.rounds(timeline.read(marks))[-1]
    metrics = [json.loads(x) for x in (out / "scale" / "metrics.jsonl").read_text().splitlines()]
    row = metrics[-1]
    if len(row.get("sites", [])) != sites:
        sys.exit(f"{sites} sites: the last round kept {len(row.get('sites', []))}; see {out}")
    start = next(
        m["t"]
        for m in timeline.read(marks)
        if m["event"] == "server.round" and m["round"] == last.round
    )
    sent = row.get("update_bytes") or {}
    return {
        "sites": sites,
        "round_s": last.wall,
        "overhead_s": last.overhead,
        "agg_cpu_s": sampler.cpu_between(start, start + last.wall),
        "agg_peak_mb": max(s[2] for s in sampler.samples) / 2**20,
        "site_peak_mb": max((max(s[3].values(), default=0) for s in sampler.samples), default=0)
        / 2**20,
        "bytes_per_site": sum(sent.values()) / max(1, len(sent)),
        "secagg_server_s": last.between + last.server.get("unmask+decode", 0.0),
    }


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """Round time and overhead against sites, drawn with Pillow (no plotting
    library is a dependency)."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [r["sites"] for r in rows]
    top = max(r["round_s"] for r in rows) * 1.1 or 1.0
    right = max(xs) * 1.05

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * x / right, h - pad - (h - 2 * pad) * y / top

    d.line([xy(0, 0), xy(right, 0)], fill="black")
    d.line([xy(0, 0), xy(0, top)], fill="black")
    for x in xs:
        d.text((xy(x, 0)[0] - 6, h - pad + 6), str(int(x)), fill="black")
    for i in range(5):
        y = top * i / 4
        d.text((8, xy(0, y)[1] - 6), f"{y:.0f} s", fill="black")
    for key, colour in (("round_s", "navy"), ("overhead_s", "darkorange")):
        points = [xy(r["sites"], r[key]) for r in rows]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for px, py in points:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    d.text((pad, 12), "secure round, one local step: wall (blue), overhead (orange)", fill="black")
    d.text((w // 2 - 20, h - 24), "sites", fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20, 30])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("scale.png"))
    args = parser.parse_args()
    rows = []
    head = (
        f"{'sites':>5} {'round s':>8} {'overhead s':>10} {'agg CPU s':>9} {'agg MB':>7} "
        f"{'site MB':>7} {'bytes/site':>10} {'secagg s':>8}"
    )
    print(head)
    for n in args.sites:
        out = Path(tempfile.mkdtemp(prefix=f"fedgan-scale-{n}-"))
        r = run(n, args.rounds, out)
        rows.append(r)
        print(
            f"{n:>5} {r['round_s']:8.1f} {r['overhead_s']:10.1f} {r['agg_cpu_s']:9.1f} "
            f"{r['agg_peak_mb']:7.0f} {r['site_peak_mb']:7.0f} {r['bytes_per_site']:10.0f} "
            f"{r['secagg_server_s']:8.2f}",
            flush=True,
        )
    plot(rows, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
