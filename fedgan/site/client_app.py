"""The site's ClientApp: translate Flower messages into a call of
`fedgan.site.round.run_round` (or, in a mean-embedding run,
`fedgan.site.release.release_round`) and its outcome back into a reply."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgan import wire
from fedgan.config.round import RoundConfig
from fedgan.config.run import SiteSettings
from fedgan.dumps import dump_arrays
from fedgan.errors import FedGanError
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    faults.crash_if_requested("train")
    # Imported here: it pulls in Opacus (~2 s), which the three secure-
    # aggregation stages, each a fresh ClientApp process, do not need.
    from fedgan.site.round import run_round

    site = SiteSettings.from_node_config(context.node_config)
    store = approval.PolicyStore(Path(site.work_dir), site.site_id)
    run_id = str(msg.metadata.run_id)
    if runtime.admitted_fab is None:
        raise store.refuse(
            approval.AppRefused(
                site.site_id,
                "this SuperNode runs a ClientApp runtime that does not check app bundles; "
                "start it with FedGAN's launcher or site image",
            ),
            run=run_id,
        )
    global_gen, global_disc, record = wire.read_train_request(msg.content)
    secagg = wire.read_secagg_setup(msg.content)
    limits = store.load().limits
    try:
        cfg = RoundConfig.from_record(record)
        if secagg is not None:
            # Before anything is trained or spent: credentials, a current
            # CRL, and n and t within this site's own rule.
            try:
                secure_round.check_setup(site, limits, secagg.params, secagg.crl, secagg.membership)
            except FedGanError as exc:
                raise approval.AppRefused(site.site_id, str(exc)) from None
        if cfg.privacy.mean_embedding:
            from fedgan.site.release import release_round

            outcome = release_round(
                site,
                dict(context.node_config),
                run_id,
                cfg,
                limits=limits,
                secure=secagg is not None,
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
                secure=secagg is not None,
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
    if cfg.dump_updates:
        # Test mode: keep exactly what is sent, so a test can recompute the
        # server's average from the sites' side.
        dump_arrays(
            Path(site.work_dir)
            / "dumps"
            / run_id
            / "dumps"
            / f"round_{cfg.round:03d}"
            / "update.npz",
            _dumped(outcome.update),
        )
    if secagg is not None:
        ad = secure_round.advertise(
            context.state, site, secagg.params, secagg.server_pk, outcome.update, limits
        )
        metrics = {"num-examples": outcome.update.weight, **outcome.metrics}
        return Message(wire.secagg_train_reply(ad, site.site_id, metrics), reply_to=msg)
    return Message(wire.train_reply(outcome.update, site.site_id, outcome.metrics), reply_to=msg)


# Secure aggregation, stages 2-5 (stage 1 rides on the train reply above).


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    faults.crash_if_requested("secagg_share")
    site = SiteSettings.from_node_config(context.node_config)
    return Message(secure_round.share_keys(context.state, site, msg.content), reply_to=msg)


@app.train("secagg_mask")
def secagg_mask(msg: Message, context: Context) -> Message:
    faults.crash_if_requested("secagg_mask")
    site = SiteSettings.from_node_config(context.node_config)
    return Message(secure_round.masked_input(context.state, site, msg.content), reply_to=msg)


@app.train("secagg_confirm")
def secagg_confirm(msg: Message, context: Context) -> Message:
    faults.crash_if_requested("secagg_confirm")
    site = SiteSettings.from_node_config(context.node_config)
    return Message(secure_round.confirm(context.state, site, msg.content), reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    faults.crash_if_requested("secagg_unmask")
    site = SiteSettings.from_node_config(context.node_config)
    return Message(secure_round.unmask(context.state, site, msg.content), reply_to=msg)


def _dumped(sent: Contribution) -> dict[str, list[np.ndarray]]:
    arrays = (
        {"release": [sent.values]}
        if isinstance(sent, Release)
        else {"gen": sent.gen, "disc": sent.disc}
    )
    return {**arrays, "weight": [np.asarray(sent.weight)]}
