"""`fedgan demo`: a whole federation on this machine, from nothing to a
trained generator, through the real mutual-TLS chain."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgan import pki
from fedgan.aggregator.run_store import RunOutputs, kept_rounds
from fedgan.config.appbundle import default_run_config, stage_app_dir, write_run_config
from fedgan.deploy.local import LocalFederation, SiteSpec
from fedgan.errors import FedGanError
from fedgan.progress import fit_progress, format_round
from fedgan.secagg.params import DEFAULT_MIN_SITES, required_threshold
from fedgan.silo.synth import STAND_IN_MARKER, synth_silo
from fedgan.site.approval import PolicyStore

CHANNELS = {"fundus": 3, "dicom": 1}
# `fedgan pretrain`'s defaults, measured on the stand-in set at 32 px on 2
# cores: 2,000 steps of 32 (about 90 s) draw varied fundus photographs;
# 1,000 draw nearly the same one in every tile (bench/RESULTS.md).
PRETRAIN_STEPS = 2000
PRETRAIN_BATCH = 32
# Part of the stand-in cache's key: raise it when the stand-in set or the
# pretraining recipe changes, so that no demo reuses an init made otherwise.
STANDIN_VERSION = 1


class RunFailed(FedGanError, RuntimeError):
    """The federation ran but the ServerApp did not complete."""


@dataclass
class DemoOptions:
    sites: int = 3
    rounds: int = 3
    kind: str = "fundus"
    data: list[Path] = field(default_factory=list)
    image_size: int = 32
    images_per_site: int = 256
    local_steps: int | None = None  # None: the app's default
    seed: int = 0
    out_root: Path = Path("runs")
    run_id: str | None = None
    dump_updates: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    # Per site id: extra SuperNode node config (silo options, epsilon-budget).
    node_config: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per site id: extra environment of its SuperNode.
    site_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # An earlier demo run folder to continue (same certificates, silos, ledgers).
    resume: Path | None = None
    # Start from this `fedgan pretrain` file; or, with ``pretrain``, from G and
    # D pretrained on a stand-in public fundus set (cached under
    # out_root/.cache between demos, so only the first demo pays for it).
    init: Path | None = None
    pretrain: bool = False
    pretrain_steps: int = PRETRAIN_STEPS
    standin_images: int = 2000  # in the stand-in public set
    # site-1 keeps images out of training and evaluates the run on them.
    evaluate: bool = False

    def __post_init__(self) -> None:
        if self.resume is not None:
            return  # everything else comes from the run being resumed
        if self.kind not in CHANNELS:
            raise ValueError(f"--kind {self.kind!r} is not supported; use fundus or dicom")
        if self.data and len(self.data) != self.sites:
            self.sites = len(self.data)
        if self.sites < 1 or self.rounds < 1:
            raise ValueError("--sites and --rounds must be at least 1")
        secagg = self.extra_config.get("secagg", default_run_config()["secagg"])
        if self.sites < 2 and secagg:
            raise ValueError(
                "secure aggregation needs at least 2 sites (a sum of one update is that update); "
                "use --sites 2 or more, or --config secagg=false"
            )
        for d in self.data:
            if not Path(d).is_dir():
                raise ValueError(f"--data {d} is not a directory")
        if self.init is not None and self.pretrain:
            raise ValueError("--init names a pretrained file; leave out --pretrain")
        if self.pretrain and self.kind != "fundus":
            raise ValueError(
                "the stand-in public set is fundus only; for --kind dicom pretrain with "
                "`fedgan pretrain --data PUBLIC_DICOM` and pass --init"
            )
        if self.evaluate and self.data:
            raise ValueError("--evaluate holds out synthetic images; leave out --data")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs with TOML values (``dp=false``, ``target-epsilon=4.0``),
    checked against the app's run-config keys."""
    import tomllib

    known = default_run_config()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(
                f"--config {item!r}: use KEY=VALUE with KEY one of {', '.join(sorted(known))}"
            )
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string
        if isinstance(known[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # Flower keeps the default's type
        out[key] = value
    return out


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def prepare(opts: DemoOptions, run_dir: Path, say: Callable[[str], None]) -> list[SiteSpec]:
    """Certificates and (unless given) synthetic silos for the demo's sites."""
    site_ids = [f"site-{i + 1}" for i in range(opts.sites)]
    certs = run_dir / "certs"
    pki.init_ca(certs, "FedGAN demo consortium", days=30)
    pki.issue_aggregator(certs, [], days=30)
    for site_id in site_ids:
        pki.issue_site(certs, site_id, days=30)
    # One place makes every key: the demo plays the CA and every hospital.
    say(
        f"certificates  {certs} (CA, aggregator, {len(site_ids)} sites, CRL; "
        "staging: every key made here)"
    )
    specs = []
    for i, site_id in enumerate(site_ids):
        if opts.data:
            data = Path(opts.data[i]).resolve()
        else:
            data = synth_silo(
                run_dir / "silos" / site_id,
                opts.kind,
                opts.images_per_site,
                seed=opts.seed * 1000 + i,
                size=64,
            )
        specs.append(
            SiteSpec(
                site_id,
                data,
                opts.kind,
                # Test mode needs the sites' consent too (their node config).
                opts.node_config.get(site_id, {})
                | ({"dump-updates": "true"} if opts.dump_updates else {}),
                opts.site_env.get(site_id, {}),
            )
        )
    if not opts.data:
        per_site = f"{opts.images_per_site} {opts.kind} images per site"
        say(f"silos         {run_dir / 'silos'} ({per_site})")
    if opts.evaluate:
        held = held_out_dir(run_dir)
        synth_silo(held, opts.kind, HELD_OUT, seed=opts.seed * 1000 + 999, size=64)
        say(f"held out      {held} ({HELD_OUT} images site-1 never trains on, to evaluate with)")
    return specs


# site-1's images kept out of training: the membership attacks need 20 a side.
HELD_OUT = 64


def held_out_dir(run_dir: Path) -> Path:
    return run_dir / "silos" / "site-1-held-out"


def standin_init(opts: DemoOptions, config: dict[str, Any], say: Callable[[str], None]) -> Path:
    """G and D pretrained on a stand-in public fundus set, for the run's model
    shape; cached under out_root/.cache, keyed by everything it depends on."""
    import hashlib

    from fedgan.config.run import ConfigError, RunSettings
    from fedgan.model_init import FORMAT, load_init

    spec = RunSettings.from_run_config(config).spec
    cache = Path(opts.out_root).resolve() / ".cache"
    recipe = [
        dataclasses.asdict(spec),
        config["classes"],
        opts.pretrain_steps,
        PRETRAIN_BATCH,
        opts.standin_images,
        opts.seed,
        FORMAT,
        STANDIN_VERSION,
    ]
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"standin-init-{key}.pt"
    if path.exists():
        try:
            load_init(path, spec)
        except ConfigError as exc:
            say(f"init          cached {path} unusable ({exc}); pretraining again")
        else:
            say(f"init          {path} (cached; pretrained on a stand-in public set)")
            return path
    from fedgan.pretrain import pretrain_to_file

    public = cache / f"standin-public-fundus-{opts.standin_images}"
    if not (public / STAND_IN_MARKER).exists():
        synth_silo(public, "fundus", opts.standin_images, seed=10_000, size=64, profile="public")
    say(
        f"init          pretraining on a stand-in public set ({opts.standin_images} images from "
        f"another camera, {public}); once, then cached"
    )
    pretrain_to_file(
        public,
        "fundus",
        spec,
        config["classes"],
        path,
        steps=opts.pretrain_steps,
        batch_size=PRETRAIN_BATCH,
        seed=opts.seed,
        say=say,
    )
    return path


def run_config(opts: DemoOptions, run_dir: Path) -> dict[str, Any]:
    config = default_run_config()
    config.update(
        {
            "num-server-rounds": opts.rounds,
            "image-size": opts.image_size,
            "channels": CHANNELS[opts.kind],
            "seed": opts.seed,
            "run-dir": str(run_dir),
            "dump-updates": opts.dump_updates,
            "min-sites": opts.sites,
            # The demo's CA re-signs this file on `fedgan pki revoke`; the
            # ServerApp sends it with every secure round's setup.
            "secagg-crl": str(run_dir / "certs" / "ca" / "crl.pem"),
            "secagg-membership": str(run_dir / "certs" / "ca" / "membership.json"),
        }
    )
    if opts.local_steps is not None:
        config["local-steps"] = opts.local_steps
    config.update(opts.extra_config)
    return config


class RoundPrinter:
    """Prints each round as its line lands in metrics.jsonl, and the progress
    of a mean-embedding fit as it lands in the ServerApp's log."""

    def __init__(
        self, metrics: Path, rounds: int, say: Callable[[str], None], log: Path | None = None
    ) -> None:
        self.metrics, self.rounds, self.say, self.log = metrics, rounds, say, log
        # A resumed run prints only its new rounds and log lines.
        self.seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        self.log_offset = log.stat().st_size if log is not None and log.exists() else 0

    def _log_lines(self) -> list[str]:
        """Whole lines added to the log since the last poll."""
        if self.log is None or not self.log.exists():
            return []
        with self.log.open("rb") as fh:
            fh.seek(self.log_offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.log_offset += len(complete)
        return complete.decode("utf-8", "replace").splitlines()

    def __call__(self) -> None:
        for line in self._log_lines():
            if (progress := fit_progress(line)) is not None:
                self.say(progress)
        if not self.metrics.exists():
            return
        lines = self.metrics.read_text().splitlines()
        for line in lines[self.seen :]:
            for text in format_round(json.loads(line), self.rounds):
                self.say(text)
        self.seen = len(lines)


def _resume_sites(run_dir: Path) -> list[SiteSpec]:
    """The sites of an earlier demo run, from its deployment map."""
    path = run_dir / "deployment.json"
    progress = (run_dir / "checkpoint.pt").exists() or kept_rounds(run_dir)
    if not path.exists() or not progress:
        raise FileNotFoundError(
            f"{run_dir} holds no demo run to resume (deployment.json, and checkpoint.pt "
            "or a kept release_round_NNN.npz)"
        )
    sites = json.loads(path.read_text())["sites"]
    return [
        SiteSpec(site_id, Path(s["data_dir"]), s["kind"], dict(s.get("node_config", {})))
        for site_id, s in sites.items()
    ]


def evaluate_site_1(run_dir: Path, kind: str, init: str | None, say: Callable[[str], None]) -> Path:
    """What a hospital would do next: site-1 measures the run on its own
    images and on those it held out (quality, against the model the
    federation started from; the membership attacks). Numbers only; the
    report includes them."""
    from fedgan.evaluate.site import evaluate

    say("evaluating    at site-1, on its own images and the ones it held out")
    return evaluate(
        run_dir,
        run_dir / "silos" / "site-1",
        kind,
        site_id="site-1",
        holdout=held_out_dir(run_dir),
        n_synthetic=256,
        encoder_steps=200,
        classifier_seeds=1,
        start=Path(init) if init else None,
        say=lambda line: say("  " + line),
    )


def demo_site_limits(config: dict, sites: int) -> tuple[dict[str, object], str]:
    """The site limits a demo must relax for its own settings: runs without
    DP or secure aggregation, fewer than three sites in a sum, or a threshold
    below the sites' default rule. (limits, what the demo tells the user)."""
    limits: dict[str, object] = {}
    said = []
    if not config.get("dp", True):
        limits["require_dp"] = False
        said.append("allow runs without DP (--allow-no-dp)")
    if not config.get("secagg", True):
        limits["require_secure_aggregation"] = False
        said.append("answer rounds without secure aggregation (--allow-no-secagg)")
    else:
        # The fewest sites a round samples (fraction-sites of those available).
        fewest = max(2, math.ceil(float(config.get("fraction-sites", 1.0)) * sites))
        if fewest < DEFAULT_MIN_SITES:
            limits["min_sites"] = fewest
            said.append(f"join sums of {fewest} sites (--min-sites {fewest})")
        threshold = int(config.get("secagg-threshold", 0) or 0)
        if threshold and threshold < required_threshold(sites):
            limits["colluding_sites"] = 0
            said.append(f"accept threshold {threshold} of {sites} (--colluding-sites 0)")
    return limits, "; ".join(said) + (" (fedgan site policy)" if said else "")


def run_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> Path:
    if opts.resume is not None:
        run_dir = Path(opts.resume).resolve()
        sites = _resume_sites(run_dir)
        config = tomllib.loads((run_dir / "run-config.toml").read_text())
        config.update({"num-server-rounds": opts.rounds, "resume": True, **opts.extra_config})
        say(f"resume        {run_dir} up to round {opts.rounds}")
    else:
        run_dir = (Path(opts.out_root) / (opts.run_id or new_run_id())).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} exists and is not empty; choose another --run-id")
        run_dir.mkdir(parents=True, exist_ok=True)
        say(f"run           {run_dir}")
        sites = prepare(opts, run_dir, say)
        config = run_config(opts, run_dir)
        relaxed, _ = demo_site_limits(config, len(sites))
        # The consortium's list says what the demo's sites accept, too.
        min_sites, colluding = relaxed.get("min_sites"), relaxed.get("colluding_sites")
        listed = pki.write_membership(
            run_dir / "certs",
            days=30,
            min_sites=min_sites if isinstance(min_sites, int) else DEFAULT_MIN_SITES,
            colluding=colluding if isinstance(colluding, int) else None,
        )
        say(f"membership    version {listed.version}: {', '.join(sorted(listed.sites))}")
        init = opts.init.resolve() if opts.init else None
        if opts.pretrain:
            init = standin_init(opts, config, say)
        if init is not None:
            config["model-init"] = str(init)
    app_dir = stage_app_dir(run_dir / "app")
    config_path = write_run_config(run_dir / "run-config.toml", config)
    outputs = RunOutputs(run_dir)
    with LocalFederation(run_dir, run_dir / "certs", sites) as fed:
        relaxed, why = demo_site_limits(config, len(sites))
        if relaxed:
            # The demo plays the hospitals too: their default policy refuses
            # what this demo asks for, so it allows it here, and says so.
            for site in sites:
                PolicyStore(fed.site_work_dir(site.site_id), site.site_id).update(**relaxed)
            say(f"sites         {why}")
        fed.start(progress=say)
        say(f"deployment    {run_dir / 'deployment.json'}")
        shape = f"{opts.image_size}px {opts.kind}"
        modes = ", ".join(
            f"{name} {'on' if config.get(key) else 'off'}"
            for name, key in (("DP", "dp"), ("secure aggregation", "secagg"))
        )
        say(f"training      {opts.rounds} rounds, {len(sites)} sites, {shape}; {modes}")
        printer = RoundPrinter(outputs.metrics_path, opts.rounds, say, fed.logs / "flwr-run.log")
        fed.run(app_dir, config_path, on_poll=printer)
    status = json.loads(outputs.status_path.read_text()) if outputs.status_path.exists() else {}
    if status.get("status") != "completed":
        reason = status.get("reason", "the ServerApp left no status")
        raise RunFailed(f"the run did not complete: {reason}; see {run_dir / 'logs'}")
    from fedgan.report import write as write_report

    if opts.evaluate:
        evaluate_site_1(run_dir, opts.kind, config.get("model-init") or None, say)
    report = write_report(run_dir)
    say("outputs")
    listed = (
        ("report", report, report),
        ("generator", outputs.generator_path, outputs.generator_path),
        (
            "samples",
            f"{run_dir}/samples_round_*.png",
            next(run_dir.glob("samples_round_*.png"), None),
        ),
        ("metrics", outputs.metrics_path, outputs.metrics_path),
        ("logs", run_dir / "logs", run_dir / "logs"),
    )
    for name, shown, path in listed:
        if path is not None and Path(path).exists():  # only what the run left
            say(f"  {name:<11} {shown}")
    return run_dir
