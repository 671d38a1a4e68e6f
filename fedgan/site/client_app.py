"""The site's ClientApp: translate Flower messages into a call of
`fedgan.site.round.run_round` (or, in a mean-embedding run,
`fedgan.site.release.release_round`) and its outcome back into a reply."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedgan import round_numbers, timeline, wire
from fedgan.config.round import RoundConfig
from fedgan.config.run import SiteSettings
from fedgan.dumps import dump_arrays
from fedgan.errors import FedGanError
from fedgan.privacy.ledger import BudgetExhausted
from fedgan.secagg.messages import Advertisement
from fedgan.site import approval, faults, runtime, secure_round
from fedgan.update import Contribution, Release

log = logging.getLogger("fedgan.site")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Flower's root handler would print every line twice
app = ClientApp()
timeline.mark("clientapp.loaded")

Handler = Callable[[Message, Context], Message]


def _timed(stage: str) -> Callable[[Handler], Handler]:
    """Marks a handler's start and end for `bench/round_overhead.py`."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def timed(msg: Message, context: Context) -> Message:
            where = {
                "stage": stage,
                "site": str(context.node_config.get("site-id", "")),
                "group": getattr(msg.metadata, "group_id", ""),
            }
            timeline.mark("site.begin", **where)
            try:
                return handler(msg, context)
            finally:
                timeline.mark("site.end", **where)

        return timed

    return wrap


def _checked(site: SiteSettings, store: approval.PolicyStore, run_id: str) -> None:
    if runtime.admitted_fab is None:
        raise store.refuse(
            approval.AppRefused(
                site.site_id,
                "this SuperNode runs a ClientApp runtime that does not check app bundles; "
                "start it with FedGAN's launcher or site image",
            ),
            run=run_id,
        )


@app.train("secagg_advertise")
@_timed("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """Stage 1 of a secure round, before anything is trained or spent: the
    site checks the round against its limits, its credentials, a current CRL
    and membership list, and its threshold rule, then advertises keys."""
    faults.crash_if_requested("secagg_advertise")
    site = SiteSettings.from_node_config(context.node_config)
    store = approval.PolicyStore(Path(site.work_dir), site.site_id)
    run_id = str(msg.metadata.run_id)
    _checked(site, store, run_id)
    record, setup = wire.read_advertise_request(msg.content)
    try:
        ready = _ready_for(context, site, store, run_id, record, setup)
    except approval.AppRefused as refusal:
        raise store.refuse(refusal, run=run_id, round=int(record["round"])) from None
    if isinstance(ready, BudgetExhausted):
        return Message(
            wire.budget_reply(site.site_id, ready.spent, ready.after, ready.budget), reply_to=msg
        )
    return Message(wire.advertise_reply(ready, site.site_id), reply_to=msg)


def _ready_for(
    context: Context,
    site: SiteSettings,
    store: approval.PolicyStore,
    run_id: str,
    record: dict,
    setup: wire.SecAggSetup,
    ahead: bool = False,
) -> Advertisement | BudgetExhausted:
    """Stage 1's checks, then fresh keys: what training would refuse before
    spending (the site's limits first, then its DP plan and budget), refused
    now, so a site that would refuse never joins the roster. Raises
    `approval.AppRefused`; returns a budget refusal or the advertisement."""
    # Imported here: the preflight reads the silo and builds D (torch).
    from fedgan.site.round import preflight_round

    limits = store.load().limits
    cfg = RoundConfig.from_record(record)
    try:
        secure_round.check_setup(site, limits, setup.params, setup.crl, setup.membership)
    except FedGanError as exc:
        raise approval.AppRefused(site.site_id, str(exc)) from None
    exhausted = preflight_round(site, dict(context.node_config), run_id, cfg, limits)
    if exhausted is not None:
        return exhausted
    return secure_round.advertise(
        context.state, site, setup.params, setup.server_pk, limits, ahead=ahead
    )


@app.train()
@_timed("train")
def train(msg: Message, context: Context) -> Message:
    """Train (or release), then, in a secure round, mask the update with the
    keys shared before training; a plain round sends it in the clear."""
    faults.crash_if_requested("train")
    # Imported here: it pulls in Opacus (~2 s), which the secure-aggregation
    # stages, each a fresh ClientApp process, do not need.
    from fedgan.site.round import run_round

    site = SiteSettings.from_node_config(context.node_config)
    store = approval.PolicyStore(Path(site.work_dir), site.site_id)
    run_id = str(msg.metadata.run_id)
    _checked(site, store, run_id)
    global_gen, global_disc, record = wire.read_train_request(msg.content)
    masking = wire.read_masking(msg.content)
    limits = store.load().limits
    try:
        cfg = RoundConfig.from_record(record)
        if masking is not None:
            # Before anything is spent: the shares decrypt, and this site
            # has not trained in this attempt at the round already.
            secure_round.accept_shares(context.state, site, *masking)
        if cfg.privacy.mean_embedding:
            from fedgan.site.release import release_round

            outcome = release_round(
                site,
                dict(context.node_config),
                run_id,
                cfg,
                limits=limits,
                secure=masking is not None,
            )
        else:
            outcome = run_round(
                site,
                dict(context.node_config),
                run_id,
                cfg,
                global_gen,
                global_disc,
                limits=limits,
                secure=masking is not None,
            )
    except approval.AppRefused as refusal:
        # Raised to Flower, which replies to the ServerApp with the reason.
        raise store.refuse(refusal, run=run_id, round=int(record["round"])) from None
    if outcome.update is None:
        refusal = outcome.refusal
        assert refusal is not None
        return Message(
            wire.budget_reply(site.site_id, refusal.spent, refusal.after, refusal.budget),
            reply_to=msg,
        )
    if cfg.dump_updates and site.dump_updates:
        # Test mode, when both the run and this site's node config ask: keep
        # exactly what is sent, so a test can recompute the server's average
        # from the sites' side.
        dump_arrays(
            Path(site.work_dir)
            / "dumps"
            / run_id
            / "dumps"
            / f"round_{cfg.round:03d}"
            / "update.npz",
            _dumped(outcome.update),
        )
    timeline.mark("site.trained", site=site.site_id, round=cfg.round)
    if masking is not None:
        stats = round_numbers.stats_for(cfg.privacy.mean_embedding)
        envelope = secure_round.masked_input(
            context.state, site, outcome.update, outcome.metrics, stats
        )
        # A release's weight is its noisy count: part of its DP release.
        weight = outcome.update.weight if isinstance(outcome.update, Release) else None
        return Message(
            wire.masked_reply(site.site_id, outcome.metrics, envelope, weight), reply_to=msg
        )
    return Message(wire.train_reply(outcome.update, site.site_id, outcome.metrics), reply_to=msg)


# Secure aggregation, the stages around training.

Stage = Callable[[RecordDict, SiteSettings, RecordDict], RecordDict]


def _stage(name: str, handler: Stage, msg: Message, context: Context) -> Message:
    """One protocol stage; a refusal (a roster off the membership list, a
    revoked peer, survivor sets that disagree) is also a line in the site's
    own audit log, then Flower carries it to the aggregator."""
    faults.crash_if_requested(name)
    site = SiteSettings.from_node_config(context.node_config)
    try:
        return Message(handler(context.state, site, msg.content), reply_to=msg)
    except FedGanError as exc:
        approval.PolicyStore(Path(site.work_dir), site.site_id).audit.append(
            "secagg_refused",
            site=site.site_id,
            stage=name,
            run=str(msg.metadata.run_id),
            reason=str(exc),
        )
        raise


@app.train("secagg_share")
@_timed("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return _stage("secagg_share", secure_round.share_keys, msg, context)


@app.train("secagg_confirm")
@_timed("secagg_confirm")
def secagg_confirm(msg: Message, context: Context) -> Message:
    """Stage 4, and, when the aggregator sends the next round's setup with
    it, that round's stage 1 (`_advertised_ahead`)."""
    reply = _stage("secagg_confirm", secure_round.confirm, msg, context)
    ad = _advertised_ahead(msg, context)
    if ad is not None:
        wire.with_next(reply.content, advertisement=wire.pack_advertisement(ad))
    return reply


@app.train("secagg_unmask")
@_timed("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 5, and, when the aggregator sends the next round's roster with
    it, that round's stage 2, after this round's reveals: the next round
    then starts with its train message, two messages sooner."""
    reply = _stage("secagg_unmask", secure_round.unmask, msg, context)
    site = SiteSettings.from_node_config(context.node_config)
    sent = shares_ahead(context.state, site, str(msg.metadata.run_id), msg.content)
    if sent:
        wire.with_next(reply.content, **sent)
    return reply


def _advertised_ahead(msg: Message, context: Context) -> Advertisement | None:
    """The next round's keys, if asked for and this site would take part.
    Anything else sends none and records nothing in the audit log: a
    refusal, a budget that would not last, a setup that does not read, a
    failure. The aggregator then opens the next round with an advertise
    stage of its own, where the site says why as it always did; this
    round's signature goes out in any case."""
    site = SiteSettings.from_node_config(context.node_config)
    if runtime.admitted_fab is None:  # `_checked` refuses it in the round's own stages
        return None
    try:
        ahead = wire.read_lookahead(msg.content)
        if ahead is None:
            return None
        record, setup = ahead
        store = approval.PolicyStore(Path(site.work_dir), site.site_id)
        run_id = str(msg.metadata.run_id)
        ready = _ready_for(context, site, store, run_id, record, setup, ahead=True)
    except Exception as exc:  # never at the cost of this round's signature
        log.info("site %s: no keys sent ahead for the next round: %s", site.site_id, exc)
        return None
    return ready if isinstance(ready, Advertisement) else None


def shares_ahead(
    state: RecordDict, site: SiteSettings, run_id: str, content: RecordDict
) -> dict[str, bytes]:
    """What the unmask reply carries for the next round: its encrypted
    shares, if its roster came and the site accepts it; or, for a roster the
    site refuses (a revoked or unlisted peer, a bad signature), the reason,
    also recorded in its audit log as in a share stage of its own, so the
    aggregator hears it; or nothing. Never raises: this round's reveals go
    out in any case."""
    try:
        roster = wire.next_bytes(content, "roster")
        if roster is None:
            return {}
        return {"shares": secure_round.share_ahead(state, site, roster)}
    except FedGanError as exc:
        approval.PolicyStore(Path(site.work_dir), site.site_id).audit.append(
            "secagg_refused", site=site.site_id, stage="secagg_share", run=run_id, reason=str(exc)
        )
        log.info("site %s: refused the next round's roster: %s", site.site_id, exc)
        return {"refused": str(exc).encode()}
    except Exception as exc:  # never at the cost of this round's reveals
        log.warning("site %s: no shares sent ahead for the next round: %s", site.site_id, exc)
        return {}


def _dumped(sent: Contribution) -> dict[str, list[np.ndarray]]:
    arrays = (
        {"release": [sent.values]}
        if isinstance(sent, Release)
        else {"gen": sent.gen, "disc": sent.disc}
    )
    return {**arrays, "weight": [np.asarray(sent.weight)]}
