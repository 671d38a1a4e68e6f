"""A run at the aggregator, from its first round (or its checkpoint) to its
last, over a `Transport`; the ServerApp calls `run_federation`."""

from __future__ import annotations

import dataclasses
import logging
import time

from fedgan.aggregator.mechanisms import MeanEmbeddingFit, mechanism_for
from fedgan.aggregator.preview import Preview
from fedgan.aggregator.round import Federation, run_round
from fedgan.aggregator.run_store import RunOutputs
from fedgan.aggregator.transport import Transport
from fedgan.audit_log import AuditLog
from fedgan.config.run import ConfigError, RunSettings
from fedgan.gan.models import Discriminator, Generator, build
from fedgan.model_init import ModelInit
from fedgan.progress import VERDICT_MARKER

log = logging.getLogger("fedgan.server")

NODE_WAIT_SECONDS = 300.0


def run_federation(
    transport: Transport,
    settings: RunSettings,
    store: RunOutputs,
    audit: AuditLog,
    init: ModelInit | None = None,
) -> dict:
    """The rounds, from ``init`` (the run's pretrained `model_init`, loaded)
    or random weights; returns the run's summary for status.json (with
    ``stopped`` when no site would take part any more)."""
    gen, disc, first_round = start(settings, store, init)
    mechanism = mechanism_for(settings, store, audit)
    fed = Federation(transport, settings, store, audit, mechanism, gen, disc, Preview(settings))
    fed.init_sha256 = init.weights_sha256 if init else ""
    # Secure aggregation needs two sites at least: a sum of one is that update.
    wanted = max(settings.min_sites, 2 if settings.secagg.enabled else 1)
    if not (isinstance(mechanism, MeanEmbeddingFit) and mechanism.all_kept(first_round)):
        wait_for_sites(transport, wanted, NODE_WAIT_SECONDS)
    record = None
    for server_round in range(first_round, settings.rounds + 1):
        record = run_round(fed, server_round)
        stopped = fed.nobody_left()
        if stopped:
            return _failed(stopped)
    if not store.generator_path.exists():
        # Every round left the model as it started: there is nothing to share,
        # and a run that says "completed" would pass random weights for a model.
        why = record.skipped if record is not None and record.skipped else "no round ran"
        return _failed(f"no round produced a model (the last: {why})")
    return fed.summary()


def _failed(reason: str) -> dict:
    # Returned, not raised: Flower streams the ServerApp's last log lines to
    # the operator only when it ends normally; `fedgan run` reads this one.
    log.error("%s%s", VERDICT_MARKER, reason)
    return {"stopped": reason}


def wait_for_sites(transport: Transport, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = transport.node_ids()
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {wanted} sites connected within {timeout:.0f} s; "
                "check the sites' SuperNode and sidecar logs"
            )
        time.sleep(1.0)


def start(
    settings: RunSettings, store: RunOutputs, init: ModelInit | None = None
) -> tuple[Generator, Discriminator, int]:
    """The global model and the first round: fresh (``init``'s weights, or
    random ones from the run's seed), or from the checkpoint when resuming
    (or, stopped in the first round's fit, from its kept release sum). A run
    folder that holds either is never restarted from scratch over it."""
    gen, disc = build(settings.spec, seed=settings.train.seed)
    if init is not None:
        init.load_into(gen, disc)
    kept = store.kept_rounds()
    if not settings.resume:
        for held in (store.checkpoint_path, *map(store.release_path, kept)):
            if held.exists():
                raise ConfigError(
                    f"{held} exists; set resume = true to continue that run, "
                    "or choose a new run-dir"
                )
        return gen, disc, 1
    if not store.checkpoint_path.exists() and kept == [1]:
        # Stopped while fitting G to the first round's releases: G starts
        # afresh from the run's seed, as it did then.
        log.info("resuming %s at round 1, from its kept release", store.dir)
        return gen, disc, 1
    ckpt = store.load_checkpoint()
    if ckpt["spec"] != dataclasses.asdict(settings.spec):
        raise ConfigError(
            f"{store.checkpoint_path} was trained with {ckpt['spec']}; the run config asks for "
            f"{dataclasses.asdict(settings.spec)}"
        )
    gen.load_state_dict(ckpt["gen"])
    disc.load_state_dict(ckpt["disc"])
    fixed = store.restore_metrics(ckpt)
    if fixed:
        log.warning("resuming %s: %s", store.dir, fixed)
    log.info("resuming %s after round %d", store.dir, ckpt["round"])
    return gen, disc, int(ckpt["round"]) + 1
