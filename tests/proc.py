"""Finding processes the tests started, by process group (the launcher gives
every managed process its own group, so children are found too)."""

from __future__ import annotations

import os
from pathlib import Path


def pids_in_groups(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes in any of the given process groups."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            found.append(int(entry))
    return found
