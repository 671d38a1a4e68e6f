"""The run's configuration as the ServerApp and ClientApps read it.

Flower hands both sides a flat mapping (``[tool.flwr.app.config]`` plus the
operator's overrides). It is parsed once, here, into typed settings; a bad
value is reported with its key so the operator can fix the right line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedgan.config.model import GanSpec
from fedgan.config.training import TrainConfig
from fedgan.errors import FedGanError

if TYPE_CHECKING:
    from fedgan.config.round import RoundConfig


class ConfigError(FedGanError, ValueError):
    """A run-config or node-config value is missing or invalid."""


# G's learning rate when the run leaves it to us (lr-g = 0): from random
# weights DCGAN's; fine-tuning a pretrained G under DP, ten times less, so
# that G follows the noised D slowly (bench/RESULTS.md, "pretraining").
LR_G_FROM_SCRATCH = 2e-4
LR_G_FROM_INIT = 2e-5


def g_learning_rate(cfg: Mapping[str, Any]) -> float:
    lr = _get(cfg, "lr-g", float)
    if lr < 0:
        raise ConfigError("run config key 'lr-g' must be >= 0 (0: chosen from model-init)")
    if lr > 0:
        return lr
    return LR_G_FROM_INIT if _get(cfg, "model-init", str) else LR_G_FROM_SCRATCH


# A site's lifetime ε budget unless it sets `epsilon-budget` itself; auditors
# are warned above 10.
DEFAULT_EPSILON_BUDGET = 10.0


def device_setting(requested: str) -> str:
    requested = requested.strip().lower()
    if requested not in ("auto", "cpu") and not requested.startswith("cuda"):
        raise ConfigError(f"device {requested!r} is not supported; use auto, cpu or cuda[:N]")
    return requested


def _precision(cfg: Mapping[str, Any]) -> str:
    value = str(os.environ.get("FEDGAN_PRECISION") or cfg.get("precision", "fp32"))
    if value not in ("fp32", "bf16"):
        raise ConfigError(f"node config key 'precision' = {value!r}; use fp32 or bf16")
    return value


def _node_float(cfg: Mapping[str, Any], key: str, default: float) -> float:
    try:
        value = float(cfg.get(key, default))
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key}={cfg.get(key)!r} is not a number") from None
    if not value > 0:
        raise ConfigError(f"node config {key} must be > 0")
    return value


def _site_delta(cfg: Mapping[str, Any]) -> float:
    raw = cfg.get("delta", 0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value < 1:
        raise ConfigError(
            f"node config delta={raw!r}: give a number in [0, 1), e.g. 1e-6 "
            "(0: min(1e-5, 1/(10 n)) from the silo's size n)"
        )
    return value


def _get(cfg: Mapping[str, Any], key: str, kind: type, where: str = "run config") -> Any:
    # Flower merges the app's defaults ([tool.flwr.app.config]) with the
    # operator's overrides, so a missing key means a mismatched app config.
    if key not in cfg:
        fix = (
            "is missing from [tool.flwr.app.config]"
            if where == "run config"
            else "is missing; the aggregator runs another FedGAN version than this site"
        )
        raise ConfigError(f"{where} key '{key}' {fix}")
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
            f"{where} key '{key}' = {value!r} is not a valid {kind.__name__}"
        ) from None


def parse_classes(text: str) -> tuple[str, ...]:
    classes = tuple(c.strip() for c in text.split(",") if c.strip())
    if len(set(classes)) != len(classes):
        raise ConfigError(f"run config key 'classes' = {text!r} names a class twice")
    return classes


@dataclass(frozen=True)
class PrivacySettings:
    """The operator's DP request. The site enforces its own ε budget."""

    enabled: bool
    noise_multiplier: float
    target_epsilon: float
    max_grad_norm: float
    delta: float
    accountant: str
    update_clip: float
    # "dp-sgd": DP-SGD on D every round; "mean-embedding": one noisy release
    # per site, G fitted at the aggregator (fedgan.privacy.mean_embedding).
    mechanism: str = "dp-sgd"
    embedding_features: int = 4000
    embedding_length_scale: float = 0.3
    embedding_fit_steps: int = 1500
    embedding_fit_lr: float = 1e-3

    @property
    def mean_embedding(self) -> bool:
        return self.mechanism == "mean-embedding"

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any], where: str = "run config") -> PrivacySettings:
        """``where``: "run config" at the aggregator, "round config" at a site,
        which is not sent the aggregator's own fit settings."""
        fit = (
            {
                "embedding_fit_steps": _get(cfg, "embedding-fit-steps", int, where),
                "embedding_fit_lr": _get(cfg, "embedding-fit-lr", float, where),
            }
            if where == "run config"
            else {}
        )
        s = cls(
            enabled=_get(cfg, "dp", bool, where),
            noise_multiplier=_get(cfg, "noise-multiplier", float, where),
            target_epsilon=_get(cfg, "target-epsilon", float, where),
            max_grad_norm=_get(cfg, "max-grad-norm", float, where),
            delta=_get(cfg, "delta", float, where),
            accountant=_get(cfg, "accountant", str, where),
            update_clip=_get(cfg, "update-clip", float, where),
            mechanism=_get(cfg, "mechanism", str, where),
            embedding_features=_get(cfg, "embedding-features", int, where),
            embedding_length_scale=_get(cfg, "embedding-length-scale", float, where),
            **fit,
        )
        if s.accountant not in ("prv", "rdp"):
            raise ConfigError(f"run config key 'accountant' = {s.accountant!r}; use prv or rdp")
        if s.mechanism not in ("dp-sgd", "mean-embedding"):
            raise ConfigError(
                f"run config key 'mechanism' = {s.mechanism!r}; use dp-sgd or mean-embedding"
            )
        if min(s.embedding_features, s.embedding_fit_steps) < 1 or not (
            s.embedding_length_scale > 0 and s.embedding_fit_lr > 0
        ):
            raise ConfigError(
                "run config keys 'embedding-features', 'embedding-length-scale', "
                "'embedding-fit-steps' and 'embedding-fit-lr' must be > 0"
            )
        if s.enabled and s.noise_multiplier <= 0 and s.target_epsilon <= 0:
            raise ConfigError(
                "run config: with dp = true set 'noise-multiplier' > 0 or 'target-epsilon' > 0"
            )
        if s.max_grad_norm <= 0:
            raise ConfigError("run config key 'max-grad-norm' must be > 0")
        if not 0 <= s.delta < 1:
            raise ConfigError("run config key 'delta' must be in [0, 1)")
        return s

    def as_config(self) -> dict[str, int | float | bool | str]:
        return {
            "dp": self.enabled,
            "noise-multiplier": self.noise_multiplier,
            "target-epsilon": self.target_epsilon,
            "max-grad-norm": self.max_grad_norm,
            "delta": self.delta,
            "accountant": self.accountant,
            "update-clip": self.update_clip,
            "mechanism": self.mechanism,
            "embedding-features": self.embedding_features,
            "embedding-length-scale": self.embedding_length_scale,
        }


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of the sites' updates (docs/security.md)."""

    enabled: bool
    bits: int
    threshold: int  # 0: ⌊2n/3⌋ + 1 of the sites sampled in the round
    value_range: float  # 0: from update-clip, the learning rates and the steps
    stage_timeout: float
    crl: str = ""  # the consortium CRL to send with each round's setup ("": none)
    membership: str = ""  # the membership list to send likewise ("": none)

    @classmethod
    def from_run_config(
        cls, cfg: Mapping[str, Any], update_clip: float, local_epochs: float
    ) -> SecAggSettings:
        s = cls(
            enabled=_get(cfg, "secagg", bool),
            bits=_get(cfg, "secagg-bits", int),
            threshold=_get(cfg, "secagg-threshold", int),
            value_range=_get(cfg, "secagg-range", float),
            stage_timeout=_get(cfg, "secagg-timeout", float),
            crl=str(cfg.get("secagg-crl", "")),
            membership=str(cfg.get("secagg-membership", "")),
        )
        if s.bits not in (8, 12, 16):
            raise ConfigError(f"run config key 'secagg-bits' = {s.bits}; use 8, 12 or 16")
        if s.threshold < 0 or s.value_range < 0 or s.stage_timeout <= 0:
            raise ConfigError(
                "run config keys 'secagg-threshold' and 'secagg-range' must be >= 0 and "
                "'secagg-timeout' > 0"
            )
        if s.enabled and s.value_range == 0 and update_clip <= 0 and local_epochs > 0:
            raise ConfigError(
                "run config: secure aggregation needs a value range; set 'update-clip' > 0 "
                "or 'local-steps' (the range follows from them) or 'secagg-range' > 0"
            )
        return s

    def value_range_for(
        self, length: int, update_clip: float, max_lr: float, local_steps: int | None
    ) -> float:
        """Per-value clipping range, from what the server knows without data.
        With ‖Δ‖ ≤ C at most C²/r² values can exceed r, so r = 8C/√P clips
        at most P/64 of them. Adam moves a weight by about lr per step (at
        most ~3·lr on a gradient spike), so after s local steps |Δ| ≲ 2·lr·s
        is the tighter bound when the steps are known. Sites report the
        fraction they clipped."""
        if self.value_range:
            return self.value_range
        bounds = []
        if update_clip > 0:
            bounds.append(8.0 * update_clip / length**0.5)
        if local_steps:
            bounds.append(2.0 * max_lr * local_steps)
        return min(bounds)


@dataclass(frozen=True)
class RunSettings:
    rounds: int
    spec: GanSpec
    train: TrainConfig
    run_dir: str
    dump_updates: bool
    round_timeout: float
    min_sites: int
    privacy: PrivacySettings
    strategy: str
    prox_mu: float
    fraction_sites: float
    resume: bool
    classes: tuple[str, ...]
    attributes: str  # the declaration, e.g. "age=0:100,sex=F|M" (fedgan.attributes)
    cond_lambda: float
    local_epochs: float
    secagg: SecAggSettings
    # A `fedgan pretrain` init file at the aggregator ("": random weights).
    model_init: str = ""

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        rounds = _get(cfg, "num-server-rounds", int)
        if rounds < 1:
            raise ConfigError("run config key 'num-server-rounds' must be >= 1")
        min_sites = _get(cfg, "min-sites", int)
        if min_sites < 1:
            raise ConfigError("run config key 'min-sites' must be >= 1")
        from fedgan.attributes import AttributesError

        for key in ("cond-lambda", "mode-seeking"):
            if _get(cfg, key, float) < 0:
                raise ConfigError(f"run config key '{key}' must be >= 0")
        try:
            spec = GanSpec.declared(
                image_size=_get(cfg, "image-size", int),
                channels=_get(cfg, "channels", int),
                latent_dim=_get(cfg, "latent-dim", int),
                width=_get(cfg, "width", int),
                classes=parse_classes(_get(cfg, "classes", str)),
                attributes=_get(cfg, "attributes", str),
            )
            train = TrainConfig(
                local_steps=_get(cfg, "local-steps", int),
                batch_size=_get(cfg, "batch-size", int),
                lr_g=g_learning_rate(cfg),
                lr_d=_get(cfg, "lr-d", float),
                seed=_get(cfg, "seed", int),
                mode_seeking=_get(cfg, "mode-seeking", float),
                d_steps_per_g=_get(cfg, "d-steps-per-g", int),
                adaptive_d=_get(cfg, "adaptive-d", float),
                g_ema=_get(cfg, "g-ema", float),
            )
        except ConfigError:
            raise
        except AttributesError as exc:
            raise ConfigError(str(exc)) from None
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
            privacy=PrivacySettings.from_run_config(cfg),
            strategy=_get(cfg, "strategy", str),
            prox_mu=_get(cfg, "prox-mu", float),
            fraction_sites=_get(cfg, "fraction-sites", float),
            resume=_get(cfg, "resume", bool),
            classes=parse_classes(_get(cfg, "classes", str)),
            attributes=_get(cfg, "attributes", str),
            cond_lambda=_get(cfg, "cond-lambda", float),
            local_epochs=_get(cfg, "local-epochs", float),
            secagg=SecAggSettings.from_run_config(
                cfg, _get(cfg, "update-clip", float), _get(cfg, "local-epochs", float)
            ),
            model_init=_get(cfg, "model-init", str),
        )

    def __post_init__(self) -> None:
        if self.strategy not in ("fedavg", "fedprox"):
            raise ConfigError(
                f"run config key 'strategy' = {self.strategy!r}; use fedavg or fedprox"
            )
        if self.strategy == "fedprox" and self.prox_mu <= 0:
            raise ConfigError("run config: strategy = \"fedprox\" needs 'prox-mu' > 0")
        if self.local_epochs < 0:
            raise ConfigError("run config key 'local-epochs' must be >= 0")
        if not 0 < self.fraction_sites <= 1:
            raise ConfigError("run config key 'fraction-sites' must be in (0, 1]")
        if self.privacy.mean_embedding:
            # One release per site: more rounds would only spend more budget on
            # releases of the same sums.
            if self.rounds != 1:
                raise ConfigError(
                    'run config: mechanism = "mean-embedding" releases once per site; '
                    "set 'num-server-rounds' = 1"
                )
            if self.train.d_steps_per_g != 1:
                raise ConfigError(
                    'run config: mechanism = "mean-embedding" trains no D; '
                    "set 'd-steps-per-g' = 1"
                )
            if self.attributes:
                raise ConfigError(
                    'run config: mechanism = "mean-embedding" conditions on classes only; '
                    'set \'attributes\' = "" or use mechanism = "dp-sgd"'
                )

    def secagg_range(self, length: int) -> float:
        if self.privacy.mean_embedding:
            # Sites send release / (noisy n): feature means of norm <= 1 (values
            # <= 1/√F), class fractions in [0, 1], and noise σ√2/n per value.
            return self.secagg.value_range or 1.0
        # D moves most: n_D of its steps per G step.
        steps = self.train.d_steps if self.local_epochs <= 0 else None
        lr = max(self.train.lr_g, self.train.lr_d)
        return self.secagg.value_range_for(length, self.privacy.update_clip, lr, steps)

    def round_config(
        self, server_round: int, embedding_digest: str = "", init_sha256: str = ""
    ) -> RoundConfig:
        """What a site needs to train one round (sent in the train message).
        ``init_sha256``: the weights hash of the run's `model_init`, if any."""
        from fedgan.config.round import LocalTraining, ModelShape, RoundConfig

        return RoundConfig(
            round=server_round,
            rounds=self.rounds,
            # The ledger's run id: the run folder's name, stable across resumes.
            run_name=self.run_dir.rstrip("/").rsplit("/", 1)[-1],
            model=ModelShape(
                image_size=self.spec.image_size,
                channels=self.spec.channels,
                latent_dim=self.spec.latent_dim,
                width=self.spec.width,
                classes=self.classes,
                attributes=self.attributes,
            ),
            local=LocalTraining(
                steps=self.train.local_steps,
                epochs=self.local_epochs,
                batch_size=self.train.batch_size,
                lr_g=self.train.lr_g,
                lr_d=self.train.lr_d,
                mode_seeking=self.train.mode_seeking,
                d_steps_per_g=self.train.d_steps_per_g,
                adaptive_d=self.train.adaptive_d,
                g_ema=self.train.g_ema,
                cond_lambda=self.cond_lambda,
                prox_mu=self.prox_mu if self.strategy == "fedprox" else 0.0,
                # Each site and round draws different batches and noise.
                seed=self.train.seed * 100_003 + server_round,
            ),
            privacy=self.privacy,
            # The random features' public seed (the same every round).
            embedding_seed=self.train.seed,
            embedding_digest=embedding_digest,
            dump_updates=self.dump_updates,
            init_sha256=init_sha256,
        )


@dataclass(frozen=True)
class SiteSettings:
    """A SuperNode's own settings (``--node-config``): what the site decides,
    not the operator."""

    site_id: str
    data_dir: str
    kind: str
    work_dir: str
    device: str
    epsilon_budget: float
    # bf16 autocast on CUDA: faster only for large images and batches on an
    # H100 (bench/RESULTS.md), so the site opts in.
    precision: str = "fp32"
    # Secure aggregation: the site's Ed25519 signing key and certificate, and
    # the consortium CA (and CRL) that certify its peers'.
    signing_key: str = ""
    signing_cert: str = ""
    ca_cert: str = ""
    crl: str = ""
    membership: str = ""  # the consortium's CA-signed membership list (site kit)
    # The δ this site accounts every spend at (0: min(1e-5, 1/(10 n)) from
    # its silo's size n). The site's, not the run's: ε at a larger δ is
    # smaller, so an operator choosing δ could stretch the site's budget.
    delta: float = 0.0
    # Test mode: this site writes what it sends to <work-dir>/dumps when a
    # run asks. The site's switch, never the run's alone: a raw update on
    # disk is more than the site agreed to keep.
    dump_updates: bool = False

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> SiteSettings:
        needed = ("site-id", "data-dir", "kind", "work-dir")
        missing = [k for k in needed if not str(cfg.get(k, "")).strip()]
        if missing:
            raise ConfigError(
                f"node config is missing {', '.join(missing)}; start the SuperNode with "
                '--node-config \'site-id="..." data-dir="..." kind="fundus" work-dir="..."\''
            )
        if str(cfg["kind"]) not in ("dicom", "fundus"):
            raise ConfigError(f"node config kind={cfg['kind']!r}: use dicom or fundus")
        return cls(
            site_id=str(cfg["site-id"]),
            data_dir=str(cfg["data-dir"]),
            kind=str(cfg["kind"]),
            work_dir=str(cfg["work-dir"]),
            # As requested; checked against the hardware (resolve_device)
            # where training runs.
            device=device_setting(
                os.environ.get("FEDGAN_DEVICE") or str(cfg.get("device", "auto"))
            ),
            epsilon_budget=_node_float(cfg, "epsilon-budget", DEFAULT_EPSILON_BUDGET),
            precision=_precision(cfg),
            signing_key=str(cfg.get("signing-key", "")),
            signing_cert=str(cfg.get("signing-cert", "")),
            ca_cert=str(cfg.get("ca-cert", "")),
            crl=str(cfg.get("crl", "")),
            membership=str(cfg.get("membership", "")),
            delta=_site_delta(cfg),
            dump_updates=str(cfg.get("dump-updates", "false")).strip().lower() == "true",
        )
