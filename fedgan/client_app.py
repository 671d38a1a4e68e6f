"""The site's ClientApp: translate Flower messages into a call of
`fedgan.site_round.run_round` and its outcome back into a reply."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgan import wire
from fedgan.outputs import RunOutputs
from fedgan.run_config import SiteSettings
from fedgan.site_round import run_round

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
    site = SiteSettings.from_node_config(context.node_config)
    global_gen, global_disc, cfg = wire.read_train_request(msg.content)
    run_id = str(msg.metadata.run_id)
    outcome = run_round(site, dict(context.node_config), run_id, cfg, global_gen, global_disc)
    if outcome.update is None:
        refusal = outcome.refusal
        assert refusal is not None
        return Message(
            wire.budget_reply(site.site_id, refusal.spent, refusal.after, refusal.budget),
            reply_to=msg,
        )
    if bool(cfg.get("dump-updates", False)):
        # Test mode: keep exactly what is sent, so a test can recompute the
        # server's average from the sites' side.
        RunOutputs(Path(site.work_dir) / "dumps" / run_id).dump_arrays(
            int(cfg["round"]),
            "update",
            {
                "gen": outcome.update.gen,
                "disc": outcome.update.disc,
                "weight": [np.asarray(outcome.update.weight)],
            },
        )
    return Message(wire.train_reply(outcome.update, site.site_id, outcome.metrics), reply_to=msg)
