"""The `fedgan` command. Every subcommand exits non-zero with a one-line
reason on bad input; tracebacks are for bugs, not for operators."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedgan import pki
from fedgan.config.run import DEFAULT_EPSILON_BUDGET

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="FedGAN: federated, differentially private GAN training for medical images.",
)
pki_app = typer.Typer(no_args_is_help=True, help="The consortium PKI: CA, certificates, CRL.")
silo_app = typer.Typer(no_args_is_help=True, help="Hospital image silos.")
app.add_typer(pki_app, name="pki")
app.add_typer(silo_app, name="silo")
audit_app = typer.Typer(help="For auditors: what protects the data, and the audit log.")
app.add_typer(audit_app, name="audit")
site_app = typer.Typer(
    no_args_is_help=True,
    help="At a hospital: which app bundles and run settings this site accepts.",
)
app.add_typer(site_app, name="site")
container_app = typer.Typer(
    no_args_is_help=True,
    help="Entrypoints of the aggregator and site images (settings from the environment).",
)
app.add_typer(container_app, name="container")

CertsOpt = Annotated[Path, typer.Option("--out", "--certs", help="PKI root directory.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing keys and certificates.")]


def fail(message: str) -> NoReturn:
    typer.echo(f"fedgan: {message}", err=True)
    raise typer.Exit(1)


@pki_app.command("init")
def pki_init(
    consortium: Annotated[str, typer.Option(help="Consortium name, in the CA's subject.")],
    out: CertsOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="CA validity in days.")] = 3650,
    force: ForceOpt = False,
    no_passphrase: Annotated[
        bool,
        typer.Option(
            "--no-passphrase", help="Store the CA key unencrypted (staging and tests only)."
        ),
    ] = False,
) -> None:
    """Create the consortium CA and an empty CRL. The CA key is encrypted with
    the passphrase in FEDGAN_CA_PASSPHRASE (asked for when unset and a
    terminal is attached); every later CA command reads it from there."""
    import sys

    passphrase = None if no_passphrase else pki.ca_passphrase()
    if passphrase is None and not no_passphrase:
        if not sys.stdin.isatty():
            fail(
                f"set {pki.CA_PASSPHRASE_ENV} to the CA key's passphrase (at least "
                f"{pki.MIN_PASSPHRASE} characters), or pass --no-passphrase for staging"
            )
        passphrase = typer.prompt(
            "CA key passphrase", hide_input=True, confirmation_prompt=True
        ).encode()
    paths = pki.init_ca(out, consortium, days=days, force=force, passphrase=passphrase)
    typer.echo(
        f"CA certificate {paths.ca_cert}\n"
        f"CA key         {paths.ca_key} (0600, "
        + ("encrypted" if passphrase else "UNENCRYPTED: staging only")
        + ")\n"
        f"CRL            {paths.crl}"
    )


@pki_app.command("issue-aggregator")
def pki_issue_aggregator(
    san: Annotated[
        list[str] | None, typer.Option("--san", help="DNS name or IP (repeatable).")
    ] = None,
    out: CertsOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Validity in days.")] = 825,
    force: ForceOpt = False,
) -> None:
    """Issue the aggregator's server certificate (localhost and 127.0.0.1 always included)."""
    paths = pki.issue_aggregator(out, san or [], days=days, force=force)
    typer.echo(f"certificate {paths.server_cert}\nkey         {paths.server_key} (0600)")


@pki_app.command("issue-site")
def pki_issue_site(
    site_id: str,
    out: CertsOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    sidecar_san: Annotated[
        list[str] | None, typer.Option("--sidecar-san", help="Sidecar DNS name or IP (repeatable).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Issue a site's client certificate (CN = SITE_ID), sidecar certificate, node key, and
    Ed25519 signing key and certificate (secure aggregation)."""
    site = pki.issue_site(out, site_id, days=days, sidecar_sans=sidecar_san, force=force)
    typer.echo(
        f"client certificate  {site.client_cert}\nsidecar certificate {site.sidecar_cert}\n"
        f"node key            {site.node_key} (0600), public {site.node_pub}\n"
        f"signing certificate {site.signing_cert}, key {site.signing_key} (0600)"
    )


@pki_app.command("sign")
def pki_sign(
    requests: Annotated[
        Path, typer.Argument(help="The requests/ folder a site made with `fedgan site keys`.")
    ],
    out: CertsOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    sidecar_san: Annotated[
        list[str] | None,
        typer.Option(
            "--sidecar-san",
            help="The site sidecar's DNS name or IP (repeatable); the CA decides, not the request.",
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Certify a site's own keys from its requests (the key ceremony): client,
    sidecar and signing certificates, and its node key as public material.
    Compare the SHA-256 lines with those the site's officer reads out first."""
    for name, digest in pki.request_sha256(pki.RequestPaths(requests)).items():
        typer.echo(f"request {name:<14} sha256 {digest}")
    site = pki.sign_requests(out, requests, days=days, sidecar_sans=sidecar_san, force=force)
    sans = pki.inspect_cert(site.sidecar_cert)["sans"]
    typer.echo(f"sidecar names  {', '.join(sans)}")  # type: ignore[arg-type]
    typer.echo(
        f"certified site {site.dir.name}: {site.client_cert}, {site.sidecar_cert}, "
        f"{site.signing_cert}; node key {site.node_pub}\n"
        "next: fedgan pki membership (the new site joins the list), then "
        f"fedgan site-kit {site.dir.name} (certificates only; the site keeps its keys)"
    )


@pki_app.command("staging")
def pki_staging(
    sites: Annotated[int, typer.Option(help="Sites site-1..N.")] = 3,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Extra aggregator DNS name or IP (repeatable)."),
    ] = None,
    out: CertsOpt = Path("certs"),
) -> None:
    """The PKI of the staging consortium (root docker-compose.yml): CA, aggregator with the
    compose service names, sites, and nodes/<site>.pub for the SuperLink. Keeps what exists."""
    from fedgan.deploy import kit

    staged = kit.staging_pki(out, sites, san or [])
    typer.echo(
        f"PKI {staged.root}: sites {', '.join(staged.sites)}; node keys in {staged.node_keys}"
    )
    if staged.needs_chown:
        typer.echo(
            f"the containers run as uid {kit.CONTAINER_UID} and read these keys; run:\n"
            f"  sudo chown {kit.CONTAINER_UID}:{kit.CONTAINER_UID} "
            + " ".join(str(p) for p in staged.needs_chown)
        )


@pki_app.command("revoke")
def pki_revoke(
    site_id: str,
    out: CertsOpt = Path("certs"),
    crl_days: Annotated[int, typer.Option(help="Days until the CRL must be re-signed.")] = 30,
) -> None:
    """Revoke a site's certificates; the edge refuses it once it reloads the CRL."""
    serials = pki.revoke_site(out, site_id, days=crl_days)
    typer.echo(
        f"revoked {site_id}: serials {', '.join(f'{s:x}' for s in serials)}\n"
        f"CRL {pki.PkiPaths(out).crl} (reload the edge: nginx -s reload)"
    )


@pki_app.command("crl")
def pki_crl(
    out: CertsOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Days until the CRL must be re-signed.")] = 30,
) -> None:
    """Re-sign the CRL with a new expiry (nginx refuses every site once it expires)."""
    crl = pki.refresh_crl(out, days=days)
    typer.echo(
        f"CRL {pki.PkiPaths(out).crl}: {len(list(crl))} revoked, next update {crl.next_update_utc}"
    )


@pki_app.command("membership")
def pki_membership(
    out: CertsOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Days until the list expires.")] = 90,
    colluding_sites: Annotated[
        int | None,
        typer.Option(
            help="Colluding sites the consortium tolerates: every site then needs t > (n + c)/2 "
            "and t ≥ c + 2 (default: t ≥ ⌊2n/3⌋ + 1)."
        ),
    ] = None,
    min_sites: Annotated[int, typer.Option(help="Fewest sites in one secure sum.")] = 3,
) -> None:
    """Sign the membership list: every issued, unrevoked site and its signing
    certificate. Sites accept only rosters drawn from it; ship it in the kits,
    and the aggregator sends a newer version with the next round's setup."""
    listed = pki.write_membership(out, days=days, colluding=colluding_sites, min_sites=min_sites)
    rule = (
        "t ≥ ⌊2n/3⌋ + 1"
        if listed.colluding is None
        else f"t > (n + {listed.colluding})/2, t ≥ {listed.colluding + 2}"
    )
    typer.echo(
        f"membership {pki.PkiPaths(out).membership}: version {listed.version}, "
        f"{len(listed.sites)} sites ({', '.join(sorted(listed.sites)) or 'none'}), {rule}, "
        f"at least {listed.min_sites} sites in a sum, expires {listed.expires.isoformat()}"
    )


@pki_app.command("bindings")
def pki_bindings(out: CertsOpt = Path("certs")) -> None:
    """Rewrite the edge's map of client certificate to node key (issue, sign
    and revoke do this themselves; run it once for a PKI made before)."""
    path = pki.write_node_bindings(out)
    count = sum(1 for line in path.read_text().splitlines() if line.startswith('"'))
    typer.echo(f"{path}: {count} sites bound; reload the edge to apply it")


@pki_app.command("inspect")
def pki_inspect(
    path: Path,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print subject, SANs, issuer, validity, key type and SHA-256 fingerprint."""
    info = pki.inspect_cert(path)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        typer.echo(f"{key:<20} {shown}")


@silo_app.command("synth")
def silo_synth(
    directory: Path,
    kind: Annotated[str, typer.Option(help="fundus or dicom.")] = "fundus",
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same silo).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    profile: Annotated[
        str,
        typer.Option(
            help="site (the sites' camera) or public: a stand-in public fundus set, another "
            "camera, colour profile and grade mix, for `fedgan pretrain` rehearsals."
        ),
    ] = "site",
) -> None:
    """Write a synthetic silo (fundus JPEGs + labels.csv, or chest DICOM + labels.csv)."""
    from fedgan.silo.synth import synth_silo

    try:
        synth_silo(directory, kind, n, seed=seed, size=size, profile=profile)
    except ValueError as exc:
        fail(str(exc))
    what = "stand-in public " if profile == "public" else ""
    typer.echo(f"wrote {n} {what}{kind} images and labels.csv to {directory}")


def _silo_options(
    kind: str,
    image_size: int,
    channels: int | None,
    modality: str,
    body_part: str,
    view_position: str,
    label_tag: str,
    window: str,
    color: str,
    fundus_contrast: bool,
):
    from fedgan.silo.options import SiloOptions

    return SiloOptions.from_mapping(
        kind,
        image_size,
        channels or (3 if kind == "fundus" else 1),
        {
            "modality": modality,
            "body-part": body_part,
            "view-position": view_position,
            "label-tag": label_tag,
            "window": window,
            "color": color,
            "fundus-contrast": str(fundus_contrast).lower(),
        },
    )


@silo_app.command("check")
def silo_check(
    directory: Path,
    kind: Annotated[str, typer.Option(help="dicom or fundus.")] = "dicom",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    image_size: Annotated[int, typer.Option(help="Training image size.")] = 64,
    channels: Annotated[int | None, typer.Option(help="1 or 3 (default: by kind).")] = None,
    modality: Annotated[str, typer.Option(help="Keep these Modality values, e.g. CR,DX.")] = "",
    body_part: Annotated[str, typer.Option(help="Keep these BodyPartExamined values.")] = "",
    view_position: Annotated[str, typer.Option(help="Keep these ViewPosition values.")] = "",
    label_tag: Annotated[str, typer.Option(help="DICOM keyword to take labels from.")] = "",
    window: Annotated[str, typer.Option(help='Override the window: "center,width".')] = "",
    color: Annotated[str, typer.Option(help="Colour DICOM: convert or refuse.")] = "convert",
    fundus_contrast: Annotated[bool, typer.Option(help="Local-contrast normalisation.")] = False,
    cache: Annotated[
        Path | None, typer.Option(help="Preprocessing cache directory (the site's work volume).")
    ] = None,
) -> None:
    """Read a silo as training would: counts, labels, sizes, modalities, and
    every skipped file with its reason. Exit 1 if nothing is usable."""
    from fedgan.silo.loader import load_silo

    opts = _silo_options(
        kind,
        image_size,
        channels,
        modality,
        body_part,
        view_position,
        label_tag,
        window,
        color,
        fundus_contrast,
    )
    show = sys.stderr.isatty() and not as_json

    def progress(done: int, total: int) -> None:
        if show and (done == total or done % 50 == 0):
            typer.echo(f"\rreading {done}/{total} files", nl=done == total, err=True)

    data = load_silo(directory, opts, cache_dir=cache, progress=progress)
    if as_json:
        typer.echo(json.dumps(data.report.to_dict(), indent=1))
    else:
        for line in data.report.summary_lines():
            typer.echo(line)
    if data.report.images == 0:
        typer.echo(f"fedgan: {directory} holds no usable {kind} image", err=True)
        raise typer.Exit(1)


@silo_app.command("split")
def silo_split(
    src: Path,
    out: Annotated[Path, typer.Option(help="Where site-1 … site-N are written.")],
    kind: Annotated[str, typer.Option(help="fundus or dicom.")] = "fundus",
    sites: Annotated[int, typer.Option(help="Number of site silos.")] = 3,
    alpha: Annotated[float, typer.Option(help="Dirichlet label skew (small: more skewed).")] = 0.5,
    quantity_alpha: Annotated[
        float | None, typer.Option(help="Dirichlet quantity skew of site sizes (off if unset).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same split).")] = 0,
) -> None:
    """Write N non-IID site silos from a labelled silo, for rehearsals."""
    from collections import Counter

    from fedgan.silo.labels import dicom_labels, fundus_labels
    from fedgan.silo.options import SiloOptions
    from fedgan.silo.partition import write_split

    SiloOptions(kind=kind, image_size=32, channels=1)  # validates --kind
    dirs = write_split(src, out, kind, sites, alpha, seed=seed, quantity_alpha=quantity_alpha)
    for site_dir in dirs:
        index = fundus_labels(site_dir) if kind == "fundus" else dicom_labels(site_dir)
        counts = Counter(index.by_key.values())
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        extra = "  + attributes.csv" if (site_dir / "attributes.csv").exists() else ""
        typer.echo(f"{site_dir}  {sum(counts.values())} images  ({shown}){extra}")


@app.command("site-kit")
def site_kit(
    site_id: Annotated[str, typer.Argument(help="The site to hand the kit to.")],
    certs: Annotated[Path, typer.Option(help="PKI root directory.")] = Path("certs"),
    kit: Annotated[Path, typer.Option(help="The kit's files.")] = Path("deploy/site"),
    out: Annotated[Path, typer.Option(help="Where to write the tarball.")] = Path("dist"),
) -> None:
    """Package the site kit with this site's certificates and keys for hand-over."""
    from fedgan.deploy.kit import site_kit as build

    path = build(certs, site_id, kit, out)
    typer.echo(
        f"site kit {path}\n"
        "hand it over privately (it holds the site's private keys); the site unpacks it with\n"
        f"  sudo tar -xzf {path.name}   (keeps the files owned by the containers' uid)"
    )


@app.command("demo")
def demo(
    sites: Annotated[int, typer.Option(help="Number of hospital sites.")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    kind: Annotated[str, typer.Option(help="fundus or dicom.")] = "fundus",
    data: Annotated[
        list[Path] | None, typer.Option("--data", help="A site's silo directory (repeat per site).")
    ] = None,
    image_size: Annotated[int, typer.Option(help="16, 32, 64 or 128.")] = 32,
    images_per_site: Annotated[int, typer.Option(help="Synthetic images per site.")] = 256,
    local_steps: Annotated[
        int | None, typer.Option(help="GAN steps per site per round (default: the run config's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    run_id: Annotated[
        str | None, typer.Option(help="Run folder name (default: time-based).")
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", help="Run-config override KEY=VALUE (TOML value; repeatable)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an earlier demo run folder up to --rounds rounds."),
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="Start from this `fedgan pretrain` file (model.init).")
    ] = None,
    pretrain: Annotated[
        bool | None,
        typer.Option(
            "--pretrain/--no-pretrain",
            help="Start from G and D pretrained on a stand-in public fundus set, cached in "
            "OUT/.cache after the first demo (default: on for fundus without --init).",
        ),
    ] = None,
    pretrain_steps: Annotated[int, typer.Option(help="Steps of that pretraining.")] = 2000,
    evaluate: Annotated[
        bool | None,
        typer.Option(
            "--evaluate/--no-evaluate",
            help="site-1 holds out images and evaluates the run on them; the report shows it "
            "(default: on without --data).",
        ),
    ] = None,
) -> None:
    """Run a local federation of real processes over mutual TLS and train a GAN."""
    from fedgan.demo import DemoOptions, parse_overrides, run_demo

    overrides = parse_overrides(config or [])
    if pretrain is None:
        # The stand-in set is fundus with grades 0-4 and no patient attributes.
        grades = {"0", "1", "2", "3", "4"}
        classes = {c for c in str(overrides.get("classes", "")).split(",") if c}
        pretrain = (
            kind == "fundus"
            and init is None
            and resume is None
            and not overrides.get("attributes")
            and classes <= grades
        )
    if evaluate is None:
        evaluate = not data and resume is None
    opts = DemoOptions(
        sites=sites,
        rounds=rounds,
        kind=kind,
        data=list(data or []),
        image_size=image_size,
        images_per_site=images_per_site,
        local_steps=local_steps,
        seed=seed,
        out_root=out,
        run_id=run_id,
        extra_config=overrides,
        resume=resume,
        init=init,
        pretrain=pretrain,
        pretrain_steps=pretrain_steps,
        evaluate=evaluate,
    )
    run_demo(opts, say=typer.echo)


@app.command("pretrain")
def pretrain(
    data: Annotated[Path, typer.Option(help="A folder of public images (fundus JPEGs or DICOM).")],
    out: Annotated[Path, typer.Option(help="The init file to write (model.init names it).")],
    kind: Annotated[str, typer.Option(help="fundus or dicom.")] = "fundus",
    config: Annotated[
        Path | None,
        typer.Option(help="The federation.yaml whose model section sets G's and D's shape."),
    ] = None,
    steps: Annotated[int, typer.Option(help="G steps (each after one D step).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate of both networks.")] = 2e-4,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the batches.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    force: ForceOpt = False,
) -> None:
    """Train G and D centrally, without DP, on public images: a federation's starting point."""
    from fedgan.config.appbundle import default_run_config
    from fedgan.config.federation import load as load_federation
    from fedgan.config.run import RunSettings
    from fedgan.pretrain import pretrain_to_file
    from fedgan.silo.options import KINDS

    if kind not in KINDS:
        fail(f"--kind {kind!r}: use {' or '.join(KINDS)}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        fail("--steps and --batch-size must be at least 1 and --lr above 0")
    if out.exists() and not force:
        fail(f"{out} exists; choose another --out or pass --force to replace it")
    run_config = default_run_config() | (load_federation(config) if config else {})
    settings = RunSettings.from_run_config(run_config)
    init = pretrain_to_file(
        data,
        kind,
        settings.spec,
        settings.classes,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        say=typer.echo,
    )
    typer.echo(f"file sha256     {init.file_sha256}")
    typer.echo(
        f"weights sha256  {init.weights_sha256}  (what a site pins: "
        "fedgan site policy --allow-init)"
    )
    typer.echo(f"start a federation from it: model.init: {out} in federation.yaml")


ConnOpt = Annotated[
    str | None,
    typer.Option(
        help="SuperLink connection name in FLWR_HOME's config.toml (default: its default)."
    ),
]
HomeOpt = Annotated[
    Path | None,
    typer.Option(help="The operator's FLWR_HOME (default: $FLWR_HOME or ~/.flwr)."),
]


@app.command("run")
def run(
    config: Annotated[Path, typer.Option(help="The run's federation.yaml.")] = Path(
        "deploy/federation.yaml"
    ),
    connection: ConnOpt = None,
    flwr_home: HomeOpt = None,
    run_dir: Annotated[
        str | None, typer.Option(help="Run folder at the aggregator (overrides run.dir).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue the run in this folder at the aggregator from its checkpoint."),
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate only; submit nothing.")] = False,
    log: Annotated[Path | None, typer.Option(help="Also write flwr's whole output here.")] = None,
) -> None:
    """Validate federation.yaml, submit the run to a live SuperLink and follow its rounds."""
    from fedgan import operator

    settings = operator.prepare(config, run_dir=run_dir, resume=resume)
    if check:
        typer.echo(
            f"{config}: valid ({settings['num-server-rounds']} rounds); app bundle (configuration "
            f"only) sha256 {operator.bundle_hash()}"
        )
        return
    code = operator.submit(settings, connection, flwr_home, say=typer.echo, log_path=log)
    if code != 0:
        fail(f"`flwr run` exited with {code}" + (f"; see {log}" if log else ""))


@app.command("status")
def status(connection: ConnOpt = None, flwr_home: HomeOpt = None) -> None:
    """The SuperLink's runs with their status."""
    from fedgan import operator

    for r in operator.runs(connection, flwr_home):
        typer.echo(
            f"{r.get('run-id', '?'):<22} {r.get('status', '?'):<22} "
            f"{r.get('fab-id', '')} {r.get('created-at', '')}"
        )


@app.command("sites")
def sites(connection: ConnOpt = None, flwr_home: HomeOpt = None) -> None:
    """The SuperNodes registered with the SuperLink, and which are connected now."""
    from fedgan import operator

    for n in operator.sites(connection, flwr_home):
        since = n.get("online-at") or n.get("offline-at") or ""
        name = n.get("name", "")
        typer.echo(f"node {n.get('node-id'):<22} {n.get('status', '?'):<9} {name:<16} {since}")


@app.command("stop")
def stop(
    run_id: Annotated[str, typer.Argument(help="Flower run id (see fedgan status).")],
    connection: ConnOpt = None,
    flwr_home: HomeOpt = None,
) -> None:
    """Stop a run; the global model keeps its last completed round's checkpoint."""
    from fedgan import operator

    operator.stop(run_id, connection, flwr_home)
    typer.echo(f"stopped run {run_id}")


@app.command("evaluate")
def evaluate_run(
    run: Annotated[Path, typer.Argument(help="The run folder (generator.pt, checkpoint.pt).")],
    real: Annotated[Path, typer.Option(help="This site's training silo (members).")],
    kind: Annotated[str, typer.Option(help="dicom or fundus.")] = "dicom",
    holdout: Annotated[
        Path | None,
        typer.Option(
            help="Images this site kept out of training (non-members): enables the "
            "membership-inference attacks and TSTR."
        ),
    ] = None,
    site: Annotated[
        str, typer.Option(envvar="FEDGAN_SITE_ID", help="The evaluating site's id.")
    ] = "local",
    n: Annotated[int, typer.Option(help="Synthetic images to draw.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic draw.")] = 0,
    classifier_seeds: Annotated[
        int,
        typer.Option(
            help="TSTR and train-on-real: the mean and s.d. of this many classifiers "
            "(one classifier's figure moves by up to ±0.09 with its seed)."
        ),
    ] = 3,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Silo option key=value, as at training (repeatable)."),
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(
            help="A domain encoder from an earlier evaluation (e.g. of a baseline run), so "
            "domain-FIDs compare."
        ),
    ] = None,
    normal_class: Annotated[
        str | None,
        typer.Option(
            help="Class of normal images: adds the anomaly detector trained on "
            "synthetic normals (conditional runs, needs --holdout)."
        ),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="A local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds "
            "the Inception FID published numbers use (nothing is downloaded)."
        ),
    ] = None,
    start: Annotated[
        Path | None,
        typer.Option(
            help="The init file the run started from (model.init): adds its domain-FID on the "
            "same encoder, to see what the federation added."
        ),
    ] = None,
) -> None:
    """Measure a run's synthetic images against this site's real images, at the site:
    quality, privacy attacks, utility. Writes RUN/evaluation/SITE.json (numbers only)."""
    from fedgan.evaluate.site import evaluate

    options = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--option {item!r} is not key=value")
        options[key] = value
    path = evaluate(
        run,
        real,
        kind,
        site_id=site,
        holdout=holdout,
        silo_options=options,
        n_synthetic=n,
        seed=seed,
        classifier_seeds=classifier_seeds,
        normal_class=normal_class,
        encoder_path=encoder,
        inception_weights=inception_weights,
        start=start,
        say=typer.echo,
    )
    typer.echo(f"evaluation    {path} (fedgan report {run} adds it to the report)")


@app.command("sample")
def sample(
    generator: Annotated[Path, typer.Option(help="A generator.pt from a run folder.")],
    n: Annotated[int, typer.Option(help="How many images.")] = 64,
    out: Annotated[Path, typer.Option(help="Folder to write them to.")] = Path("synthetic"),
    fmt: Annotated[str, typer.Option("--format", help="png or dicom.")] = "png",
    seed: Annotated[int, typer.Option(help="Seed of the draw.")] = 0,
    class_index: Annotated[
        int | None, typer.Option("--class", help="Class index, for a conditional generator.")
    ] = None,
    attributes: Annotated[
        str, typer.Option(help="The run's attributes, for an attribute-conditioned generator.")
    ] = "",
) -> None:
    """Draw synthetic images; DICOM files are marked synthetic (DERIVED\\SECONDARY, SYN)."""
    from fedgan.synthetic import export

    def progress(done: int, total: int) -> None:
        typer.echo(f"\r{done}/{total} images", nl=False, err=True)

    paths = export(
        generator,
        n,
        out,
        fmt,
        seed=seed,
        class_index=class_index,
        attributes=attributes,
        progress=progress,
    )
    typer.echo("", err=True)
    typer.echo(f"wrote {len(paths)} {fmt} images to {out}")


@app.command("report")
def report(
    run: Annotated[Path, typer.Argument(help="The run folder (runs/<id>).")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default: RUN/report.html).")
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="LABEL=RUN_DIR of a run to compare with (repeatable), e.g. "
            "centralized=runs/rehearsal.",
        ),
    ] = None,
) -> None:
    """Write a self-contained HTML report of a run: samples, losses, ε per site, rounds,
    the sites' evaluations, and baselines."""
    from fedgan.report import write

    pairs = []
    for item in baseline or []:
        label, sep, folder = item.partition("=")
        if not sep or not label or not Path(folder).is_dir():
            fail(f"--baseline {item!r}: give LABEL=RUN_DIR with an existing run folder")
        pairs.append((label, Path(folder)))
    typer.echo(f"report {write(run, out, pairs)}")


@app.command("exporter")
def exporter(
    runs: Annotated[Path, typer.Option(help="The aggregator's runs folder.")] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port of /metrics.")] = 9464,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    edge_log: Annotated[
        list[Path] | None,
        typer.Option(
            "--edge-log",
            help="The edge's access log (repeatable): TLS rejections are counted and "
            "recorded in <runs>/audit.jsonl.",
        ),
    ] = None,
) -> None:
    """Serve every run's round metrics to Prometheus until stopped."""
    from fedgan.aggregator.exporter import serve
    from fedgan.audit_log import follow_edge_logs

    server = serve(runs, port, host, edge_log or [])
    typer.echo(f"serving http://{host}:{port}/metrics for the runs in {runs}")
    try:
        # The scrapes only read; this loop writes the audit log.
        follow_edge_logs(runs, edge_log or [], warn=lambda m: typer.echo(m, err=True))
    finally:
        server.shutdown()


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    certs: Annotated[Path | None, typer.Option(help="PKI root directory.")] = Path("certs"),
    config: Annotated[Path | None, typer.Option(help="The run's federation.yaml.")] = Path(
        "deploy/federation.yaml"
    ),
    nginx_conf: Annotated[
        list[Path] | None,
        typer.Option("--nginx-conf", help="A deployed nginx config (repeatable) (default: ours)."),
    ] = None,
    runs: Annotated[Path | None, typer.Option(help="The aggregator's runs folder.")] = Path("runs"),
    probe: Annotated[
        str | None, typer.Option(help="HOST:PORT of the edge: confirm with a live handshake.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of Markdown.")] = False,
) -> None:
    """TLS, certificates, secure aggregation, DP and ε spent, telemetry, warnings."""
    if ctx.invoked_subcommand is not None:
        return
    from fedgan import audit_report
    from fedgan.config import federation
    from fedgan.config.appbundle import default_run_config

    run_config = default_run_config()
    if config is not None and config.exists():
        run_config |= federation.load(config)
    report = audit_report.build(
        certs,  # a missing PKI is reported as a warning, not an error
        run_config,
        list(nginx_conf or []),
        runs if runs is not None and runs.exists() else None,
        probe,
    )
    typer.echo(
        json.dumps(report, indent=2, ensure_ascii=False)
        if as_json
        else audit_report.markdown(report)
    )


@audit_app.command("verify-log")
def audit_verify_log(
    path: Annotated[Path, typer.Argument(help="The audit log.")] = Path("runs/audit.jsonl"),
) -> None:
    """Check the audit log's hash chain and head: exit 1 if edited or truncated."""
    from fedgan.audit_log import AuditLog

    verdict = AuditLog(path).verify()
    if not verdict.ok:
        fail(f"{path}: {verdict.problem} (first {verdict.entries} entries intact)")
    typer.echo(f"{path}: {verdict.entries} entries, chain intact")


WorkDirOpt = Annotated[
    Path,
    typer.Option(
        "--work-dir",
        envvar="FEDGAN_WORK_DIR",
        help="The site's work dir (ledger, approval file) [in the site image: /var/lib/fedgan].",
    ),
]


def _site_store(work_dir: Path):
    from fedgan.site.approval import PolicyStore

    if not work_dir.is_dir():
        fail(f"{work_dir} is not a folder; pass the site's work dir with --work-dir")
    return PolicyStore(work_dir, os.environ.get("FEDGAN_SITE_ID", ""))


@site_app.command("init")
def site_init(
    site_id: Annotated[
        str, typer.Option(envvar="FEDGAN_SITE_ID", help="This site's id, as on its certificate.")
    ],
    no_history: Annotated[
        bool,
        typer.Option(
            "--no-history",
            help="Start a ledger beside the site's other records: only for a silo that has "
            "never trained (recorded in the site's audit log).",
        ),
    ] = False,
    upgrade_ledger: Annotated[
        bool,
        typer.Option(
            "--upgrade-ledger",
            help="Chain a ledger an older FedGAN version wrote (no .head file): you vouch for "
            "its lines (recorded in the site's audit log).",
        ),
    ] = False,
    work_dir: WorkDirOpt = Path("/var/lib/fedgan"),
) -> None:
    """Set the site up once: its privacy ledger (nothing spent) and its
    approval file (default, strict limits). Never replaces either; the site
    container runs this on its first start, in an empty work dir."""
    from fedgan.site import work_dir as site_work

    done = site_work.init(work_dir, site_id, no_history=no_history, upgrade_ledger=upgrade_ledger)
    for line in done or [f"{work_dir} is set up already; nothing to do"]:
        typer.echo(line)


@site_app.command("keys")
def site_keys(
    site_id: str,
    out: Annotated[Path, typer.Option("--out", help="The site's certs folder.")] = Path("certs"),
    force: ForceOpt = False,
) -> None:
    """Make this site's private keys here, on the site's machine, and the
    requests the consortium CA signs (the key ceremony, docs/security.md).
    Send only OUT/requests/ to the CA; the keys never leave OUT."""
    requests = pki.site_keys(out, site_id, force=force)
    typer.echo(f"keys (0600)  {out}/client.key sidecar.key node_key signing.key")
    typer.echo(f"requests     {requests.dir} (send this folder to the CA)")
    for name, digest in pki.request_sha256(requests).items():
        typer.echo(f"request {name:<14} sha256 {digest}")
    typer.echo(
        "read these SHA-256 lines to the CA's officer by another channel; then unpack the site "
        f"kit the CA returns so that its certs/ lands in {out}"
    )


@site_app.command("approve")
def site_approve(
    fab_hash: Annotated[
        str | None, typer.Argument(help="SHA-256 of an app bundle (fedgan run --check prints it).")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="A fedgan version whose code this site reviewed.")
    ] = None,
    work_dir: WorkDirOpt = Path("/var/lib/fedgan"),
) -> None:
    """Approve an app bundle's hash, or a fedgan version, after review."""
    from fedgan.site.approval import describe

    if fab_hash is None and version is None:
        fail("name what to approve: a bundle's SHA-256, or --version VERSION")
    store = _site_store(work_dir)
    typer.echo(describe(store.approve(fab_hash=fab_hash, version=version), store.path))


@site_app.command("revoke")
def site_revoke(
    fab_hash: Annotated[str | None, typer.Argument(help="SHA-256 to withdraw.")] = None,
    version: Annotated[str | None, typer.Option(help="A fedgan version to withdraw.")] = None,
    work_dir: WorkDirOpt = Path("/var/lib/fedgan"),
) -> None:
    """Withdraw an approval; later tasks of that bundle or version are refused."""
    from fedgan.site.approval import describe

    if fab_hash is None and version is None:
        fail("name what to revoke: a bundle's SHA-256, or --version VERSION")
    store = _site_store(work_dir)
    typer.echo(describe(store.revoke(fab_hash=fab_hash, version=version), store.path))


@site_app.command("plan")
def site_plan(
    images: Annotated[
        int, typer.Option(help="Images in this site's silo (fedgan silo check counts them).")
    ],
    config: Annotated[
        Path | None, typer.Option(help="The run's federation.yaml, as the operator shared it.")
    ] = Path("deploy/federation.yaml"),
    epsilon_budget: Annotated[
        float,
        typer.Option(envvar="FEDGAN_EPSILON_BUDGET", help="This site's lifetime ε budget."),
    ] = DEFAULT_EPSILON_BUDGET,
    delta: Annotated[
        float,
        typer.Option(
            envvar="FEDGAN_DELTA",
            help="The δ this site accounts at (its node config 'delta'); 0: from --images.",
        ),
    ] = 0.0,
    new_silo: Annotated[
        bool, typer.Option("--new-silo", help="No privacy ledger yet: plan from ε = 0.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    work_dir: WorkDirOpt = Path("/var/lib/fedgan"),
) -> None:
    """Before a run: the σ this silo would train with, how loud that noise is
    against the signal, and the round at which this site's budget would stop it."""
    from fedgan.config import federation
    from fedgan.config.appbundle import default_run_config
    from fedgan.config.run import RunSettings
    from fedgan.privacy.ledger import LedgerError, PrivacyLedger
    from fedgan.site import plan as site_plan
    from fedgan.site.approval import Limits, PolicyStore

    run_config = default_run_config()
    if config is not None:
        if not config.exists():
            fail(f"{config} not found; pass the run's federation.yaml with --config")
        run_config |= federation.load(config)
    run = RunSettings.from_run_config(run_config)
    history, recorded = [], []
    limits = Limits()
    if new_silo:
        ledger_note, policy_note = "none (--new-silo)", "defaults, --new-silo"
    else:
        if not work_dir.is_dir():
            fail(
                f"{work_dir} is not a folder; pass the site's work dir with --work-dir, "
                "or --new-silo for a silo with no privacy history"
            )
        ledger = PrivacyLedger.in_work_dir(work_dir)
        try:
            history, recorded = ledger.history(), ledger.deltas()
        except LedgerError as exc:
            fail(f"{exc}; or plan with --new-silo for a silo with no privacy history")
        ledger_note = f"{ledger.path}, {len(history)} rounds recorded"
        store = PolicyStore(work_dir)
        limits = store.current().limits  # reads only: no approval file is created
        policy_note = str(store.path) if store.path.exists() else "defaults, no approval file yet"
    try:
        plan = site_plan.assess(run, images, history, limits, epsilon_budget, delta, recorded)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(site_plan.as_dict(plan), indent=1))
    else:
        for line in site_plan.describe(plan, ledger_note, policy_note):
            typer.echo(line)


def _number_or_none(flag: str, value: str) -> float | None:
    """A limit given as a number, or 'none' for no limit."""
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        fail(f"{flag} {value!r}: give a number or 'none'")


def _count(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        fail(f"{flag} {value!r}: give a whole number or 'default'")


def _pinned_inits(store, allow: list[str], forget: list[str]) -> list[str]:
    """The site's pinned init hashes after adding ``allow`` and removing ``forget``."""
    pinned = list(store.current().limits.init_hashes)
    pinned += [h.strip().lower() for h in allow if h.strip().lower() not in pinned]
    gone = {h.strip().lower() for h in forget}
    if gone - set(pinned):
        fail(f"--forget-init {', '.join(sorted(gone - set(pinned)))}: not pinned in {store.path}")
    return [h for h in pinned if h not in gone]


@site_app.command("policy")
def site_policy(
    mode: Annotated[
        str | None,
        typer.Option(help="config-only: any config-only bundle; hash-only: approved hashes only."),
    ] = None,
    min_noise: Annotated[
        float | None, typer.Option(help="Smallest DP noise multiplier σ this site trains with.")
    ] = None,
    max_epsilon: Annotated[
        str | None, typer.Option(help="Largest target ε a run may ask for ('none': no limit).")
    ] = None,
    require_dp: Annotated[
        bool | None, typer.Option("--require-dp/--allow-no-dp", help="Refuse runs without DP.")
    ] = None,
    require_secagg: Annotated[
        bool | None,
        typer.Option(
            "--require-secagg/--allow-no-secagg", help="Refuse runs without secure aggregation."
        ),
    ] = None,
    min_sites: Annotated[
        int | None,
        typer.Option(help="Fewest sites in one secure sum this site joins (default 3)."),
    ] = None,
    colluding_sites: Annotated[
        str | None,
        typer.Option(
            help="Colluding sites tolerated: the threshold must exceed (n + c)/2 and be at least "
            "c + 2 ('default': t ≥ ⌊2n/3⌋ + 1)."
        ),
    ] = None,
    refuse_init: Annotated[
        bool | None,
        typer.Option(
            "--refuse-init/--accept-init",
            help="Refuse runs that start from pretrained weights (model.init), or accept them.",
        ),
    ] = None,
    allow_init: Annotated[
        list[str] | None,
        typer.Option(
            help="Pin a pretrained init by its weights SHA-256 (as `fedgan pretrain` prints it); "
            "once any is pinned, only pinned inits are accepted. Repeatable."
        ),
    ] = None,
    forget_init: Annotated[
        list[str] | None, typer.Option(help="Remove a pinned init's SHA-256. Repeatable.")
    ] = None,
    max_noise_figure: Annotated[
        str | None,
        typer.Option(
            help="Refuse DP rounds whose noise figure (fedgan site plan) is above this "
            "('none': no limit)."
        ),
    ] = None,
    work_dir: WorkDirOpt = Path("/var/lib/fedgan"),
) -> None:
    """Print this site's approval policy and limits; change them with the options."""
    from fedgan.site.approval import MODES, describe

    store = _site_store(work_dir)
    limits: dict[str, object] = {}
    if refuse_init is not None:
        limits["refuse_init"] = refuse_init
    if max_noise_figure is not None:
        limits["max_noise_figure"] = _number_or_none("--max-noise-figure", max_noise_figure)
    if allow_init or forget_init:
        limits["init_hashes"] = _pinned_inits(store, allow_init or [], forget_init or [])
    if min_noise is not None:
        limits["min_noise_multiplier"] = min_noise
    if max_epsilon is not None:
        limits["max_target_epsilon"] = _number_or_none("--max-epsilon", max_epsilon)
    if require_dp is not None:
        limits["require_dp"] = require_dp
    if require_secagg is not None:
        limits["require_secure_aggregation"] = require_secagg
    if min_sites is not None:
        limits["min_sites"] = min_sites
    if colluding_sites is not None:
        limits["colluding_sites"] = (
            None if colluding_sites == "default" else _count("--colluding-sites", colluding_sites)
        )
    if mode is not None and mode not in MODES:
        fail(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    policy = store.update(mode=mode, **limits) if mode or limits else store.load()
    typer.echo(describe(policy, store.path))


@container_app.command("superlink")
def container_superlink() -> None:
    """The aggregator: SuperLink (+ ServerApp), then register the mounted node keys."""
    import os

    from fedgan.deploy import container

    raise typer.Exit(container.run_superlink(os.environ, say=typer.echo))


@container_app.command("supernode")
def container_supernode(
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the command line instead of running it.")
    ] = False,
) -> None:
    """A hospital site: the SuperNode (+ ClientApp) behind its nginx sidecar."""
    import os

    from fedgan.deploy import container

    if not print_only:
        from fedgan.site import work_dir

        # The first start (an empty volume) sets the site up; a later one
        # with its ledger or approval file gone stops here, in one line,
        # before joining anything or writing to the volume.
        site_id = os.environ.get("FEDGAN_SITE_ID", "").strip()
        if not site_id:
            fail("FEDGAN_SITE_ID is not set; set SITE_ID in .env (see .env.example)")
        state = Path(os.environ.get("FEDGAN_WORK_DIR", "/var/lib/fedgan"))
        for line in work_dir.ensure(state, site_id):
            typer.echo(line)
    launch = container.supernode_launch(os.environ)
    if print_only:
        typer.echo(json.dumps(launch.argv))
        return
    container.start_warm_runtime(launch)
    container.exec_launch(launch)


@container_app.command("exporter")
def container_exporter() -> None:
    """The aggregator's Prometheus exporter over the runs on the state volume."""
    import os

    from fedgan.deploy import container

    container.exec_launch(container.exporter_launch(os.environ))


@container_app.command(
    "operator", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def container_operator(ctx: typer.Context) -> None:
    """Run a `fedgan` operator command (run, status, sites, stop, report…) against the
    SuperLink on the aggregator's internal network."""
    import os
    import tempfile

    from fedgan.deploy import commands, container

    # The root filesystem is read-only: the connection file is rewritten on
    # every call anyway, so it lives in a fresh private folder in the tmpfs.
    home = Path(os.environ.get("FLWR_HOME") or tempfile.mkdtemp(prefix="flwr-home-"))
    container.write_operator_home(os.environ, home)
    argv = [commands.venv_bin("fedgan"), *ctx.args]
    container.exec_launch(container.Launch(argv, {"FLWR_HOME": str(home)}, Path.cwd()))


@container_app.command("health")
def container_health(
    role: Annotated[str, typer.Argument(help="superlink, supernode or exporter.")],
) -> None:
    """Exit 0 when this container's service answers (compose healthcheck)."""
    import os

    from fedgan.deploy import container

    if not container.health(role, os.environ):
        raise typer.Exit(1)


def _terminate(signum: int, _frame: object) -> NoReturn:
    # Turn SIGTERM into the same unwinding as Ctrl-C, so every process this
    # command started is stopped by its context manager.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    import click

    from fedgan.errors import FedGanError

    signal.signal(signal.SIGTERM, _terminate)
    try:
        # Non-standalone: typer returns the exit code (130 after Ctrl-C or
        # SIGTERM) instead of exiting, and lets our own errors through.
        code = app(standalone_mode=False)
    except click.ClickException as exc:  # usage errors
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        code = 130
    except (FedGanError, OSError, ValueError, TimeoutError) as exc:
        typer.echo(f"fedgan: {exc}", err=True)
        sys.exit(1)
    if code == 130:
        typer.echo("fedgan: interrupted; every process it started has been stopped", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
