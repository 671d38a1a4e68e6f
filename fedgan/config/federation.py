"""`deploy/federation.yaml`: the operator's description of a run, checked
whole before anything is submitted, and turned into Flower run-config keys.

Every problem is reported with its key path (``privacy.target_epsilon: ...``)
in one error, so an operator fixes the file once, not once per run attempt.
The run-config keys stay the single source of defaults
(``[tool.flwr.app.config]`` in pyproject.toml); a key the YAML leaves out
keeps its default."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedgan.errors import FedGanError


class FederationConfigError(FedGanError):
    """federation.yaml is malformed; the message lists every problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s), nothing submitted:\n{lines}")


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(map(str, allowed))}"

    return check


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _below_one(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1) (0: off)"


def _delta(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class Field:
    key: str  # the run-config key
    kind: type
    check: Callable[[Any], str | None] | None = None


SCHEMA: dict[str, dict[str, Field]] = {
    "run": {
        "dir": Field("run-dir", str),
        "rounds": Field("num-server-rounds", int, _positive),
        "min_sites": Field("min-sites", int, _positive),
        "fraction_sites": Field("fraction-sites", float, _fraction),
        "round_timeout": Field("round-timeout", float, _positive),
        "seed": Field("seed", int, _non_negative),
    },
    "model": {
        "image_size": Field("image-size", int, _one_of(16, 32, 64, 128)),
        "channels": Field("channels", int, _one_of(1, 3)),
        "latent_dim": Field("latent-dim", int, _positive),
        "width": Field("width", int, _positive),
        "classes": Field("classes", list),
        "attributes": Field("attributes", str),
        "cond_lambda": Field("cond-lambda", float, _non_negative),
        "init": Field("model-init", str),
    },
    "training": {
        "local_steps": Field("local-steps", int, _positive),
        "d_steps_per_g": Field("d-steps-per-g", int, _positive),
        "adaptive_d": Field("adaptive-d", float, _below_one),
        "g_ema": Field("g-ema", float, _below_one),
        "local_epochs": Field("local-epochs", float, _non_negative),
        "batch_size": Field("batch-size", int, _non_negative),
        "lr_g": Field("lr-g", float, _non_negative),
        "lr_d": Field("lr-d", float, _positive),
        "mode_seeking": Field("mode-seeking", float, _non_negative),
    },
    "strategy": {
        "name": Field("strategy", str, _one_of("fedavg", "fedprox")),
        "prox_mu": Field("prox-mu", float, _non_negative),
    },
    "privacy": {
        "dp": Field("dp", bool),
        "target_epsilon": Field("target-epsilon", float, _non_negative),
        "noise_multiplier": Field("noise-multiplier", float, _non_negative),
        "max_grad_norm": Field("max-grad-norm", float, _positive),
        "delta": Field("delta", float, _delta),
        "accountant": Field("accountant", str, _one_of("prv", "rdp")),
        "update_clip": Field("update-clip", float, _non_negative),
        "mechanism": Field("mechanism", str, _one_of("dp-sgd", "mean-embedding")),
        "features": Field("embedding-features", int, _positive),
        "length_scale": Field("embedding-length-scale", float, _positive),
        "fit_steps": Field("embedding-fit-steps", int, _positive),
        "fit_lr": Field("embedding-fit-lr", float, _positive),
    },
    "secure_aggregation": {
        "enabled": Field("secagg", bool),
        "threshold": Field("secagg-threshold", int, _non_negative),
        "bits": Field("secagg-bits", int, _one_of(8, 12, 16)),
        "range": Field("secagg-range", float, _non_negative),
        "timeout": Field("secagg-timeout", float, _positive),
        "crl": Field("secagg-crl", str),
        "membership": Field("secagg-membership", str),
    },
}


def _typed(value: Any, kind: type) -> tuple[Any, str | None]:
    if kind is bool:
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, "must be a whole number")
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            # YAML's .inf and .nan: an infinite target ε or learning rate
            # would pass every "> 0" check and mean no privacy or NaN weights.
            return None, "must be a finite number"
        return (float(value), None) if ok else (None, "must be a number")
    if kind is str:
        return (value, None) if isinstance(value, str) else (None, "must be text")
    if kind is list:
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            return [str(v) for v in value], None
        return None, "must be a list of names, e.g. [normal, abnormal]"
    raise AssertionError(kind)


def parse(document: Any, path: Path) -> dict[str, Any]:
    """Run-config overrides from a loaded YAML document, or every problem."""
    problems: list[str] = []
    if not isinstance(document, dict):
        raise FederationConfigError(path, ["the file must be a mapping of sections"])
    config: dict[str, Any] = {}
    for section, body in document.items():
        if section not in SCHEMA:
            problems.append(f"{section}: unknown section (known: {', '.join(SCHEMA)})")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: must be a mapping of keys")
            continue
        for key, value in body.items():
            where = f"{section}.{key}"
            spec = SCHEMA[section].get(key)
            if spec is None:
                problems.append(f"{where}: unknown key (known: {', '.join(SCHEMA[section])})")
                continue
            typed, why = _typed(value, spec.kind)
            if why is None and spec.check is not None:
                why = spec.check(typed)
            if why is not None:
                problems.append(f"{where}: {value!r} {why}")
                continue
            config[spec.key] = ",".join(typed) if spec.kind is list else typed
    problems += _cross_checks(document, config)
    if problems:
        raise FederationConfigError(path, problems)
    return config


def _cross_checks(document: dict, config: dict[str, Any]) -> list[str]:
    """Rules across keys, named by the key an operator would change."""
    problems = []
    if config.get("strategy") == "fedprox" and config.get("prox-mu", 0) <= 0:
        problems.append("strategy.prox_mu: fedprox needs prox_mu > 0")
    privacy = document.get("privacy") or {}
    if (
        config.get("dp", True)
        and isinstance(privacy, dict)
        and config.get("noise-multiplier", 0) == 0
        and config.get("target-epsilon", 1) == 0
    ):
        problems.append("privacy.target_epsilon: with dp on, set it or noise_multiplier > 0")
    if config.get("mechanism") == "mean-embedding":
        if config.get("num-server-rounds", 3) != 1:
            problems.append("run.rounds: mechanism mean-embedding releases once; set rounds: 1")
        if config.get("attributes"):
            problems.append("model.attributes: mechanism mean-embedding conditions on classes only")
    if config.get("attributes"):
        from fedgan.attributes import AttributesError, parse

        try:
            parse(config["attributes"])
        except AttributesError as exc:
            problems.append(f"model.attributes: {exc}".replace("run config 'attributes': ", ""))
    classes = config.get("classes", "")
    if classes and len(set(classes.split(","))) != len(classes.split(",")):
        problems.append("model.classes: a class is named twice")
    return problems


def load(path: Path) -> dict[str, Any]:
    """Run-config overrides from a federation.yaml file."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FederationConfigError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FederationConfigError(path, [f"cannot be read ({type(exc).__name__})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise FederationConfigError(path, [f"{where}not valid YAML"]) from None
    config = parse(document, path)
    if config.get("model-init"):
        # Relative to the file that names it, as an operator reads it.
        config["model-init"] = str((path.parent / config["model-init"]).resolve())
    for key in ("secagg-crl", "secagg-membership"):
        if config.get(key):
            config[key] = str((path.parent / config[key]).resolve())
    return config
