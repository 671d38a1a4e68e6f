"""A warm ClientApp runtime: one long-lived process per site that imports
Flower's runtime, FedGAN's ClientApp, torch and Opacus once, and forks a
child for every task the SuperNode starts.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every
message, five a secure round, and each paid about 2 s to start Python,
Flower and FedGAN, plus 3-4 s to import torch where the stage needs it
(`bench/round_overhead.py`). Flower offers no way to keep a ClientApp
process for a run. So the ``flwr-clientapp`` the SuperNode starts (our shim,
`fedgan.site.runtime`) stays a small process that hands its arguments,
environment and standard streams over a Unix socket to this server, which
forks a worker already holding every import. The worker runs exactly what
the shim would have run (the approval check, then Flower's runtime); the
shim waits, forwards SIGTERM and SIGINT to it, and exits as it did, so the
SuperNode sees the same process life as before.

The socket is in the site's work dir, mode 0600, and a connection from
another uid is closed unanswered. Without the server (not started, or gone)
the shim runs the task itself, as before: slower, never different.

Each request is one handler child of the server (single-threaded, so that
forking is safe), which forks the worker, reports its pid and then its wait
status to the shim, and exits."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from fedgan import timeline

ENV = "FEDGAN_CLIENTAPP_SERVER"
_MAX_REQUEST = 1 << 20


def preload() -> None:
    """Everything a task imports, imported once in the server."""
    import flwr.supernode.cli.flwr_clientapp
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import fedgan.site.client_app
    import fedgan.site.round  # torch, Opacus, the trainer
    import fedgan.site.runtime  # noqa: F401


def _run_task() -> None:
    from fedgan.site import runtime

    runtime.run_in_process()


def serve(path: Path, *, load: bool = True, task: Callable[[], None] = _run_task) -> None:
    """Listen on ``path`` until the process that started this one is gone;
    each request runs ``task`` in a fork (the tests give another)."""
    if load:
        preload()
    path = Path(path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(64)
    listener.settimeout(1.0)
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handler children reap themselves
    sys.stdout.flush()
    sys.stderr.flush()
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        if not _same_user(conn):
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _handle(conn, task)  # never returns
        conn.close()
    path.unlink(missing_ok=True)


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    uid = int.from_bytes(creds[4:8], sys.byteorder)
    return uid == os.getuid()


def _handle(conn: socket.socket, task: Callable[[], None]) -> None:
    try:
        data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
        request = json.loads(data)
        worker = os.fork()
        if worker == 0:
            conn.close()
            _work(request, fds, task)  # never returns
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": worker}).encode() + b"\n")
        status = _wait(worker, conn)
        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
    finally:
        # The shim learns the task's end from the status line, or from the
        # connection closing without one; this process's own code is unused.
        os._exit(0)


def _wait(worker: int, conn: socket.socket) -> int:
    """The worker's wait status. If the shim goes first (the SuperNode
    killed it), the worker is killed too: it must not outlive the process
    the SuperNode watches."""
    while True:
        pid, status = os.waitpid(worker, os.WNOHANG)
        if pid:
            return status
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1):
            os.kill(worker, signal.SIGKILL)
            return os.waitpid(worker, 0)[1]


def _work(request: dict, fds: list[int], task: Callable[[], None]) -> None:
    """The task, in a fork that holds every import: the shim's streams,
    directory, environment and arguments, then the runtime the shim would
    have run."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _reseed()
        # The timeline's view of this task (`bench/round_overhead.py`): it
        # started at the fork, with every import already done.
        timeline.mark("clientapp.loading", started=timeline.process_started())
        timeline.mark("clientapp.loaded")
        task()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reseed() -> None:
    """A fork shares its parent's generator states: give this task its own.
    (Keys, masks and DP noise never use these; they draw from the OS.)"""
    import random

    random.seed(os.urandom(32))
    if (np := sys.modules.get("numpy")) is not None:
        np.random.seed(int.from_bytes(os.urandom(4), "little"))
    if (torch := sys.modules.get("torch")) is not None:
        torch.seed()


def run_through(path: str) -> int | None:
    """In the shim: have the server run this task, forward SIGTERM/SIGINT to
    it, and return its wait status; None when no server answers (the shim
    then runs the task itself)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = {"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    except OSError:
        conn.close()
        return None
    lines = conn.makefile("rb")
    first = lines.readline()
    if not first:
        return None  # the server closed without starting the task
    worker = int(json.loads(first)["pid"])

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    last = lines.readline()
    if not last:
        return 1 << 8  # the handler died: report a failure, never success
    return int(json.loads(last)["status"])


def exit_as(status: int) -> None:
    """Leave the way the worker did: its exit code, or its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    raise SystemExit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
