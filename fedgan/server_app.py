"""The aggregator's ServerApp: rounds of FedAvg over the sites' G and D, or,
in a mean-embedding run, one round of the sites' releases and G fitted to them.

Thin on purpose: it sends the global model, collects replies, and hands them to
the update path (`fedgan.update`) and the run outputs (`fedgan.outputs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedgan import wire
from fedgan.approval import parse_refusal
from fedgan.atomic import write_text_atomic
from fedgan.attributes import parse as parse_attributes
from fedgan.attributes import sample as sample_attributes
from fedgan.audit_log import AuditLog, record_round
from fedgan.gan.embedding_fit import fit_generator
from fedgan.gan.models import Discriminator, Generator, build, recalibrate_batchnorm
from fedgan.messaging import exchange
from fedgan.outputs import KeptRelease, RunOutputs
from fedgan.privacy.mean_embedding import FeatureMap, Target, class_noise_figures
from fedgan.progress import FIT_MARKER, ROUND_MARKER
from fedgan.run_config import ConfigError, RunSettings
from fedgan.samples import grid_png
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.messages import Advertisement
from fedgan.secure_round import SecureRound, split_like
from fedgan.update import Arrays, SiteUpdate, apply_delta, weighted_mean
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


def _log_to_stream() -> None:
    """Our log lines into the ServerApp's output, which Flower streams to
    `flwr run --stream` (it swaps sys.stdout for its buffer at start, so
    the handler is made here, not at import)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stream()
    try:
        settings = RunSettings.from_run_config(context.run_config)
    except ConfigError as exc:
        raise SystemExit(f"fedgan: {exc}") from None
    run_dir = Path(settings.run_dir or Path.cwd() / "runs" / f"flower-{context.run_id}")
    out = RunOutputs(run_dir)
    # One audit log for every run at this aggregator, beside the run folders.
    audit = AuditLog(out.dir.parent / "audit.jsonl")
    run = out.dir.name
    out.write_status("running", flower_run_id=context.run_id, rounds=settings.rounds)
    # What `fedgan evaluate` needs to draw like the run (class names, attributes).
    write_text_atomic(
        out.dir / "run-config.json", json.dumps(dict(context.run_config), indent=1, sort_keys=True)
    )
    audit.append(
        "run_started",
        run=run,
        flower_run_id=str(context.run_id),
        rounds=settings.rounds,
        resume=settings.resume,
        dp=settings.privacy.enabled,
        secure_aggregation=settings.secagg.enabled,
    )
    try:
        summary = _run(grid, settings, out, audit)
    except BaseException as exc:
        out.write_status("failed", flower_run_id=context.run_id, reason=str(exc))
        audit.append("run_failed", run=run, reason=str(exc) or type(exc).__name__)
        raise
    if "stopped" in summary:
        out.write_status("failed", flower_run_id=context.run_id, reason=summary["stopped"])
        audit.append("run_failed", run=run, reason=summary["stopped"])
        return
    out.write_status("completed", flower_run_id=context.run_id, rounds=settings.rounds, **summary)
    audit.append("run_completed", run=run, rounds=settings.rounds)


def _start(settings: RunSettings, out: RunOutputs) -> tuple[Generator, Discriminator, int]:
    """The global model and the first round: fresh, or from the checkpoint
    when resuming (or, stopped in the first round's fit, from its kept
    release sum). A run folder that holds either is never restarted from
    scratch over it."""
    gen, disc = build(settings.spec, seed=settings.train.seed)
    kept = out.kept_rounds()
    if not settings.resume:
        for held in (out.checkpoint_path, *map(out.release_path, kept)):
            if held.exists():
                raise ConfigError(
                    f"{held} exists; set resume = true to continue that run, "
                    "or choose a new run-dir"
                )
        return gen, disc, 1
    if not out.checkpoint_path.exists() and kept == [1]:
        # Stopped while fitting G to the first round's releases: G starts
        # afresh from the run's seed, as it did then.
        log.info("resuming %s at round 1, from its kept release", out.dir)
        return gen, disc, 1
    ckpt = out.load_checkpoint()
    if ckpt["spec"] != dataclasses.asdict(settings.spec):
        raise ConfigError(
            f"{out.checkpoint_path} was trained with {ckpt['spec']}; the run config asks for "
            f"{dataclasses.asdict(settings.spec)}"
        )
    gen.load_state_dict(ckpt["gen"])
    disc.load_state_dict(ckpt["disc"])
    log.info("resuming %s after round %d", out.dir, ckpt["round"])
    return gen, disc, int(ckpt["round"]) + 1


def _sample(nodes: list[int], fraction: float, seed: int, server_round: int) -> list[int]:
    """ceil(fraction × available) sites, reproducibly per round."""
    k = max(1, math.ceil(fraction * len(nodes)))
    if k >= len(nodes):
        return nodes
    return sorted(random.Random(f"{seed}-{server_round}").sample(nodes, k))


def _secure_round(
    grid: Grid,
    settings: RunSettings,
    config: dict,
    nodes: list[int],
    length: int,
) -> tuple[SecureRound | None, str]:
    """(the round's secure aggregation of ``length`` values per site, or None
    when off; why the round cannot run securely, or "")."""
    if not settings.secagg.enabled:
        return None, ""
    try:
        params = SecAggParams.for_round(
            str(config["run-name"]),
            int(config["round"]),
            len(nodes),
            bits=settings.secagg.bits,
            value_range=settings.secagg_range(length),
            length=length,
            threshold=settings.secagg.threshold,
        )
    except SecAggError as exc:
        return None, f"secure aggregation cannot run this round: {exc}; the model is unchanged"
    return SecureRound(grid, params, settings.secagg.stage_timeout), ""


def _feature_map(settings: RunSettings) -> FeatureMap:
    spec = settings.spec
    return FeatureMap(
        pixels=spec.channels * spec.image_size**2,
        features=settings.privacy.embedding_features,
        length_scale=settings.privacy.embedding_length_scale,
        seed=settings.train.seed,
    )


def _fit_to_releases(
    gen: Generator,
    phi: FeatureMap,
    mean: np.ndarray,
    examples: float,
    settings: RunSettings,
    out: RunOutputs,
    server_round: int,
) -> dict:
    """Fit G to the sites' releases (their sum over their noisy image counts, as the
    aggregate comes). Post-processing of DP releases: it spends no budget.
    Its state is saved at every tenth of the fit, so a resumed run goes on
    from there. Returns what metrics.jsonl records of it."""
    target = Target.from_sum(mean, min_count=1.0 / max(examples, 1.0))
    steps = settings.privacy.embedding_fit_steps
    digest = phi.digest()
    resume, unusable = out.load_fit_state(server_round, digest)
    if unusable:
        log.warning(
            "round %d: %s; the fit starts again from its first step", server_round, unusable
        )
    elif resume is not None:
        log.info("round %d: the fit goes on from step %d", server_round, resume.step)

    def progress(step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 10) == 0:
            log.info("%s: step %d/%d, loss %.5f", FIT_MARKER, step, total, loss)

    fit = fit_generator(
        gen,
        phi,
        target,
        steps=steps,
        lr=settings.privacy.embedding_fit_lr,
        seed=settings.train.seed,
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=progress,
        resume=resume,
        save=lambda state: out.save_fit_state(server_round, state, digest),
        save_every=max(1, steps // 10),
    )
    record = {
        "mechanism": "mean-embedding",
        "g_loss": fit.loss,
        "fit_loss_first": fit.first_loss,
        "fit_steps": fit.steps,
        "fit_seconds": round(fit.seconds, 3),
    }
    if fit.resumed_at:
        record["fit_resumed_at"] = fit.resumed_at
    return record


def _class_figures(
    mean: np.ndarray, examples: float, received: list, phi: FeatureMap, settings: RunSettings
) -> dict:
    """Each class's noisy image count in the sum and its noise figure, for
    metrics.jsonl and the round line: a rare class's row is mostly noise."""
    counts = mean[:, -1] * examples
    sigmas = [m["noise-multiplier"] for _, _, m in received if "noise-multiplier" in m]
    names = settings.classes or ("all",)
    figures = class_noise_figures(counts, sigmas, phi.width)
    return {
        "class_counts": {c: round(float(n), 1) for c, n in zip(names, counts, strict=True)},
        "class_noise_figure": {c: float(f) for c, f in zip(names, figures, strict=True)},
    }


def _run(grid: Grid, settings: RunSettings, out: RunOutputs, audit: AuditLog) -> dict:
    """The rounds; returns the run's summary for status.json."""
    gen, disc, first_round = _start(settings, out)
    fixed_z = torch.randn(
        SAMPLE_GRID, settings.spec.latent_dim, generator=torch.Generator().manual_seed(1234)
    )
    # Conditional runs: each row of the 8x8 grid is one class, cycling.
    classes = settings.spec.num_classes
    fixed_y = torch.arange(SAMPLE_GRID) // 8 % classes if classes else None
    # Attribute-conditioned runs: a fixed draw from the declared ranges.
    attrs = parse_attributes(settings.attributes)
    fixed_a = (
        sample_attributes(attrs, SAMPLE_GRID, torch.Generator().manual_seed(4321))
        if attrs
        else None
    )

    def g_inputs(n: int, rng: torch.Generator) -> tuple:
        """Random inputs for G, drawn as the sites draw them for fakes."""
        z = torch.randn(n, settings.spec.latent_dim, generator=rng)
        y = torch.randint(0, classes, (n,), generator=rng) if classes else None
        return z, y, sample_attributes(attrs, n, rng) if attrs else None

    # A mean-embedding run: the sites' random features, and the shape of
    # what each sends instead of a model update.
    phi = _feature_map(settings) if settings.privacy.mean_embedding else None
    release_shape = (max(classes, 1), phi.width + 1) if phi else (0, 0)
    # Secure aggregation needs two sites at least: a sum of one is that update.
    wanted = max(settings.min_sites, 2 if settings.secagg.enabled else 1)
    if not (phi and set(range(first_round, settings.rounds + 1)) <= set(out.kept_rounds())):
        # (A resume whose every round is kept asks no site anything.)
        _wait_for_sites(grid, wanted, NODE_WAIT_SECONDS)
    exhausted: dict[int, str] = {}  # node id -> site id, left out for the rest of the run
    # node id -> (site id, reason): sites that refused the app bundle or the
    # run's settings (fedgan.approval); left out for the rest of the run too.
    declined: dict[int, tuple[str, str]] = {}
    seen: set[str] = set()  # sites that have been in an aggregate (audit: joined)
    clipped: dict[str, list[bool]] = {}
    for server_round in range(first_round, settings.rounds + 1):
        started = time.perf_counter()
        available = [
            n for n in sorted(grid.get_node_ids()) if n not in exhausted and n not in declined
        ]
        nodes = _sample(available, settings.fraction_sites, settings.train.seed, server_round)
        global_gen, global_disc = get_arrays(gen), get_arrays(disc)
        config = settings.round_config(server_round)
        kept = None
        if phi is not None:
            config["embedding-digest"] = phi.digest()
            kept = out.kept_release(server_round, phi.digest(), release_shape)
            if kept is not None:
                log.info(
                    "round %d: the sites' releases were summed before the aggregator stopped; "
                    "fitting G to that kept sum (%s), without asking the sites again",
                    server_round,
                    out.release_path(server_round).name,
                )
                audit.append("release_reused", run=out.dir.name, round=server_round)
        # What each site sends: its update of G and D, or its release.
        length = (
            release_shape[0] * release_shape[1]
            if phi
            else sum(a.size for a in (*global_gen, *global_disc))
        )
        secure, setup_error = (
            (None, "") if kept else _secure_round(grid, settings, config, nodes, length)
        )
        messages = [
            Message(
                wire.train_request(
                    [] if phi else global_gen,
                    [] if phi else global_disc,
                    config,
                    secure.setup_record() if secure else None,
                ),
                dst_node_id=node,
                message_type="train",
                group_id=str(server_round),
            )
            for node in (nodes if not setup_error and kept is None else [])
        ]
        received: list[tuple[str, float, dict[str, float]]] = []  # site, weight, metrics
        updates: list[SiteUpdate] = []
        ads: dict[int, Advertisement] = {}
        refused: dict[str, dict[str, float]] = {}
        declined_now: dict[str, str] = {}
        failures: list[str] = []
        for reply in exchange(grid, messages, settings.round_timeout) if messages else []:
            if reply.has_error():
                site_refusal = parse_refusal(reply.error.reason)
                if site_refusal is None:
                    failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                    continue
                declined[reply.metadata.src_node_id] = site_refusal
                declined_now[site_refusal[0]] = site_refusal[1]
                log.warning(
                    "round %d: site %s refused: %s; left out of later rounds",
                    server_round,
                    *site_refusal,
                )
                continue
            if secure:
                update, site_id, metrics = None, *wire.read_train_reply_metrics(reply.content)
            else:
                update, site_id, metrics = wire.read_train_reply(reply.content)
            if metrics.get("budget-exhausted"):
                exhausted[reply.metadata.src_node_id] = site_id
                refused[site_id] = metrics
                log.warning(
                    "round %d: site %s refused: budget exhausted (ε %.3f spent, %.3f after, "
                    "budget %.3f); left out of later rounds",
                    server_round,
                    site_id,
                    metrics["epsilon"],
                    metrics["epsilon-next"],
                    metrics["epsilon-budget"],
                )
                continue
            if secure:
                try:
                    ads[reply.metadata.src_node_id] = wire.read_advertisement(reply.content)
                except SecAggError as exc:
                    failures.append(f"site {site_id}: {exc}")
                    continue
                weight = metrics.pop("num-examples")
            else:
                assert update is not None
                if phi is not None and [a.shape for a in update.gen + update.disc] != [
                    release_shape
                ]:
                    failures.append(f"site {site_id}: its release is not {release_shape} values")
                    continue
                updates.append(update)
                weight = update.weight
            received.append((site_id, weight, metrics))
            if "update-clipped" in metrics:  # a release is not an update: nothing to clip
                clipped.setdefault(site_id, []).append(bool(metrics["update-clipped"]))
        for failure in failures:
            log.warning("round %d: %s", server_round, failure)
        record: dict = {
            "round": server_round,
            "sites": sorted(s for s, _, _ in received),
            "sites_sampled": len(nodes),
            "sites_available": len(available),
            # errors and timeouts; a refusal is not a failure
            "sites_failed": len(nodes) - len(received) - len(refused) - len(declined_now),
        }
        if declined_now:
            record["refused"] = dict(sorted(declined_now.items()))
        if failures:
            record["failures"] = failures
        eps = {
            s: m["epsilon"] for s, _, m in sorted(received, key=lambda r: r[0]) if "epsilon" in m
        }
        if eps:
            record["epsilon"] = eps
            record["epsilon_budget"] = {
                s: m["epsilon-budget"]
                for s, _, m in sorted(received, key=lambda r: r[0])
                if "epsilon-budget" in m
            }
            figures = {
                s: m["noise-figure"]
                for s, _, m in sorted(received, key=lambda r: r[0])
                if "noise-figure" in m
            }
            if figures:
                record["noise_figure"] = figures
        if refused:
            record["budget_exhausted"] = {
                s: {
                    "epsilon": m["epsilon"],
                    "epsilon_next": m["epsilon-next"],
                    "budget": m["epsilon-budget"],
                }
                for s, m in sorted(refused.items())
            }
        mean: tuple[Arrays, Arrays] | None = None
        skipped = setup_error or "no site replied; the global model is unchanged"
        if secure and ads:
            try:
                aggregate = secure.run(ads)
            except SecAggError as exc:  # RoundAborted included
                skipped = str(exc)
                log.warning("round %d: %s", server_round, exc)
            else:
                mean = (
                    ([aggregate.mean.reshape(release_shape)], [])
                    if phi
                    else split_like(aggregate.mean, global_gen, global_disc)
                )
                # Losses and counts of the sites whose updates are in the sum.
                received = [r for r in received if r[0] in aggregate.survivors]
                record["sites"] = aggregate.survivors
                record["secagg_error_bound"] = aggregate.error_bound
            record["secagg"] = secure.summary()
        elif updates:
            mean = weighted_mean(updates)
        if kept is not None:
            record, mean, received = dict(kept.record), ([kept.mean], []), kept.received
            record["release_kept"] = True
        if mean is not None:
            mean_gen, mean_disc = mean
            total = sum(w for _, w, _ in received)
            if kept is None:
                record["examples"] = total
                record["update_bytes"] = (
                    secure.bytes_sent if secure else {s: 4 * length for s, _, _ in received}
                )
            if phi is not None:
                if kept is None:
                    # Before the fit, which takes minutes: the sites' spend is safe now.
                    path = out.keep_release(
                        KeptRelease(server_round, mean_gen[0], record, received, phi.digest())
                    )
                    audit.append(
                        "release_kept", run=out.dir.name, round=server_round, file=path.name
                    )
                record.update(
                    _fit_to_releases(gen, phi, mean_gen[0], total, settings, out, server_round)
                )
                record.update(_class_figures(mean_gen[0], total, received, phi, settings))
            else:
                set_arrays(gen, apply_delta(global_gen, mean_gen))
                set_arrays(disc, apply_delta(global_disc, mean_disc))
            recalibrate_batchnorm(gen, g_inputs, seed=server_round)
            out.save_generator(gen, server_round)
            gen.eval()
            with torch.no_grad():
                out.write_samples(server_round, grid_png(gen(fixed_z, fixed_y, fixed_a)))
            for key, name in (("g-loss", "g_loss"), ("d-loss", "d_loss")):
                if all(key in m for _, _, m in received):
                    record[name] = sum(w * m[key] for _, w, m in received) / total
            if any(m.get("mode-seeking-loss", 0.0) for _, _, m in received):
                record["mode_seeking_loss"] = (
                    sum(w * m.get("mode-seeking-loss", 0.0) for _, w, m in received) / total
                )
            if phi is None:
                record["updates_clipped"] = sum(bool(m["update-clipped"]) for _, _, m in received)
            if settings.dump_updates and phi is not None:
                # Test mode: what the fit read, the releases' aggregate.
                out.dump_arrays(server_round, "release_mean", {"gen": mean_gen})
            elif settings.dump_updates:
                out.dump_arrays(
                    server_round, "global_before", {"gen": global_gen, "disc": global_disc}
                )
                out.dump_arrays(
                    server_round, "global_after", {"gen": get_arrays(gen), "disc": get_arrays(disc)}
                )
        else:
            record["skipped"] = skipped
        # Every round, updated or not, so a resume continues at the next one.
        out.save_checkpoint(gen, disc, server_round)
        if phi is not None:
            out.drop_fit_state(server_round)  # the checkpoint holds the fitted G now
        record["seconds"] = round(time.perf_counter() - started, 3)
        out.append_metrics(record)
        # One JSON line per round for `fedgan run`, which reads the log stream.
        log.info("%s%s", ROUND_MARKER, json.dumps(record, sort_keys=True))
        record_round(audit, out.dir.name, record, seen)
        if declined and all(n in declined or n in exhausted for n in grid.get_node_ids()):
            # Returned, not raised: Flower streams the ServerApp's last log
            # lines to the operator only when it ends normally.
            stopped = "no site will take part any more: " + "; ".join(
                f"{s} refused: {why}" for s, why in sorted(declined.values())
            )
            log.error("fedgan: %s", stopped)
            return {"stopped": stopped}
    return {
        "update_clipped_fraction": {
            s: sum(flags) / len(flags) for s, flags in sorted(clipped.items())
        },
        "budget_exhausted": sorted(exhausted.values()),
        "refused": {site: why for site, why in sorted(declined.values())},
    }
