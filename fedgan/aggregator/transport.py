"""How the aggregator reaches the sites: a request out, a reply back.

The round (`fedgan.aggregator.round`) is written against this small
interface rather than Flower's Grid, so a whole round, secure aggregation
and dropouts included, runs in a unit test over an in-memory transport. In
production `GridTransport` carries it over Flower's Grid, polling the
SuperLink at `fedgan.polling`'s interval (0.25 s by default) instead of
Flower's fixed 3 s: a secure round is three to five exchanges, and the
fixed poll alone cost up to 3 s each."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedgan import polling, timeline


@dataclass(frozen=True)
class Request:
    node: int
    kind: str  # Flower's message type: "train", "train.secagg_share", ...
    group: str  # the round (and stage) it belongs to
    content: RecordDict


@dataclass(frozen=True)
class Reply:
    node: int
    content: RecordDict | None  # None when the site answered with an error
    error: str = ""


class Transport(Protocol):
    def node_ids(self) -> list[int]:
        """The sites connected now."""
        ...

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]:
        """The replies that arrive within ``timeout`` seconds, errors included;
        a site that does not answer in time has no reply."""
        ...


@dataclass
class GridTransport:
    grid: Grid
    poll: float = field(default_factory=polling.seconds)

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]:
        messages = [
            Message(r.content, dst_node_id=r.node, message_type=r.kind, group_id=r.group)
            for r in requests
        ]
        kind = requests[0].kind if requests else ""
        group = requests[0].group if requests else ""
        timeline.mark("server.send", kind=kind, group=group, n=len(messages))
        pending = set(self.grid.push_messages(messages))
        timeline.mark("server.pushed", kind=kind, group=group)
        deadline = time.monotonic() + timeout
        replies: list[Reply] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            for m in got:
                timeline.mark("server.reply", kind=kind, group=group, node=m.metadata.src_node_id)
            replies.extend(_reply(m) for m in got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll)
        timeline.mark("server.done", kind=kind, group=group)
        return replies


def _reply(message: Message) -> Reply:
    node = message.metadata.src_node_id
    if message.has_error():
        return Reply(node, None, message.error.reason)
    return Reply(node, message.content)
