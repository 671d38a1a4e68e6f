"""The aggregator's append-only audit log: JSON lines, each carrying the
SHA-256 of the line before it, so an edited or deleted line breaks the
chain; a head file (count and last hash, rewritten atomically after every
append) makes a truncated tail visible too.

What goes in: run submitted/completed/failed, a site joining or leaving a
run, budget refusals, secure-aggregation aborts and rejected (tampered)
messages. Ids, numbers and reasons only: never keys, pixels or patient data.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgan.atomic import write_text_atomic
from fedgan.errors import FedGanError

GENESIS = "0" * 64


class AuditLogError(FedGanError):
    """The audit log cannot be written or read."""


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    problem: str = ""


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head = self.path.with_name(self.path.name + ".head")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (durably, under an exclusive lock: two ServerApps
        may share the log)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with open(fd, "r+", encoding="utf-8", closefd=False) as fh:
                fh.seek(0)
                lines = fh.read().splitlines()
            prev = _digest(lines[-1]) if lines else GENESIS
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": event,
                **fields,
                "prev": prev,
            }
            line = json.dumps(entry, sort_keys=True, ensure_ascii=False)
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
            write_text_atomic(
                self.head, json.dumps({"entries": len(lines) + 1, "last": _digest(line)}) + "\n"
            )
        finally:
            os.close(fd)
        return entry

    def verify(self) -> Verdict:
        """Check the chain line by line, then the head against the end."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return Verdict(False, 0, f"{self.path} not found")
        prev = GENESIS
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                return Verdict(False, number - 1, f"line {number} is not JSON (edited or torn)")
            if entry.get("prev") != prev:
                return Verdict(
                    False,
                    number - 1,
                    f"line {number} does not follow line {number - 1} (a line was edited, "
                    "inserted or deleted)",
                )
            prev = _digest(line)
        try:
            head = json.loads(self.head.read_text())
        except (OSError, ValueError):
            return Verdict(False, len(lines), f"{self.head} is missing or unreadable")
        if head.get("entries") != len(lines) or head.get("last") != prev:
            return Verdict(
                False,
                len(lines),
                f"the log ends at entry {len(lines)} but {self.head.name} records "
                f"{head.get('entries')} (truncated, or lines removed from the end)",
            )
        return Verdict(True, len(lines))


def record_round(log: AuditLog, run: str, record: dict[str, Any], seen: set[str]) -> None:
    """The audit events of one round, from its metrics record: sites that
    joined (first round in the sum), refused for budget or by their approval
    policy, dropped out or failed (with the reason), rejected messages, an
    abandoned round."""
    r = record["round"]
    for site in record.get("sites", []):
        if site not in seen:
            seen.add(site)
            log.append("site_joined", run=run, round=r, site=site)
    for site, why in sorted(record.get("budget_exhausted", {}).items()):
        log.append("budget_refused", run=run, round=r, site=site, **why)
    for site, why in sorted(record.get("refused", {}).items()):
        log.append("site_refused", run=run, round=r, site=site, reason=why)
    for site, why in sorted(record.get("secagg", {}).get("failures", {}).items()):
        event = "secagg_rejected" if "authentication failed" in why else "site_dropped"
        log.append(event, run=run, round=r, site=site, reason=why)
    for why in record.get("failures", []):
        log.append("site_failed", run=run, round=r, reason=why)
    if "skipped" in record:
        event = "secagg_aborted" if "secagg" in record else "round_skipped"
        log.append(event, run=run, round=r, reason=record["skipped"])


_EDGE_LINE = re.compile(
    r'^(?P<time>\S+) edge (?P<remote>\S+) "(?P<request>[^"]*)" (?P<status>\d+) '
    r"verify=(?P<verify>.*?) proto="
)


def ingest_edge_log(log: AuditLog, edge_log: Path) -> int:
    """Append a ``certificate_rejected`` event for each new edge access-log
    line whose client certificate did not verify; returns how many. The
    offset read so far is kept beside the audit log, so each line is
    recorded once however often this runs (a rotated, shorter log restarts
    from its beginning)."""
    state = log.path.with_name(log.path.name + ".edge-offset")
    try:
        offset = int(state.read_text().strip() or 0)
    except (OSError, ValueError):
        offset = 0
    try:
        size = Path(edge_log).stat().st_size
    except OSError:
        return 0
    if size < offset:
        offset = 0
    added = 0
    with open(edge_log, "rb") as fh:
        fh.seek(offset)
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # a line still being written: next time
            offset += len(raw)
            m = _EDGE_LINE.match(raw.decode("utf-8", errors="replace"))
            if m and m["verify"] != "SUCCESS":
                log.append(
                    "certificate_rejected",
                    at=m["time"],
                    remote=m["remote"],
                    status=int(m["status"]),
                    verify=m["verify"],
                )
                added += 1
    write_text_atomic(state, f"{offset}\n")
    return added


# How often `fedgan exporter` copies new rejections into the audit log:
# Prometheus's scrape interval, the pace it had when a scrape did it.
EDGE_LOG_EVERY_S = 15.0


def record_certificate_rejections(runs_root: Path, edge_logs: Iterable[Path]) -> int:
    """One pass of `ingest_edge_log` over each edge log, into the audit log
    beside the run folders (``<runs>/audit.jsonl``); returns how many events
    it added."""
    log = AuditLog(Path(runs_root) / "audit.jsonl")
    return sum(ingest_edge_log(log, Path(edge_log)) for edge_log in edge_logs)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def follow_edge_logs(
    runs_root: Path,
    edge_logs: Iterable[Path],
    *,
    every: float = EDGE_LOG_EVERY_S,
    stop: threading.Event | None = None,
    warn: Callable[[str], None] = _warn,
) -> None:
    """Record new certificate rejections now and every ``every`` seconds
    until ``stop`` is set (never, by default). A pass that cannot read or
    write is reported and the exporter keeps serving; the read offset is
    saved only after a whole pass, so the next one reads those lines again
    (an event may then be recorded twice, never lost)."""
    edge_logs = list(edge_logs)
    stop = stop or threading.Event()
    while True:
        if edge_logs:
            try:
                record_certificate_rejections(runs_root, edge_logs)
            except OSError as exc:
                warn(f"audit log: certificate rejections not recorded this time: {exc}")
        if stop.wait(every):
            return
