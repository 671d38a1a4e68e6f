"""The process supervisor: stopping grandchildren, naming a failed process with its log (real
processes)."""

import os
import sys
import time

import pytest

from fedgan.deploy.process import ProcessFailed, ProcessGroup, process_table
from tests.proc import pids_in_groups


def test_stop_all_also_stops_grandchildren(tmp_path):
    group = ProcessGroup(tmp_path, stop_grace=2)
    # A parent that ignores SIGTERM and leaves a child behind.
    script = (
        "import subprocess, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '300'])\n"
        "time.sleep(300)\n"
    )
    proc = group.start("stubborn", "test", [sys.executable, "-c", script], env=dict(os.environ))
    # Wait for the grandchild: on a loaded machine Python starts slowly.
    deadline = time.monotonic() + 15
    while len(pids_in_groups({proc.pid})) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids_in_groups({proc.pid})) == 2
    group.stop_all()
    left = pids_in_groups({proc.pid})
    assert left == [], {pid: process_table().get(pid) for pid in left}


def test_stop_all_stops_a_grandchild_in_a_session_of_its_own(tmp_path):
    """Issue 33: the SuperLink starts its SuperExec with start_new_session,
    and the SuperExec the ServerApp, which a group kill cannot reach: it
    outlived a stopped demo by 20 s."""
    group = ProcessGroup(tmp_path, stop_grace=2)
    pidfile = tmp_path / "escaped.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    group.start("superlink-like", "test", [sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.monotonic() + 15
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    escaped = int(pidfile.read_text())
    assert os.getpgid(escaped) == escaped  # its own group: killpg of the parent misses it
    group.stop_all()
    time.sleep(0.2)
    # Gone, or a zombie its new parent has not reaped yet.
    assert process_table().get(escaped, ("gone",))[0] in ("gone", "Z")


def test_failure_names_the_process_and_quotes_its_log(tmp_path):
    with ProcessGroup(tmp_path) as group:
        proc = group.start(
            "broken",
            "test role",
            [sys.executable, "-c", "print('bad key file'); raise SystemExit(3)"],
            env=dict(os.environ),
        )
        with pytest.raises(ProcessFailed) as info:
            group.wait_until(proc, lambda: False, timeout=10)
    message = str(info.value)
    assert "broken (test role)" in message and "code 3" in message and "bad key file" in message
