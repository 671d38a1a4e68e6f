"""Where a round's time goes: timestamped marks from every process of a
federation, for `bench/round_overhead.py`.

Off unless ``FEDGAN_TIMELINE`` names a file in a process's environment, set
by whoever starts the processes (a bench, or a site's own operator, never
anything the aggregator sends). Each mark is one JSON line appended with a
single ``write`` to a file opened with O_APPEND, so the processes of a
loopback federation can share one file without interleaving. A mark holds
stage names, site ids, round groups and times only: never a value of an
update, a key, a pixel or a tag."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "FEDGAN_TIMELINE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark(event: str, **fields: object) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # a measurement never fails a round


def process_started() -> float | None:
    """The wall time this process was started at (from /proc, 10 ms
    resolution): a ClientApp's first mark comes after Flower has started the
    interpreter, imported itself, installed the app bundle and pulled the
    message, and this is when all that began. (Measured back from now with
    /proc/uptime: /proc/stat's boot time is whole seconds.)"""
    try:
        with open("/proc/self/stat", "rb") as f:
            # Field 22 (starttime, clock ticks since boot), after the ")" that
            # ends the command name, which may itself hold spaces.
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


# -- reading a timeline --------------------------------------------------------

# The parts of one stage at one site, in order: what each column measures.
PARTS = (
    (
        "deliver",
        "the aggregator's send to the ClientApp process's start (SuperLink, SuperNode poll)",
    ),
    ("flower", "process start to FedGAN's first line (interpreter, Flower, app bundle, message)"),
    ("imports", "FedGAN's ClientApp module and its imports"),
    ("handler", "the handler's own work"),
    ("back", "the handler's end to the aggregator having every reply"),
)
# The train handler's parts: what a site does between receiving and replying.
TRAIN_PARTS = (
    ("silo", "site.begin", "site.silo"),
    ("admit", "site.silo", "site.admitted"),
    ("steps", "site.admitted", "site.steps"),
    ("update", "site.steps", "site.trained"),
    ("mask", "site.trained", "site.end"),
)
# What the aggregator does after the last exchange of a round.
SERVER_PARTS = (
    ("unmask+decode", "server.done", "server.collected"),
    ("apply", "server.collected", "server.applied"),
    ("publish", "server.applied", "server.published"),
    ("keep", "server.published", "server.kept"),
)


@dataclass
class StageTimes:
    kind: str
    wall: float
    parts: dict[str, float]  # the slowest site's figure for each of PARTS ("back": the last's)
    sites: int


@dataclass
class RoundTimes:
    round: int
    wall: float
    stages: list[StageTimes] = field(default_factory=list)
    between: float = 0.0  # the aggregator's own work between exchanges
    train: dict[str, float] = field(default_factory=dict)  # slowest site, TRAIN_PARTS
    server: dict[str, float] = field(default_factory=dict)  # SERVER_PARTS

    @property
    def overhead(self) -> float:
        """Beyond the slowest site's training steps."""
        return self.wall - self.train.get("steps", 0.0)


def read(path: Path) -> list[dict[str, Any]]:
    marks = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return sorted(marks, key=lambda m: m["t"])


def rounds(marks: list[dict[str, Any]]) -> list[RoundTimes]:
    """Each round's timeline from the marks of every process (``marks`` in
    time order, as `read` returns them). A round that did not finish (a stop,
    a crash before a resume) is left out; so is a stage without its end."""

    def latest(event: str, pid: int, before: float) -> dict[str, Any] | None:
        # The nearest such mark of this process before ``before``: a pid the
        # system reused later belongs to another process.
        found = None
        for m in marks:
            if m["t"] > before:
                break
            if m["event"] == event and m["pid"] == pid:
                found = m
        return found

    out = []
    starts = [m for m in marks if m["event"] == "server.round"]
    for start in starts:
        r = start["round"]
        end = next(
            (
                m
                for m in marks
                if m["event"] == "server.kept"
                and m["round"] == r
                and m["pid"] == start["pid"]
                and m["t"] >= start["t"]
            ),
            None,
        )
        if end is None:
            continue
        inside = [m for m in marks if start["t"] <= m["t"] <= end["t"]]
        times = RoundTimes(r, end["t"] - start["t"])
        last_done = start["t"]
        for send in (m for m in inside if m["event"] == "server.send"):
            done = next(
                (
                    m
                    for m in inside
                    if m["event"] == "server.done"
                    and m["group"] == send["group"]
                    and m["kind"] == send["kind"]
                    and m["t"] >= send["t"]
                ),
                None,
            )
            if done is None:
                continue
            times.between += send["t"] - last_done
            last_done = done["t"]
            stage = send["kind"].removeprefix("train.") or "train"
            begins = [
                m
                for m in inside
                if m["event"] == "site.begin"
                and m["stage"] == stage
                and send["t"] <= m["t"] <= done["t"]
            ]
            parts: dict[str, float] = {}
            for begin in begins:
                pid = begin["pid"]
                finish = next(
                    (
                        m
                        for m in inside
                        if m["event"] == "site.end" and m["pid"] == pid and m["t"] >= begin["t"]
                    ),
                    None,
                )
                first = latest("clientapp.loading", pid, begin["t"])
                ready = latest("clientapp.loaded", pid, begin["t"])
                if finish is None or first is None or ready is None or not first.get("started"):
                    continue
                site = {
                    "deliver": first["started"] - send["t"],
                    "flower": first["t"] - first["started"],
                    "imports": ready["t"] - first["t"],
                    "handler": finish["t"] - begin["t"],
                    "back": done["t"] - finish["t"],
                }
                for k, v in site.items():
                    # "back" from the last site to finish: the others wait for it.
                    pick = min if k == "back" else max
                    parts[k] = pick(parts[k], v) if k in parts else v
                if stage == "train":
                    at = {m["event"]: m["t"] for m in inside if m["pid"] == pid}
                    for name, a, b in TRAIN_PARTS:
                        if a in at and b in at:
                            times.train[name] = max(times.train.get(name, 0.0), at[b] - at[a])
            times.stages.append(StageTimes(stage, done["t"] - send["t"], parts, len(begins)))
        at = {m["event"]: m["t"] for m in inside if m["event"].startswith("server.")}
        at["server.done"] = last_done
        for name, a, b in SERVER_PARTS:
            if a in at and b in at:
                times.server[name] = at[b] - at[a]
        out.append(times)
    return out


def table(times: RoundTimes) -> list[str]:
    """One round as the lines `bench/round_overhead.py` prints."""
    lines = [
        f"round {times.round}: {times.wall:.2f} s; the slowest site's training steps "
        f"{times.train.get('steps', 0.0):.2f} s; overhead {times.overhead:.2f} s"
    ]
    head = "  ".join(f"{name:>8}" for name, _ in PARTS)
    lines.append(f"  {'stage':<17} {'sites':>5} {'wall':>8}  {head}")
    for s in times.stages:
        cells = "  ".join(f"{s.parts.get(name, float('nan')):8.2f}" for name, _ in PARTS)
        lines.append(f"  {s.kind:<17} {s.sites:>5} {s.wall:8.2f}  {cells}")
    lines.append(
        "  train handler: "
        + ", ".join(f"{k} {times.train[k]:.2f}" for k, _, _ in TRAIN_PARTS if k in times.train)
    )
    lines.append(
        f"  aggregator: between exchanges {times.between:.2f}, "
        + ", ".join(f"{k} {v:.2f}" for k, v in times.server.items())
    )
    return lines
