"""Flower's own SecAgg+ (legacy `SecAggPlusWorkflow` + `secaggplus_mod`),
driven in process over a fake Grid that hands each message straight to the
site's mod, for the comparison in `secagg.py`. Read-only use of Flower's
public pieces; never part of the tests."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.supercore.task_identity import TaskIdentity

# What a SuperLink-started ServerApp process would have set.
TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 0


class _FakeGrid:
    """Routes each message to the node's secaggplus_mod; counts the sites'
    CPU seconds and reply bytes apart from the server's."""

    def __init__(self, updates: dict[int, np.ndarray]) -> None:
        self.updates = updates
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in updates
        }
        self.client_cpu = 0.0
        self.copy_cpu = 0.0  # our fake transport's work, charged to nobody
        self.reply_bytes = 0
        self.run = type("Run", (), {"run_id": 1})()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.updates)

    def _fit(self, msg: Message, ctx: Context) -> Message:
        fitres = FitRes(
            Status(Code.OK, ""), ndarrays_to_parameters([self.updates[ctx.node_id]]), 100, {}
        )
        return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for msg in messages:
            # Each real message is serialized: the mod may not mutate the
            # workflow's shared content.
            start = time.process_time()
            msg = copy.deepcopy(msg)
            self.copy_cpu += time.process_time() - start
            start = time.process_time()
            reply = secaggplus_mod(msg, self.contexts[msg.metadata.dst_node_id], self._fit)
            self.client_cpu += time.process_time() - start
            for record in reply.content.config_records.values():
                for value in record.values():
                    if isinstance(value, bytes):
                        self.reply_bytes += len(value)
                    elif isinstance(value, list):
                        self.reply_bytes += sum(
                            len(v) if isinstance(v, bytes) else 8 for v in value
                        )
                    else:
                        self.reply_bytes += 8
            replies.append(reply)
        return replies


def secaggplus_round(n: int, length: int, bits: int) -> dict[str, float]:
    """One round over n sites of `length` float32 values: (server CPU s,
    client CPU s per site, reply bytes per value and site)."""
    rng = np.random.default_rng(0)
    updates = {node: rng.normal(0, 0.01, length).astype(np.float32) for node in range(1, n + 1)}
    grid = _FakeGrid(updates)
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base)
    for node in updates:
        context.client_manager.register(GridClientProxy(node, grid, 1))  # type: ignore[arg-type]
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(length, dtype=np.float32)])
    workflow = SecAggPlusWorkflow(
        num_shares=n,
        reconstruction_threshold=max(2, -(-2 * n // 3)),
        quantization_range=1 << bits,
        clipping_range=0.05,
    )
    start = time.process_time()
    workflow(grid, context)  # type: ignore[arg-type]
    total = time.process_time() - start
    return {
        "server": total - grid.client_cpu - grid.copy_cpu,
        "client": grid.client_cpu / n,
        "bytes_per_param": grid.reply_bytes / n / length,
    }
