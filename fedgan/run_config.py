"""The run's configuration as the ServerApp and ClientApps read it.

Flower hands both sides a flat mapping (``[tool.flwr.app.config]`` plus the
operator's overrides). It is parsed once, here, into typed settings; a bad
value is reported with its key so the operator can fix the right line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedgan.errors import FedGanError
from fedgan.gan.models import GanSpec
from fedgan.train import TrainConfig


class ConfigError(FedGanError, ValueError):
    """A run-config or node-config value is missing or invalid."""


def _get(cfg: Mapping[str, Any], key: str, kind: type) -> Any:
    # Flower merges the app's defaults ([tool.flwr.app.config]) with the
    # operator's overrides, so a missing key means a mismatched app config.
    if key not in cfg:
        raise ConfigError(f"run config key '{key}' is missing from [tool.flwr.app.config]")
    value = cfg[key]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"run config key '{key}' = {value!r} is not a valid {kind.__name__}"
        ) from None


@dataclass(frozen=True)
class RunSettings:
    rounds: int
    spec: GanSpec
    train: TrainConfig
    run_dir: str
    dump_updates: bool
    round_timeout: float
    min_sites: int

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        rounds = _get(cfg, "num-server-rounds", int)
        if rounds < 1:
            raise ConfigError("run config key 'num-server-rounds' must be >= 1")
        min_sites = _get(cfg, "min-sites", int)
        if min_sites < 1:
            raise ConfigError("run config key 'min-sites' must be >= 1")
        try:
            spec = GanSpec(
                image_size=_get(cfg, "image-size", int),
                channels=_get(cfg, "channels", int),
                latent_dim=_get(cfg, "latent-dim", int),
                width=_get(cfg, "width", int),
            )
            train = TrainConfig(
                local_steps=_get(cfg, "local-steps", int),
                batch_size=_get(cfg, "batch-size", int),
                lr_g=_get(cfg, "lr-g", float),
                lr_d=_get(cfg, "lr-d", float),
                seed=_get(cfg, "seed", int),
            )
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"run config: {exc}") from None
        return cls(
            rounds=rounds,
            spec=spec,
            train=train,
            run_dir=_get(cfg, "run-dir", str),
            dump_updates=_get(cfg, "dump-updates", bool),
            round_timeout=_get(cfg, "round-timeout", float),
            min_sites=min_sites,
        )

    def round_config(self, server_round: int) -> dict[str, int | float | bool]:
        """What a site needs to train one round (sent in the train message)."""
        return {
            "round": server_round,
            "image-size": self.spec.image_size,
            "channels": self.spec.channels,
            "latent-dim": self.spec.latent_dim,
            "width": self.spec.width,
            "local-steps": self.train.local_steps,
            "batch-size": self.train.batch_size,
            "lr-g": self.train.lr_g,
            "lr-d": self.train.lr_d,
            # Each site and round draws different batches and noise.
            "seed": self.train.seed * 100_003 + server_round,
            "dump-updates": self.dump_updates,
        }


@dataclass(frozen=True)
class SiteSettings:
    """A SuperNode's own settings (``--node-config``): what the site decides,
    not the operator."""

    site_id: str
    data_dir: str
    kind: str
    work_dir: str
    device: str

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> SiteSettings:
        missing = [k for k in ("site-id", "data-dir", "kind", "work-dir") if k not in cfg]
        if missing:
            raise ConfigError(
                f"node config is missing {', '.join(missing)}; start the SuperNode with "
                '--node-config \'site-id="..." data-dir="..." kind="fundus" work-dir="..."\''
            )
        return cls(
            site_id=str(cfg["site-id"]),
            data_dir=str(cfg["data-dir"]),
            kind=str(cfg["kind"]),
            work_dir=str(cfg["work-dir"]),
            device=str(cfg.get("device", "cpu")),
        )
