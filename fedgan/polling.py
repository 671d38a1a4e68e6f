"""How often the processes of a round look for work while they wait.

Flower's SuperExec asks its SuperNode (or SuperLink) for a task to launch
once a second by default; our ServerApp asked the SuperLink for replies every
half second. Both read one setting, Flower's own
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, which the launchers set for every
process they start (`fedgan.deploy.commands`) and an operator or a hospital
can change in ``.env`` (``POLL_SECONDS``). Measured at 3 sites
(bench/RESULTS.md), 0.1, 0.25 and 1 s give the same round time: what paces a
round is the SuperNode's own 3 s sleep between polls of the SuperLink, fixed
in Flower 1.41, which the next message waits out whatever we poll at. 0.25 s
keeps the launch close to the pull for a few local RPCs a second per node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_SECONDS = 0.25
# Flower's SuperExec refuses values outside these bounds at start.
LOWEST, HIGHEST = 0.01, 60.0


def seconds(env: Mapping[str, str] | None = None) -> float:
    """The interval set in ``env`` (the process's own by default), else the
    default; a value Flower would refuse raises ValueError in one line that
    names the variable and the fix."""
    raw = (os.environ if env is None else env).get(ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and LOWEST <= value <= HIGHEST):
        raise ValueError(
            f"{ENV}={raw!r} (POLL_SECONDS in .env): set a number of seconds between "
            f"{LOWEST} and {HIGHEST:.0f}, or leave it unset for {DEFAULT_SECONDS}"
        )
    return value
