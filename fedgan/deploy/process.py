"""Start real processes, wait until they serve, and always stop them.

Each process gets its own session (process group) so that stopping it also
stops what it spawned (a SuperNode's ClientApp). Some children leave the
group: the SuperLink starts its SuperExec in a session of its own, and the
SuperExec starts the ServerApp, which then outlived a stopped demo by 20 s.
So stopping also finds every descendant from /proc before the parents go
(after that they belong to init) and signals each. Stopping is SIGTERM, a
grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedgan.errors import FedGanError


class ProcessFailed(FedGanError, RuntimeError):
    """A managed process did not start or died; names it and quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class ManagedProcess:
    name: str
    role: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    address: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def failure(self, what: str) -> ProcessFailed:
        code = self.popen.poll()
        status = f"exited with code {code}" if code is not None else "is still running"
        return ProcessFailed(
            f"{self.name} ({self.role}) {what}; it {status}. Last lines of {self.log}:\n"
            f"{tail(self.log)}"
        )

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.pid,
            "address": self.address,
            "files": self.files,
            "log": str(self.log),
            "argv": self.argv,
        }


class ProcessGroup:
    """The processes of one local deployment; a context manager that stops
    them all on exit, whatever the exit."""

    def __init__(self, log_dir: Path, stop_grace: float = 10.0) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop_grace = stop_grace
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        role: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: Path | None = None,
        address: str | None = None,
        files: dict[str, str] | None = None,
    ) -> ManagedProcess:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = ManagedProcess(name, role, argv, log, popen, address, files or {})
        self.processes.append(proc)
        return proc

    def wait_until(
        self,
        proc: ManagedProcess,
        ready: Callable[[], bool],
        *,
        timeout: float = 60.0,
        what: str = "did not become ready",
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise proc.failure("failed to start")
            with contextlib.suppress(OSError):
                if ready():
                    return
            time.sleep(0.2)
        raise proc.failure(f"{what} within {timeout:.0f} s")

    def check_alive(self) -> None:
        for proc in self.processes:
            if not proc.alive():
                raise proc.failure("stopped unexpectedly")

    def stop_all(self) -> None:
        roots = {proc.pid for proc in self.processes}
        family = descendants(roots)
        for proc in reversed(self.processes):
            _signal_group(proc, signal.SIGTERM)
        _signal_pids(family, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for proc in reversed(self.processes):
            remaining = max(0.1, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=remaining)
        while family and time.monotonic() < deadline:
            family = {pid for pid in family if _alive(pid)}
            time.sleep(0.1)
        family |= descendants(roots | family)  # spawned while stopping
        for proc in self.processes:
            # Children (ServerApp, ClientApp) may outlive their parent: the
            # group kill reaches them even after the leader exited.
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        _signal_pids(family, signal.SIGKILL)
        # SIGKILL is delivered at once but a process takes a moment to die:
        # return only when none is left running (zombies wait for a reaper).
        groups = {proc.pid for proc in self.processes}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            state != "Z" and (pid in family or pgid in groups)
            for pid, (state, _, pgid) in process_table().items()
        ):
            time.sleep(0.05)
        self.processes.clear()


def process_table() -> dict[int, tuple[str, int, int]]:
    """Every process's (state, parent pid, process group), from Linux's
    /proc; empty elsewhere."""
    table: dict[int, tuple[str, int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            # The command name may hold spaces or parentheses: split after it.
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def descendants(roots: set[int]) -> set[int]:
    """Every process below ``roots``, whatever its session (Linux's /proc;
    elsewhere nothing, and the group kill alone applies)."""
    parent = {pid: ppid for pid, (_, ppid, _) in process_table().items()}
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        children = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def signal_tree(root: int, sig: signal.Signals) -> None:
    """``sig`` to ``root`` and every process below it, whatever its session
    (a container's entrypoint passes the engine's SIGTERM on this way, so the
    ServerApp under the SuperExec hears it too)."""
    _signal_pids({root} | descendants({root}), sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(proc: ManagedProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _signal_pids(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def tcp_open(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1.0):
        return True


def https_status(host: str, port: int, path: str, ca: Path, server_name: str) -> int:
    """Status of a GET over verified TLS (no client certificate)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, port), timeout=2.0) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
        )
        head = tls.recv(64).decode("latin-1")
    return int(head.split(" ", 2)[1])
