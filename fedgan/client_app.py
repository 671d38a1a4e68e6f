"""The site's ClientApp: translate Flower messages into calls of the silo
reader, the trainer and the update path. Nothing else lives here."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgan import wire
from fedgan.gan.models import GanSpec, build
from fedgan.outputs import RunOutputs
from fedgan.run_config import SiteSettings
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.train import TrainConfig, train_local
from fedgan.update import make_update
from fedgan.weights import get_arrays, set_arrays

log = logging.getLogger("fedgan.site")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
app = ClientApp()


def _images(site: SiteSettings, opts: SiloOptions) -> torch.Tensor:
    """The site's images, through the preprocessing cache in its work dir
    (each round runs in a fresh ClientApp process). Logs counts only."""
    data = load_silo(Path(site.data_dir), opts, cache_dir=Path(site.work_dir) / "cache")
    report = data.report
    if report.images == 0:
        raise SiloError(
            f"site {site.site_id}: no usable image in its silo "
            f"({len(report.skipped)} files skipped); run `fedgan silo check` at the site"
        )
    log.info(
        "site %s: %d images (%s), %d files skipped",
        site.site_id,
        report.images,
        "cached" if report.cached else "read",
        len(report.skipped),
    )
    return torch.from_numpy(data.as_float())


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = SiteSettings.from_node_config(context.node_config)
    log.info("site %s: train message received", site.site_id)
    global_gen, global_disc, cfg = wire.read_train_request(msg.content)
    spec = GanSpec(
        image_size=int(cfg["image-size"]),
        channels=int(cfg["channels"]),
        latent_dim=int(cfg["latent-dim"]),
        width=int(cfg["width"]),
    )
    gen, disc = build(spec)
    set_arrays(gen, global_gen)
    set_arrays(disc, global_disc)
    images = _images(
        site,
        SiloOptions.from_mapping(site.kind, spec.image_size, spec.channels, context.node_config),
    )
    result = train_local(
        gen,
        disc,
        images,
        TrainConfig(
            local_steps=int(cfg["local-steps"]),
            batch_size=int(cfg["batch-size"]),
            lr_g=float(cfg["lr-g"]),
            lr_d=float(cfg["lr-d"]),
            seed=int(cfg["seed"]),
        ),
        device=site.device,
    )
    update = make_update(
        get_arrays(gen), get_arrays(disc), global_gen, global_disc, result.examples
    )
    server_round = int(cfg["round"])
    if bool(cfg.get("dump-updates", False)):
        # Test mode: keep exactly what is sent, so a test can recompute the
        # server's average from the sites' side.
        RunOutputs(Path(site.work_dir) / "dumps" / str(msg.metadata.run_id)).dump_arrays(
            server_round,
            "update",
            {"gen": update.gen, "disc": update.disc, "weight": [np.asarray(update.weight)]},
        )
    log.info(
        "site %s round %d: %d steps on %d images in %.1f s",
        site.site_id,
        server_round,
        result.steps,
        result.examples,
        result.seconds,
    )
    return Message(
        wire.train_reply(
            update,
            site.site_id,
            {"g-loss": result.g_loss, "d-loss": result.d_loss, "train-seconds": result.seconds},
        ),
        reply_to=msg,
    )
