"""One round at the aggregator, as a plain function over a `Transport`:
sample the sites, send them the global model (or, in a mean-embedding run,
the request for their release), sort their replies, recover the sum (in the
clear or through secure aggregation), let the mechanism turn it into the
new global model, and keep the round.

Nothing here knows Flower: the ServerApp passes a `GridTransport`, the unit
tests an in-memory one, so a whole round, with secure aggregation and
dropouts at every stage, runs in milliseconds."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedgan import timeline, wire
from fedgan.aggregator.mechanisms import Mechanism, Model
from fedgan.aggregator.preview import Preview
from fedgan.aggregator.record import RoundRecord
from fedgan.aggregator.run_store import Received, RunOutputs
from fedgan.aggregator.secure_round import Ahead, SecureRound
from fedgan.aggregator.transport import Reply, Request, Transport
from fedgan.audit_log import AuditLog, record_round
from fedgan.config.round import RoundConfig
from fedgan.config.run import RunSettings
from fedgan.gan.models import Discriminator, Generator, recalibrate_batchnorm
from fedgan.progress import ROUND_MARKER
from fedgan.round_numbers import decode
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.messages import Advertisement
from fedgan.update import Contribution
from fedgan.weights import get_arrays

log = logging.getLogger("fedgan.server")


@dataclass
class Federation:
    """The run's state from round to round: the global model and what the
    aggregator has learnt about the sites (who left, who joined)."""

    transport: Transport
    settings: RunSettings
    store: RunOutputs
    audit: AuditLog
    mechanism: Mechanism
    gen: Generator
    disc: Discriminator
    preview: Preview
    exhausted: dict[int, str] = field(default_factory=dict)  # node -> site, out of budget
    # node -> (site, reason): refused the app bundle or the run's settings.
    declined: dict[int, tuple[str, str]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # sites that have been in a sum
    clipped: dict[str, list[bool]] = field(default_factory=dict)  # per site, per round
    init_sha256: str = ""  # the weights hash of the pretrained init the run started from
    ahead: Ahead | None = None  # the next round's keys and shares, gathered during this one

    def available(self) -> list[int]:
        left_out = self.exhausted.keys() | self.declined.keys()
        return [n for n in self.transport.node_ids() if n not in left_out]

    def nobody_left(self) -> str:
        """Why no site will take part any more, or "" while one may."""
        if self.declined and all(
            n in self.declined or n in self.exhausted for n in self.transport.node_ids()
        ):
            return "no site will take part any more: " + "; ".join(
                f"{s} refused: {why}" for s, why in sorted(self.declined.values())
            )
        return ""

    def summary(self) -> dict:
        """For status.json at the end of the run."""
        return {
            "update_clipped_fraction": {
                s: sum(flags) / len(flags) for s, flags in sorted(self.clipped.items())
            },
            "budget_exhausted": sorted(self.exhausted.values()),
            "refused": {site: why for site, why in sorted(self.declined.values())},
        }


@dataclass
class Collected:
    """What a round gathered: its record so far, the global model it started
    from, the mean of the updates (None: nothing to apply) and who sent them."""

    record: RoundRecord
    before: Model
    mean: Model | None = None
    received: Received = field(default_factory=list)  # site, weight, metrics
    kept: bool = False  # from the sum kept before a stop, not from the sites
    skipped: str = ""
    # A secure round's numbers (losses, norms, clip flags...): the survivors'
    # means, unmasked with the sum; None in a plain round (each site's are
    # in its metrics).
    summed: dict[str, float] | None = None

    def site_mean(self, name: str) -> float | None:
        """The round's mean of one number the sites report, weighted as the
        update is; None when a site lacks it."""
        if self.summed is not None:
            return self.summed.get(name)
        received = self.received
        total = sum(w for _, w, _ in received)
        if not received or not all(name in m for _, _, m in received):
            return None
        return sum(w * m[name] for _, w, m in received) / total


@dataclass
class Replies:
    """The train replies sorted: who sent what, who refused, who failed."""

    received: Received = field(default_factory=list)
    updates: list[Contribution] = field(default_factory=list)
    ads: dict[int, Advertisement] = field(default_factory=dict)
    envelopes: dict[str, bytes] = field(default_factory=dict)  # site -> masked update
    budget: dict[str, dict[str, float]] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def sample_sites(nodes: list[int], fraction: float, seed: int, server_round: int) -> list[int]:
    """⌈fraction × available⌉ sites, reproducibly per round."""
    k = max(1, math.ceil(fraction * len(nodes)))
    if k >= len(nodes):
        return nodes
    return sorted(random.Random(f"{seed}-{server_round}").sample(nodes, k))


def run_round(fed: Federation, server_round: int) -> RoundRecord:
    started = time.perf_counter()
    timeline.mark("server.round", round=server_round)
    kept = fed.mechanism.kept(server_round)
    if kept is not None:
        record = RoundRecord.from_dict(kept.record)
        record.release_kept = True
        collected = Collected(record, ([], []), ([kept.mean], []), kept.received, kept=True)
    else:
        collected = collect(fed, server_round)
    timeline.mark("server.collected", round=server_round)
    if collected.mean is not None:
        fed.mechanism.apply(collected, fed.gen, fed.disc)
        timeline.mark("server.applied", round=server_round)
        publish(fed, collected)
        timeline.mark("server.published", round=server_round)
    else:
        collected.record.skipped = collected.skipped
    keep(fed, collected.record, started)
    timeline.mark("server.kept", round=server_round)
    return collected.record


def collect(fed: Federation, server_round: int) -> Collected:
    """Ask the sampled sites and recover the mean of what they sent."""
    settings = fed.settings
    available = fed.available()
    nodes = sample_sites(available, settings.fraction_sites, settings.train.seed, server_round)
    before = get_arrays(fed.gen), get_arrays(fed.disc)
    config = settings.round_config(server_round, fed.mechanism.digest, fed.init_sha256)
    length = fed.mechanism.length(before)
    secure, setup_error = _secure_round(fed, config, nodes, length, len(fed.mechanism.stats))
    contract = config.to_record()
    outgoing = fed.mechanism.outgoing(before)
    if secure is not None:
        return _collect_secure(fed, secure, nodes, available, before, contract, outgoing)
    requests = [
        Request(node, "train", str(server_round), wire.train_request(*outgoing, contract))
        for node in (nodes if not setup_error else [])
    ]
    answers = fed.transport.exchange(requests, settings.round_timeout) if requests else []
    replies = sort_replies(fed, answers, None, before, server_round)
    for failure in replies.failures:
        log.warning("round %d: %s", server_round, failure)
    collected = Collected(
        _base_record(server_round, nodes, available, replies), before, received=replies.received
    )
    collected.skipped = setup_error or "no site replied; the global model is unchanged"
    if replies.updates:
        collected.mean = fed.mechanism.mean(replies.updates)
    if collected.mean is not None:
        collected.record.examples = sum(w for _, w, _ in collected.received)
        collected.record.update_bytes = {s: 4 * length for s, _, _ in collected.received}
    return collected


def _collect_secure(
    fed: Federation,
    secure: SecureRound,
    nodes: list[int],
    available: list[int],
    before: Model,
    contract: dict,
    outgoing: Model,
) -> Collected:
    """A secure round: keys advertised and shared first, so that a round
    that cannot reach its threshold is abandoned before any site trains or
    spends privacy budget; then training and masking in one message; then
    the consistency check and unmasking."""
    server_round = secure.params.round
    replies = Replies()
    planned = _planned(fed, secure, nodes, contract)
    if planned is None:
        _advertise(fed, secure, nodes, contract, replies)
    else:
        secure = planned
    aggregate, why, plan = None, "", None
    try:
        routed = secure.routed if secure.routed is not None else secure.share(replies.ads)
        u2 = secure.session.u2
        requests = [
            Request(
                secure.nodes[site],
                "train",
                str(server_round),
                wire.train_request(*outgoing, contract, wire.masking_record(inbox, u2)),
            )
            for site, inbox in sorted(routed.items())
        ]
        answers = fed.transport.exchange(requests, fed.settings.round_timeout)
        sort_replies(fed, answers, secure, before, server_round, replies)
        for site in u2:
            if site not in replies.envelopes:
                secure.note(site, _why_no_update(site, replies))
        # Planned after training, so that a site out of budget is not asked.
        plan = _plan_next(fed, server_round, fed.mechanism.length(before))
        aggregate = secure.finish(replies.envelopes, plan)
    except SecAggError as exc:  # RoundAborted included
        why = str(exc)
        log.warning("round %d: %s", server_round, exc)
    if plan is not None:
        for site, refusal in sorted(plan.refused.items()):
            replies.failures.append(f"site {site} refused round {plan.round}'s roster: {refusal}")
        if plan.secure.routed is not None:
            fed.ahead = plan
    for failure in replies.failures:
        log.warning("round %d: %s", server_round, failure)
    collected = Collected(
        _base_record(server_round, nodes, available, replies), before, received=replies.received
    )
    record = collected.record
    collected.skipped = why or "no site replied; the global model is unchanged"
    if aggregate is not None:
        stats, k = fed.mechanism.stats, len(fed.mechanism.stats)
        collected.mean = fed.mechanism.from_vector(aggregate.mean[:-k], before)
        collected.summed = summed = decode(stats, aggregate.mean[-k:], secure.params.value_range)
        if record.epsilon:  # DP on: the figure means something
            record.noise_figure_mean = summed["noise-figure"]
        record.secagg_clipped_fraction = summed["secagg-clipped"]
        # Losses of the sites whose updates are in the sum; each counts once.
        collected.received = [r for r in collected.received if r[0] in aggregate.survivors]
        record.sites = aggregate.survivors
        record.secagg_error_bound = aggregate.error_bound
        record.examples = sum(w for _, w, _ in collected.received)
        record.update_bytes = secure.bytes_sent
    record.secagg = secure.summary()
    return collected


def _advertise(
    fed: Federation, secure: SecureRound, nodes: list[int], contract: dict, replies: Replies
) -> None:
    """Stage 1 in a message of its own: the run's first round, and any round
    that did not go as the previous one planned (`_planned`)."""
    server_round = secure.params.round
    requests = [
        Request(
            node,
            "train.secagg_advertise",
            f"{server_round}-secagg_advertise",
            wire.advertise_request(contract, secure.setup()),
        )
        for node in nodes
    ]
    for reply in fed.transport.exchange(requests, secure.timeout):
        if reply.content is None:
            _refused_or_failed(fed, reply, replies, server_round)
            continue
        try:
            if wire.METRICS in reply.content.metric_records:  # out of budget, said up front
                site_id, metrics = wire.read_train_reply_metrics(reply.content)
                _out_of_budget(fed, reply.node, site_id, metrics, replies, server_round)
                continue
            replies.ads[reply.node] = wire.read_advertisement(reply.content)
        except (SecAggError, KeyError, ValueError) as exc:
            replies.failures.append(f"node {reply.node}: an unreadable advertisement ({exc})")


def _plan_next(fed: Federation, server_round: int, length: int) -> Ahead | None:
    """The next round as it would start now (its sample, contract and secure
    setup), for its first two stages to ride on this round's last two; None
    after the last round or when the next would not run securely."""
    settings = fed.settings
    following = server_round + 1
    if following > settings.rounds:
        return None
    nodes = sample_sites(fed.available(), settings.fraction_sites, settings.train.seed, following)
    config = settings.round_config(following, fed.mechanism.digest, fed.init_sha256)
    secure, _ = _secure_round(fed, config, nodes, length, len(fed.mechanism.stats))
    if secure is None:
        return None
    return Ahead(secure, config.to_record(), nodes)


def _planned(
    fed: Federation, secure: SecureRound, nodes: list[int], contract: dict
) -> SecureRound | None:
    """The secure round the previous round prepared for this one, its keys
    advertised and shares routed, if this round is exactly that plan: the
    same sites, contract, secure parameters, CRL and membership list (a
    revocation since then reaches the sites in a setup of its own). Else
    None, and the round advertises and shares on its own, where any refusal
    is heard. Used once either way."""
    ahead, fed.ahead = fed.ahead, None
    if ahead is None:
        return None
    planned = ahead.secure
    if (
        ahead.round == secure.params.round
        and ahead.nodes == nodes
        and ahead.contract == contract
        and planned.params == secure.params
        and planned.crl == secure.crl
        and planned.membership == secure.membership
        and planned.routed is not None
    ):
        return planned
    log.info("round %d: the keys sent ahead do not fit this round; advertising", ahead.round)
    return None


def _why_no_update(site: str, replies: Replies) -> str:
    if site in replies.budget:
        return "train: its privacy budget is spent"
    if site in replies.declined:
        return f"train: refused: {replies.declined[site]}"
    return "train: no masked update (failed, or no reply in time)"


def _secure_round(
    fed: Federation, config: RoundConfig, nodes: list[int], length: int, numbers: int
) -> tuple[SecureRound | None, str]:
    """(the round's secure aggregation of ``length`` values per site and
    ``numbers`` appended, or None when off; why the round cannot run
    securely, or "")."""
    settings = fed.settings
    if not settings.secagg.enabled:
        return None, ""
    try:
        params = SecAggParams.for_round(
            config.run_name,
            config.round,
            len(nodes),
            bits=settings.secagg.bits,
            value_range=settings.secagg_range(length),
            length=length + numbers,
            threshold=settings.secagg.threshold,
        )
    except SecAggError as exc:
        return None, f"secure aggregation cannot run this round: {exc}; the model is unchanged"
    # Re-read every round: a revocation or a new member reaches the sites
    # with the next setup.
    delivered = {}
    for key, path in (("crl", settings.secagg.crl), ("membership", settings.secagg.membership)):
        try:
            delivered[key] = Path(path).read_bytes() if path else b""
        except OSError as exc:
            return None, (
                f"secure aggregation cannot run this round: {path} cannot be read "
                f"({exc.strerror}); fix run config 'secagg-{key}'; the model is unchanged"
            )
    timeout = settings.secagg.stage_timeout
    return SecureRound(fed.transport, params, timeout, **delivered), ""


def sort_replies(
    fed: Federation,
    replies: list[Reply],
    secure: SecureRound | None,
    before: Model,
    server_round: int,
    out: Replies | None = None,
) -> Replies:
    out = out if out is not None else Replies()
    for reply in replies:
        if reply.content is None:
            _refused_or_failed(fed, reply, out, server_round)
            continue
        try:
            if secure:
                update, (site_id, metrics) = None, wire.read_train_reply_metrics(reply.content)
            else:
                update, site_id, metrics = wire.read_train_reply(reply.content)
        except (KeyError, TypeError, ValueError) as exc:
            # What it sent is not echoed: a reply is numbers, never free text.
            out.failures.append(f"node {reply.node}: an unreadable reply ({type(exc).__name__})")
            continue
        if metrics.get("budget-exhausted"):
            _out_of_budget(fed, reply.node, site_id, metrics, out, server_round)
            continue
        try:
            if secure:
                out.envelopes[site_id] = wire.secagg_bytes(reply.content, "envelope")
                # Every site's update counts equally in the sum. A release's
                # weight is its noisy count (DP post-processing); an exact
                # count never leaves a site.
                weight = metrics.pop("num-examples", 1.0)
            else:
                weight = _accept(fed, update, before, out)
        except (SecAggError, KeyError, ValueError) as exc:
            out.failures.append(f"site {site_id}: {exc}")
            continue
        out.received.append((site_id, weight, metrics))
        if "update-clipped" in metrics:  # a release is not an update: nothing to clip
            fed.clipped.setdefault(site_id, []).append(bool(metrics["update-clipped"]))
    return out


def _out_of_budget(
    fed: Federation, node: int, site_id: str, metrics: dict, out: Replies, server_round: int
) -> None:
    fed.exhausted[node] = site_id
    out.budget[site_id] = metrics
    log.warning(
        "round %d: site %s refused: budget exhausted (ε %.3f spent, %.3f after, "
        "budget %.3f); left out of later rounds",
        server_round,
        site_id,
        metrics["epsilon"],
        metrics["epsilon-next"],
        metrics["epsilon-budget"],
    )


def _accept(fed: Federation, sent: Contribution | None, before: Model, out: Replies) -> float:
    assert sent is not None
    why = fed.mechanism.misfit(sent, before)
    if why:
        raise ValueError(why)
    out.updates.append(sent)
    return sent.weight


def _refused_or_failed(fed: Federation, reply: Reply, out: Replies, server_round: int) -> None:
    refusal = wire.parse_refusal(reply.error)
    if refusal is None:
        out.failures.append(f"node {reply.node}: {reply.error}")
        return
    fed.declined[reply.node] = refusal
    out.declined[refusal[0]] = refusal[1]
    log.warning("round %d: site %s refused: %s; left out of later rounds", server_round, *refusal)


def _base_record(
    server_round: int, nodes: list[int], available: list[int], replies: Replies
) -> RoundRecord:
    received = sorted(replies.received, key=lambda r: r[0])
    record = RoundRecord(
        round=server_round,
        sites=[s for s, _, _ in received],
        sites_sampled=len(nodes),
        sites_available=len(available),
        sites_failed=len(nodes) - len(received) - len(replies.budget) - len(replies.declined),
        refused=dict(sorted(replies.declined.items())) or None,
        failures=replies.failures or None,
    )
    eps = {s: m["epsilon"] for s, _, m in received if "epsilon" in m}
    if eps:
        record.epsilon = eps
        record.epsilon_budget = {
            s: m["epsilon-budget"] for s, _, m in received if "epsilon-budget" in m
        }
        figures = {s: m["noise-figure"] for s, _, m in received if "noise-figure" in m}
        record.noise_figure = figures or None
    if replies.budget:
        record.budget_exhausted = {
            s: {
                "epsilon": m["epsilon"],
                "epsilon_next": m["epsilon-next"],
                "budget": m["epsilon-budget"],
            }
            for s, m in sorted(replies.budget.items())
        }
    return record


def publish(fed: Federation, collected: Collected) -> None:
    """The new G where people and later rounds see it: BatchNorm statistics
    recomputed from G's own outputs, generator.pt, the sample grid, and the
    round's losses (the sites' means)."""
    record = collected.record
    recalibrate_batchnorm(fed.gen, fed.preview.inputs, seed=record.round)
    fed.store.save_generator(fed.gen, record.round)
    fed.store.write_samples(record.round, fed.preview.grid(fed.gen))
    # A mean-embedding round has its fit's loss already, and no D.
    for name, value in (
        ("g_loss", collected.site_mean("g-loss")),
        ("d_loss", collected.site_mean("d-loss")),
        ("mode_seeking_loss", collected.site_mean("mode-seeking-loss") or None),  # 0: off
        ("update_norm", collected.site_mean("update-norm")),
    ):
        if value is not None:
            setattr(record, name, value)
    if fed.settings.dump_updates:
        fed.mechanism.dump(collected, fed.gen, fed.disc)


def keep(fed: Federation, record: RoundRecord, started: float) -> None:
    """Every round, updated or not: the checkpoint (so a resume continues at
    the next round), the metrics line, the log line `fedgan run` reads, and
    the round's audit events."""
    record.seconds = round(time.perf_counter() - started, 3)
    line = record.as_dict()
    # The line rides in the checkpoint: a stop before the append below loses
    # no row (a resume restores it, `RunOutputs.restore_metrics`).
    fed.store.save_checkpoint(fed.gen, fed.disc, record.round, line)
    fed.store.drop_fit_state(record.round)  # the checkpoint holds the fitted G now
    fed.store.append_metrics(line)
    log.info("%s%s", ROUND_MARKER, json.dumps(line, sort_keys=True))
    record_round(fed.audit, fed.store.dir.name, line, fed.seen)
