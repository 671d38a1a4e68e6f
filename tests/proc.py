"""Finding processes the tests started, by process group (the launcher gives
every managed process its own group, so children are found too)."""

from __future__ import annotations

from fedgan.deploy.process import process_table


def pids_in_groups(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes in any of the given process groups."""
    return [
        pid for pid, (state, _, pgid) in process_table().items() if state != "Z" and pgid in pgids
    ]
