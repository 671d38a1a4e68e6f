"""Fault injection for the dropout tests, off unless asked for.

``FEDGAN_FAULT=<stage>`` in a SuperNode's environment makes the site's
ClientApp process die by SIGKILL (as the kernel's OOM killer or a crash
would) when the stage begins at the site; the site sends no reply for it.
Stages: secagg_advertise, secagg_share, train, secagg_confirm, secagg_unmask. A
site's operator sets its own environment; nothing the aggregator sends can switch this on."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("fedgan.site")
STAGES = ("secagg_advertise", "secagg_share", "train", "secagg_confirm", "secagg_unmask")


def crash_if_requested(stage: str) -> None:
    wanted = os.environ.get("FEDGAN_FAULT", "")
    if wanted and wanted not in STAGES:
        raise ValueError(f"FEDGAN_FAULT={wanted!r}: use one of {', '.join(STAGES)}")
    if wanted == stage:
        log.warning("FEDGAN_FAULT=%s: this ClientApp dies now (SIGKILL)", stage)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
