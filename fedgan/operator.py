"""The consortium operator's commands against a live SuperLink: submit a run
described by federation.yaml and follow it, list runs and sites, stop a run.

They drive Flower's own `flwr` CLI (the SuperLink's Control API over TLS,
configured in the operator's FLWR_HOME) rather than re-implementing its
protocol; what is ours is the checking before submission, the config-only
app bundle, and the progress lines read from the ServerApp's log stream."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedgan.config import federation
from fedgan.config.appbundle import default_run_config, fab_sha256, stage_app_dir, write_run_config
from fedgan.config.run import ConfigError, RunSettings
from fedgan.deploy import commands
from fedgan.errors import FedGanError
from fedgan.progress import ROUND_MARKER, VERDICT_MARKER, fit_progress, format_round


class OperatorError(FedGanError):
    """A command against the SuperLink failed; the message says why."""


def _env(flwr_home: Path | None) -> dict[str, str]:
    return commands.process_env({"FLWR_HOME": str(flwr_home)} if flwr_home else {})


def flwr(args: list[str], flwr_home: Path | None, timeout: float = 60.0) -> str:
    """Output of one `flwr` command; its own error message when it fails."""
    try:
        result = subprocess.run(
            [commands.venv_bin("flwr"), *args],
            capture_output=True,
            text=True,
            env=_env(flwr_home),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OperatorError(f"`flwr {args[0]}` got no answer within {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise OperatorError(f"`flwr {' '.join(args[:2])}` failed: {lines[-1] if lines else '?'}")
    return result.stdout


def _json(text: str, what: str) -> Any:
    start = text.find("{")
    try:
        return json.loads(text[start:])
    except ValueError:
        raise OperatorError(f"`flwr` returned no JSON for {what}") from None


def prepare(
    config_path: Path, run_dir: str | None = None, resume: str | None = None
) -> dict[str, Any]:
    """The full run config: defaults, then federation.yaml, then the flags;
    checked as the ServerApp will check it."""
    overrides = federation.load(config_path)
    if resume:
        overrides |= {"run-dir": resume, "resume": True}
    elif run_dir:
        overrides["run-dir"] = run_dir
    config = default_run_config() | overrides
    try:
        settings = RunSettings.from_run_config(config)
        if settings.model_init:
            # Read here too, so that a wrong path or shape fails before submitting.
            from fedgan.model_init import load_init

            load_init(Path(settings.model_init), settings.spec, classes=settings.classes)
    except ConfigError as exc:
        raise OperatorError(f"{config_path}: {exc}") from None
    return config


def submit(
    config: dict[str, Any],
    connection: str | None,
    flwr_home: Path | None,
    say: Callable[[str], None] = print,
    log_path: Path | None = None,
) -> int:
    """`flwr run --stream` with a config-only bundle; prints each round as the
    ServerApp reports it. Returns flwr's exit status."""
    rounds = int(config["num-server-rounds"])
    with tempfile.TemporaryDirectory(prefix="fedgan-run-") as tmp:
        app_dir = stage_app_dir(Path(tmp) / "app")
        run_config = write_run_config(Path(tmp) / "run-config.toml", config)
        say(
            f"submitting to {connection or 'the default SuperLink'}: {rounds} rounds; "
            "the app bundle carries configuration only (pyproject.toml, no code), "
            f"sha256 {fab_sha256(app_dir)}"
        )
        argv = commands.flwr_run_command(app_dir, connection, run_config)
        log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=_env(flwr_home),
            )
            assert proc.stdout is not None
            failed = False
            for line in proc.stdout:
                if log:
                    log.write(line)
                _follow(line, rounds, say)
                # The ServerApp's own verdict (flwr exits 0 whatever it was).
                failed = failed or f"fedgan.server: {VERDICT_MARKER}" in line
            code = proc.wait()
            return code if code != 0 or not failed else 1
        finally:
            if log:
                log.close()


# flwr's own lines worth an operator's eye: the run id, failures.
PASS_THROUGH = (" Successfully started run", " ❌", " ERROR ", "fedgan:", "Traceback")


def _follow(line: str, rounds: int, say: Callable[[str], None]) -> None:
    text = line.strip()
    if ROUND_MARKER in text:
        try:
            record = json.loads(text.split(ROUND_MARKER, 1)[1])
        except ValueError:
            return
        for out in format_round(record, rounds):
            say(out)
    elif (progress := fit_progress(text)) is not None:
        say(progress)
    elif any(mark in f" {text} " for mark in PASS_THROUGH):
        say(text)


def _conn(connection: str | None) -> list[str]:
    return [connection] if connection else []


def bundle_hash() -> str:
    """The SHA-256 of the config-only app bundle `submit` sends."""
    with tempfile.TemporaryDirectory(prefix="fedgan-fab-") as tmp:
        return fab_sha256(stage_app_dir(Path(tmp) / "app"))


def runs(connection: str | None, flwr_home: Path | None) -> list[dict[str, Any]]:
    out = flwr(["ls", *_conn(connection), "--format", "json"], flwr_home)
    return list(_json(out, "runs")["runs"])


def sites(connection: str | None, flwr_home: Path | None) -> list[dict[str, Any]]:
    """The SuperLink's nodes as `flwr supernode list` gives them, each with
    the ``name`` it was registered under (the site id) where one is known."""
    out = flwr(["supernode", "list", *_conn(connection), "--format", "json"], flwr_home)
    nodes = list(_json(out, "sites")["nodes"])
    names = node_names(connection, flwr_home)
    for node in nodes:
        name = names.get(str(node.get("node-id")))
        if name:
            node["name"] = name
    return nodes


def node_names(connection: str | None, flwr_home: Path | None) -> dict[str, str]:
    """node id -> the name given at `flwr supernode register --name` (our
    site ids). Flower 1.41's JSON listing leaves the name out, though the
    Control API returns it, so this asks the API through Flower's own client
    code and TLS settings. Names only make the listing readable: if this
    fails (another Flower, an unreachable SuperLink), the listing keeps its
    node ids and says nothing more."""
    previous = os.environ.get("FLWR_HOME")
    if flwr_home is not None:
        os.environ["FLWR_HOME"] = str(flwr_home)
    client = None
    try:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection
        from flwr.proto.control_pb2 import ListNodesRequest

        with contextlib.redirect_stdout(io.StringIO()):  # its connection banner
            client = init_http_client_from_connection(read_superlink_connection(connection))
            reply = client.ListNodes(ListNodesRequest())
        return {str(n.node_id): n.name for n in reply.nodes_info if n.name}
    except Exception:  # Flower's helpers raise their own kinds (typer.Exit, HTTP errors)
        return {}
    finally:
        if client is not None:
            client.close()
        if flwr_home is not None:
            if previous is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = previous


def stop(run_id: str, connection: str | None, flwr_home: Path | None) -> None:
    flwr(["stop", run_id, *_conn(connection)], flwr_home)
