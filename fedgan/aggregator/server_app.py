"""The aggregator's ServerApp: Flower wiring only. It reads the run's
settings, opens the run store and the audit log, and hands Flower's Grid,
as a `GridTransport`, to `fedgan.aggregator.run.run_federation`."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgan.aggregator.run import run_federation
from fedgan.aggregator.run_store import RunOutputs, read_records
from fedgan.aggregator.transport import GridTransport
from fedgan.atomic import write_text_atomic
from fedgan.audit_log import AuditLog
from fedgan.config.run import ConfigError, RunSettings
from fedgan.model_init import ModelInit, load_init

log = logging.getLogger("fedgan.server")
app = ServerApp()


def _log_to_stream() -> None:
    """Our log lines into the ServerApp's output, which Flower streams to
    `flwr run --stream` (it swaps sys.stdout for its buffer at start, so
    the handler is made here, not at import)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def start_from(settings: RunSettings) -> ModelInit | None:
    """The run's pretrained init, loaded and checked; None without one, and
    on a resume from a checkpoint, which holds the weights (the init file
    may have moved since)."""
    if not settings.model_init:
        return None
    run_dir = Path(settings.run_dir) if settings.run_dir else None
    if settings.resume and run_dir is not None and RunOutputs(run_dir).checkpoint_path.exists():
        return None
    return load_init(Path(settings.model_init), settings.spec, classes=settings.classes)


def _earlier_init_record(out: RunOutputs) -> dict | None:
    try:
        earlier = json.loads((out.dir / "run-config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    record = earlier.get("model-init-record") if isinstance(earlier, dict) else None
    return record if isinstance(record, dict) else None


class RunStopped(BaseException):
    """SIGTERM or SIGINT reached the ServerApp (a stopped demo or container,
    Ctrl-C): the run ends as "stopped", with the last round it completed."""


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Both signals raise `RunStopped` in the round loop, so status.json and
    the audit log say "stopped" rather than "running" forever. Flower's own
    handlers come back afterwards."""

    def stop(signum: int, _frame: object) -> None:
        raise RunStopped(f"stopped by {signal.Signals(signum).name}")

    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave the signals to Flower
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _last_round(out: RunOutputs) -> int:
    """The round a resume goes on after: the checkpoint's (its metrics line
    may not be appended yet; a resume restores it)."""
    try:
        return int(out.load_checkpoint()["round"])
    except (OSError, KeyError, RuntimeError, ValueError):
        return max((r["round"] for r in read_records(out.metrics_path)), default=0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stream()
    try:
        settings = RunSettings.from_run_config(context.run_config)
        init = start_from(settings)
    except ConfigError as exc:
        raise SystemExit(f"fedgan: {exc}") from None
    run_dir = Path(settings.run_dir or Path.cwd() / "runs" / f"flower-{context.run_id}")
    out = RunOutputs(run_dir)
    # One audit log for every run at this aggregator, beside the run folders.
    audit = AuditLog(out.dir.parent / "audit.jsonl")
    run = out.dir.name
    out.write_status("running", flower_run_id=context.run_id, rounds=settings.rounds)
    # What `fedgan evaluate` needs to draw like the run (class names, attributes).
    # And, for auditors and the report, what the run started from (a resume
    # keeps the record of the run's first start).
    first = _earlier_init_record(out) if settings.resume else None
    record = init.record() if init else first
    recorded = dict(context.run_config) | ({"model-init-record": record} if record else {})
    write_text_atomic(out.dir / "run-config.json", json.dumps(recorded, indent=1, sort_keys=True))
    audit.append(
        "run_started",
        run=run,
        flower_run_id=str(context.run_id),
        rounds=settings.rounds,
        resume=settings.resume,
        dp=settings.privacy.enabled,
        secure_aggregation=settings.secagg.enabled,
        model_init=record,
    )
    try:
        with _stopped_by_signals():
            summary = run_federation(GridTransport(grid), settings, out, audit, init)
    except RunStopped as stop:
        last = _last_round(out)
        out.write_status("stopped", flower_run_id=context.run_id, last_round=last, reason=str(stop))
        audit.append("run_stopped", run=run, last_round=last, reason=str(stop))
        raise SystemExit(f"fedgan: run {run} {stop} after round {last}") from None
    except BaseException as exc:
        out.write_status("failed", flower_run_id=context.run_id, reason=str(exc))
        audit.append("run_failed", run=run, reason=str(exc) or type(exc).__name__)
        raise
    if "stopped" in summary:
        out.write_status("failed", flower_run_id=context.run_id, reason=summary["stopped"])
        audit.append("run_failed", run=run, reason=summary["stopped"])
        return
    out.write_status("completed", flower_run_id=context.run_id, rounds=settings.rounds, **summary)
    audit.append("run_completed", run=run, rounds=settings.rounds)
