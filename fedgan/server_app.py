"""The aggregator's ServerApp: rounds of FedAvg over the sites' G and D.

Thin on purpose: it sends the global model, collects replies, and hands them to
the update path (`fedgan.update`) and the run outputs (`fedgan.outputs`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedgan import wire
from fedgan.gan.models import build
from fedgan.outputs import RunOutputs
from fedgan.run_config import ConfigError, RunSettings
from fedgan.samples import grid_png
from fedgan.update import SiteUpdate, apply_delta, weighted_mean
from fedgan.weights import get_arrays, set_arrays

log = logging.getLogger("fedgan.server")
app = ServerApp()

SAMPLE_GRID = 64
NODE_WAIT_SECONDS = 300.0


def _wait_for_sites(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {wanted} sites connected within {timeout:.0f} s; "
                "check the sites' SuperNode and sidecar logs"
            )
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = RunSettings.from_run_config(context.run_config)
    except ConfigError as exc:
        raise SystemExit(f"fedgan: {exc}") from None
    run_dir = Path(settings.run_dir or Path.cwd() / "runs" / f"flower-{context.run_id}")
    out = RunOutputs(run_dir)
    out.write_status("running", flower_run_id=context.run_id, rounds=settings.rounds)
    try:
        _run(grid, settings, out)
    except BaseException as exc:
        out.write_status("failed", flower_run_id=context.run_id, reason=str(exc))
        raise
    out.write_status("completed", flower_run_id=context.run_id, rounds=settings.rounds)


def _run(grid: Grid, settings: RunSettings, out: RunOutputs) -> None:
    gen, disc = build(settings.spec, seed=settings.train.seed)
    fixed_z = torch.randn(
        SAMPLE_GRID, settings.spec.latent_dim, generator=torch.Generator().manual_seed(1234)
    )
    _wait_for_sites(grid, settings.min_sites, NODE_WAIT_SECONDS)
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        nodes = sorted(grid.get_node_ids())
        global_gen, global_disc = get_arrays(gen), get_arrays(disc)
        config = settings.round_config(server_round)
        messages = [
            Message(
                wire.train_request(global_gen, global_disc, config),
                dst_node_id=node,
                message_type="train",
                group_id=str(server_round),
            )
            for node in nodes
        ]
        updates: list[SiteUpdate] = []
        sites: list[str] = []
        losses: dict[str, list[float]] = {"g-loss": [], "d-loss": []}
        failures: list[str] = []
        for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
            if reply.has_error():
                failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            update, site_id, metrics = wire.read_train_reply(reply.content)
            updates.append(update)
            sites.append(site_id)
            for key in losses:
                losses[key].append(metrics.get(key, float("nan")))
        for failure in failures:
            log.warning("round %d: %s", server_round, failure)
        record: dict = {
            "round": server_round,
            "sites": sorted(sites),
            "sites_sampled": len(nodes),
            "sites_failed": len(nodes) - len(updates),
        }
        if updates:
            mean_gen, mean_disc = weighted_mean(updates)
            set_arrays(gen, apply_delta(global_gen, mean_gen))
            set_arrays(disc, apply_delta(global_disc, mean_disc))
            out.save_generator(gen, server_round)
            gen.eval()
            with torch.no_grad():
                out.write_samples(server_round, grid_png(gen(fixed_z)))
            weights = [u.weight for u in updates]
            total = sum(weights)
            record["examples"] = total
            record["g_loss"] = (
                sum(w * g for w, g in zip(weights, losses["g-loss"], strict=True)) / total
            )
            record["d_loss"] = (
                sum(w * d for w, d in zip(weights, losses["d-loss"], strict=True)) / total
            )
            if settings.dump_updates:
                out.dump_arrays(
                    server_round, "global_before", {"gen": global_gen, "disc": global_disc}
                )
                out.dump_arrays(
                    server_round, "global_after", {"gen": get_arrays(gen), "disc": get_arrays(disc)}
                )
        else:
            record["skipped"] = "no site replied; the global model is unchanged"
        record["seconds"] = round(time.perf_counter() - started, 3)
        out.append_metrics(record)
        log.info("round %d/%d done: %s", server_round, settings.rounds, record)
