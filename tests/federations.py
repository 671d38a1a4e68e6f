"""One factory for the small real federations the integration tests run,
so each test states only what it changes from the common, fast setup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedgan.demo import DemoOptions

# Two sites, 16 px, a few images and steps: seconds of training per round.
SMALL = {"sites": 2, "rounds": 1, "image_size": 16, "images_per_site": 16, "local_steps": 3}
# A batch below every small silo's size: a site refuses a DP round that
# would read its whole silo at every step (sampling rate 1).
SMALL_CONFIG = {"batch-size": 4}


def small_federation(out_root: Path, run_id: str, **changes: Any) -> DemoOptions:
    """`DemoOptions` for a small federation in ``out_root/run_id``;
    ``changes`` override the defaults (`extra_config` adds run-config keys)."""
    changes["extra_config"] = SMALL_CONFIG | changes.get("extra_config", {})
    return DemoOptions(**(SMALL | {"out_root": out_root, "run_id": run_id} | changes))
