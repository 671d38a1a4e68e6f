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
from fedgan.silo import load_images
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

_IMAGE_CACHE: dict[tuple[str, str, int, int], torch.Tensor] = {}


def _images(site: SiteSettings, size: int, channels: int) -> torch.Tensor:
    key = (site.data_dir, site.kind, size, channels)
    if key not in _IMAGE_CACHE:
        _IMAGE_CACHE[key] = torch.from_numpy(
            load_images(Path(site.data_dir), site.kind, size, channels)
        )
    return _IMAGE_CACHE[key]


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
    images = _images(site, spec.image_size, spec.channels)
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
