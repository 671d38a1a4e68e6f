"""Tasks for the warm runtime's tests (`tests/unit/test_warm_runtime.py`):
run in a fork of the server, they act on their argv as a ClientApp task
would on its message."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def task() -> None:
    what = sys.argv[1]
    # What the task sees: the shim's environment, directory and streams.
    print(f"task {what} {os.environ.get('WARM_MARK')} {os.getcwd()}", flush=True)
    Path(os.environ["WARM_PIDFILE"]).write_text(str(os.getpid()))
    if what == "exit":
        raise SystemExit(int(sys.argv[2]))
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "sleep":
        time.sleep(60)
    if what == "raise":
        raise RuntimeError("the task failed")
