"""The site's warm ClientApp runtime (`fedgan.site.warm_runtime`) with real
processes: a server, and shims that hand it their task. The SuperNode must
see the same process life as without it: the task's output on the shim's
streams, its exit code or signal, SIGTERM passed on, and no task left when
the shim is killed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgan.deploy.process import process_table

ROOT = Path(__file__).resolve().parents[2]
SHIM = (
    "import sys; from fedgan.site import warm_runtime as w; "
    "path = sys.argv[1]; sys.argv = sys.argv[1:]; s = w.run_through(path); "
    "print('no server', flush=True) if s is None else w.exit_as(s)"
)


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "warm.sock"
    code = (
        "import sys; from pathlib import Path; from fedgan.site import warm_runtime as w; "
        "from tests.warm_tasks import task; w.serve(Path(sys.argv[1]), load=False, task=task)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the server did not listen"
    yield path
    proc.kill()
    proc.wait()


def _shim(sock: Path, tmp_path: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "WARM_MARK": "m-42", "WARM_PIDFILE": str(tmp_path / "task.pid")}
    return subprocess.Popen(
        [sys.executable, "-c", SHIM, str(sock), *argv],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _alive(pid: int) -> bool:
    return process_table().get(pid, ("Z",))[0] != "Z"


def test_the_task_runs_with_the_shims_streams_env_dir_and_exit_code(server, tmp_path):
    shim = _shim(server, tmp_path, "exit", "3")
    out, _ = shim.communicate(timeout=30)
    assert shim.returncode == 3
    assert out.strip() == f"task exit m-42 {tmp_path}"
    # The task ran in a fork of the server, not in the shim.
    assert int((tmp_path / "task.pid").read_text()) != shim.pid
    assert stat.S_IMODE(server.stat().st_mode) == 0o600


def test_a_task_killed_or_failing_ends_its_shim_the_same_way(server, tmp_path):
    killed = _shim(server, tmp_path, "kill")
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    failed = _shim(server, tmp_path, "raise")
    _, err = failed.communicate(timeout=30)
    assert failed.returncode == 1 and "the task failed" in err


def test_sigterm_reaches_the_task_and_a_killed_shim_takes_its_task(server, tmp_path):
    pidfile = tmp_path / "task.pid"
    for sig, expected in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        pidfile.unlink(missing_ok=True)
        shim = _shim(server, tmp_path, "sleep")
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        task = int(pidfile.read_text())
        shim.send_signal(sig)
        shim.communicate(timeout=30)
        assert shim.returncode == expected
        deadline = time.monotonic() + 5
        while _alive(task) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(task), f"the task outlived a shim ended by {sig.name}"


def test_without_a_server_the_shim_runs_the_task_itself(tmp_path):
    shim = _shim(tmp_path / "absent.sock", tmp_path, "exit", "0")
    out, _ = shim.communicate(timeout=30)
    assert shim.returncode == 0 and out.strip() == "no server"
