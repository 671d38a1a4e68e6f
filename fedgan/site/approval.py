"""What a site lets run: which app bundles (FABs), on which approved version of
its own FedGAN code, and the limits it puts on a run's privacy settings.

A Flower SuperNode executes whatever ClientApp a FAB names. A hospital's
security officer approves code, not operators, so a site admits a FAB only if:

- it carries configuration only (``pyproject.toml`` and Flower's manifest):
  no Python, no data, nothing that could shadow the installed package;
- it names FedGAN's installed ClientApp (``fedgan.site.client_app:app``);
- the installed ``fedgan`` version is one the site approved;
- under the ``hash-only`` policy, its SHA-256 is one the site approved.

This is checked by the site's ClientApp runtime (`fedgan.site.runtime`)
before anything from the FAB is installed or imported. Then the run's
privacy settings are checked against the site's limits (DP on, noise at
least this, target ε at most that, secure aggregation on), so an operator
cannot weaken a site's privacy by configuration.

A refusal is an `AppRefused` whose message, ``refused by site <id>: <why>``,
travels to the ServerApp in Flower's error reply; `fedgan.wire.parse_refusal` reads it
back there. The policy lives in ``<work-dir>/approval.json`` beside the
privacy ledger; every change and every refusal is a line in the site's
hash-chained ``<work-dir>/audit.jsonl``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tomllib
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from fedgan import wire
from fedgan.atomic import write_text_atomic
from fedgan.audit_log import AuditLog
from fedgan.errors import FedGanError
from fedgan.secagg.params import DEFAULT_MIN_SITES, MIN_SITES

POLICY_FILE = "approval.json"
SITE_AUDIT_FILE = "audit.jsonl"
CONFIG_ONLY = "config-only"
HASH_ONLY = "hash-only"
MODES = (CONFIG_ONLY, HASH_ONLY)
CLIENTAPP = "fedgan.site.client_app:app"
# A FAB that carries configuration only: the app's pyproject and Flower's own
# manifest of the FAB's files (.info/CONTENT).
CONFIG_FILES = frozenset({"pyproject.toml"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Chosen from measurements (bench/RESULTS.md, "The noise figure a site refuses
# above"): past it the sites' updates move a pretrained G less and less.
DEFAULT_MAX_NOISE_FIGURE = 100.0
UPGRADE_REASON = (
    "written before sites enforced secure aggregation by default: secure aggregation is now "
    "required (fedgan site policy --allow-no-secagg to answer plain rounds)"
)


class PolicyError(FedGanError):
    """The approval file or a change to it is invalid; names the file or value."""


class AppRefused(FedGanError):
    """The site will not run this app bundle or this run configuration."""

    def __init__(self, site_id: str, reason: str) -> None:
        super().__init__(wire.refusal_text(site_id, reason))
        self.site_id, self.reason = site_id, reason


def installed_version() -> str:
    return metadata.version("fedgan")


def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


@dataclass
class Limits:
    """The weakest privacy settings this site accepts from any run."""

    require_dp: bool = True
    # Smallest noise multiplier σ the site trains with (given or calibrated).
    min_noise_multiplier: float = 0.0
    # Largest target ε a run may plan for (None: only the site's ε budget).
    max_target_epsilon: float | None = None
    # On by default: without it the aggregator sees this site's update. A
    # site answers a plain round only if its own policy says so.
    require_secure_aggregation: bool = True
    # Secure aggregation: the fewest sites in one sum, and the colluding
    # sites tolerated (None: the default threshold rule ⌊2n/3⌋ + 1; c: the
    # threshold must exceed (n + c)/2 and be at least c + 2).
    min_sites: int = DEFAULT_MIN_SITES
    colluding_sites: int | None = None
    # Pretrained inits (`fedgan pretrain`, `model.init`): refuse any run that
    # starts from one, or, when hashes are listed, allow only those (their
    # weights SHA-256, which the site checks against round 1's model).
    refuse_init: bool = False
    init_hashes: list[str] = field(default_factory=list)
    # Largest DP-SGD noise figure (σ·√d / expected batch) this site trains
    # with: above it its images would shape D too weakly to be worth the ε
    # spent (bench/RESULTS.md). Refused before any spend; null: no limit.
    max_noise_figure: float | None = DEFAULT_MAX_NOISE_FIGURE


@dataclass
class SitePolicy:
    mode: str = CONFIG_ONLY
    versions: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> SitePolicy:
        try:
            doc = json.loads(text)
            limits = Limits(**doc.get("limits", {}))
            policy = cls(
                mode=doc["mode"],
                versions=[str(v) for v in doc.get("versions", [])],
                hashes=[str(h) for h in doc.get("hashes", [])],
                limits=limits,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PolicyError(
                f"{where} is not a valid approval file ({exc}); restore it from backup or "
                "recreate it with `fedgan site policy`"
            ) from None
        policy.validate(where)
        return policy

    def validate(self, where: str) -> None:
        if self.mode not in MODES:
            raise PolicyError(f"{where}: mode {self.mode!r} must be one of {', '.join(MODES)}")
        lim = self.limits
        for h in (*self.hashes, *lim.init_hashes):
            if not _SHA256.match(h):
                raise PolicyError(f"{where}: {h!r} is not a SHA-256 (64 hex digits)")
        if not (math.isfinite(lim.min_noise_multiplier) and lim.min_noise_multiplier >= 0):
            raise PolicyError(f"{where}: limits.min_noise_multiplier must be ≥ 0")
        if lim.max_noise_figure is not None and not lim.max_noise_figure > 0:
            raise PolicyError(f"{where}: limits.max_noise_figure must be > 0 (or null)")
        if lim.max_target_epsilon is not None and not lim.max_target_epsilon > 0:
            raise PolicyError(f"{where}: limits.max_target_epsilon must be > 0 (or null)")
        if not (isinstance(lim.min_sites, int) and lim.min_sites >= MIN_SITES):
            raise PolicyError(f"{where}: limits.min_sites must be an integer ≥ {MIN_SITES}")
        if lim.colluding_sites is not None and not (
            isinstance(lim.colluding_sites, int) and lim.colluding_sites >= 0
        ):
            raise PolicyError(f"{where}: limits.colluding_sites must be an integer ≥ 0 (or null)")


class PolicyStore:
    """The site's approval file and audit log in its work dir. The file is
    created once, when the site is set up (`create`; `fedgan site init`),
    approving the installed version (the code the hospital deployed) under
    the config-only policy and the default limits; that is recorded. A
    missing file later is refused, never recreated: whoever could delete it
    would otherwise reset the site's limits."""

    def __init__(self, work_dir: Path, site_id: str = "") -> None:
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / POLICY_FILE
        self.audit = AuditLog(self.work_dir / SITE_AUDIT_FILE)
        self.site_id = site_id

    def create(self) -> SitePolicy:
        if self.path.exists():
            raise PolicyError(f"{self.path} exists; it is never created anew")
        policy = SitePolicy(versions=[installed_version()])
        self._save(policy, "policy_created")
        return policy

    def load(self) -> SitePolicy:
        if not self.path.exists():
            raise PolicyError(
                f"{self.path} is missing: this site's approvals and limits cannot be read, so "
                "it runs nothing. Restore it from the site's backup, or run `fedgan site init` "
                "to write the default (strict) limits again"
            )
        policy = self.current()
        if self._predates_threshold_rule():
            self._save(policy, "policy_upgraded", reason=UPGRADE_REASON)
        return policy

    def current(self) -> SitePolicy:
        """The policy `load` would give, without creating the file (for
        commands that only look, like `fedgan site plan`)."""
        if not self.path.exists():
            return SitePolicy(versions=[installed_version()])
        policy = SitePolicy.from_json(self.path.read_text("utf-8"), str(self.path))
        if self._predates_threshold_rule():
            # Written when plain rounds were the default: that `false` was
            # never the site's choice, so the site's default now applies.
            policy.limits.require_secure_aggregation = True
        return policy

    def _predates_threshold_rule(self) -> bool:
        try:
            limits = json.loads(self.path.read_text("utf-8")).get("limits", {})
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(limits, dict) and "min_sites" not in limits

    def _save(self, policy: SitePolicy, event: str, **details: Any) -> None:
        policy.validate(str(self.path))
        write_text_atomic(self.path, policy.to_json())
        self.audit.append(event, site=self.site_id, policy=asdict(policy), **details)

    def approve(self, *, fab_hash: str | None = None, version: str | None = None) -> SitePolicy:
        policy = self.load()
        if fab_hash is not None:
            fab_hash = _check_hash(fab_hash)
            if fab_hash not in policy.hashes:
                policy.hashes.append(fab_hash)
        if version is not None and version not in policy.versions:
            policy.versions.append(version)
        self._save(policy, "approved", fab_hash=fab_hash, version=version)
        return policy

    def revoke(self, *, fab_hash: str | None = None, version: str | None = None) -> SitePolicy:
        policy = self.load()
        if fab_hash is not None:
            fab_hash = _check_hash(fab_hash)
            if fab_hash not in policy.hashes:
                raise PolicyError(f"{fab_hash} is not approved in {self.path}")
            policy.hashes.remove(fab_hash)
        if version is not None:
            if version not in policy.versions:
                raise PolicyError(f"version {version} is not approved in {self.path}")
            policy.versions.remove(version)
        self._save(policy, "revoked", fab_hash=fab_hash, version=version)
        return policy

    def update(self, *, mode: str | None = None, **limits: Any) -> SitePolicy:
        policy = self.load()
        if mode is not None:
            policy.mode = mode
        for key, value in limits.items():
            setattr(policy.limits, key, value)
        self._save(policy, "policy_changed")
        return policy

    def refuse(self, refusal: AppRefused, **details: Any) -> AppRefused:
        """Record a refusal in the site's audit log; returns it for raising."""
        self.audit.append("refused", site=refusal.site_id, reason=refusal.reason, **details)
        return refusal


def _check_hash(value: str) -> str:
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise PolicyError(f"{value!r} is not a SHA-256 of an app bundle (64 hex digits)")
    return value


def admit_fab(policy: SitePolicy, fab: bytes, site_id: str, version: str) -> str:
    """The FAB's SHA-256 if this site runs it; `AppRefused` (with the reason
    a security officer needs) otherwise. Reads the archive's index and its
    pyproject only: nothing in it is extracted or executed."""
    digest = fab_sha256(fab)
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = archive.namelist()
            extra = sorted(n for n in names if n not in CONFIG_FILES and not n.startswith(".info/"))
            if extra:
                shown = ", ".join(extra[:5]) + (" …" if len(extra) > 5 else "")
                raise AppRefused(
                    site_id,
                    f"app bundle {digest[:12]} carries files other than configuration ({shown}); "
                    "this site runs only its installed FedGAN code",
                )
            app = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise AppRefused(site_id, f"app bundle {digest[:12]} is not a readable FAB") from None
    foreign = _foreign_dependencies(app)
    if foreign:
        # Flower installs a FAB's dependencies when its runtime install is
        # on: refused here whatever that setting, so the site's code is the
        # image it deployed.
        raise AppRefused(
            site_id,
            f"app bundle {digest[:12]} declares dependencies to install "
            f"({', '.join(foreign[:5])}); this site runs only its installed FedGAN code",
        )
    clientapp = app.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if clientapp.get("clientapp") != CLIENTAPP:
        raise AppRefused(
            site_id,
            f"app bundle {digest[:12]} names ClientApp {clientapp.get('clientapp')!r}; "
            f"this site runs only {CLIENTAPP}",
        )
    if version not in policy.versions:
        raise AppRefused(
            site_id,
            f"fedgan {version} installed here is not approved (approved: "
            f"{', '.join(policy.versions) or 'none'}); after review: fedgan site approve "
            f"--version {version}",
        )
    if policy.mode == HASH_ONLY and digest not in policy.hashes:
        raise AppRefused(
            site_id,
            f"app bundle {digest} is not approved under this site's hash-only policy; "
            f"after review: fedgan site approve {digest}",
        )
    return digest


def _foreign_dependencies(app: dict[str, Any]) -> list[str]:
    """What a FAB's pyproject asks to install beyond Flower itself (which
    the site has; FedGAN's own bundle names only it)."""
    project = app.get("project", {})
    declared = list(project.get("dependencies", []) or [])
    for extra in (project.get("optional-dependencies", {}) or {}).values():
        declared += list(extra or [])
    foreign = []
    for item in declared:
        try:
            requirement = Requirement(str(item))
        except InvalidRequirement:
            requirement = None
        # Flower itself by name and version only: "flwr @ https://…" would
        # install whatever that URL serves.
        if (
            requirement is None
            or canonicalize_name(requirement.name) != "flwr"
            or requirement.url
            or requirement.marker
        ):
            foreign.append(str(item)[:60])
    return foreign


def check_run(
    limits: Limits,
    site_id: str,
    *,
    dp: bool,
    noise_multiplier: float | None,
    target_epsilon: float,
    secure_aggregation: bool,
    init_sha256: str = "",
) -> None:
    """Refuse a run whose privacy settings are weaker than the site allows,
    or that starts from a pretrained init the site does not accept.
    ``noise_multiplier`` is the σ this round would train with (given by the
    run, or calibrated from its target ε)."""
    if init_sha256 and limits.refuse_init:
        raise AppRefused(
            site_id,
            f"the run starts from pretrained weights {init_sha256[:16]}…; this site's policy "
            "refuses any init (fedgan site policy --accept-init)",
        )
    if init_sha256 and limits.init_hashes and init_sha256 not in limits.init_hashes:
        raise AppRefused(
            site_id,
            f"the run starts from pretrained weights {init_sha256}, not one this site pins; "
            f"after review: fedgan site policy --allow-init {init_sha256}",
        )
    if limits.require_dp and not dp:
        raise AppRefused(site_id, "the run turns differential privacy off; this site requires it")
    if dp and noise_multiplier is not None and noise_multiplier < limits.min_noise_multiplier:
        raise AppRefused(
            site_id,
            f"the run would train with noise multiplier {noise_multiplier:.3f}; this site "
            f"requires at least {limits.min_noise_multiplier:.3f}",
        )
    if dp and limits.max_target_epsilon is not None and target_epsilon > limits.max_target_epsilon:
        raise AppRefused(
            site_id,
            f"the run targets ε {target_epsilon:g}; this site allows at most "
            f"{limits.max_target_epsilon:g}",
        )
    if limits.require_secure_aggregation and not secure_aggregation:
        raise AppRefused(
            site_id,
            "the round has no secure aggregation; this site requires it "
            "(fedgan site policy --allow-no-secagg to answer plain rounds)",
        )


def describe(policy: SitePolicy, path: Path) -> str:
    """The policy as `fedgan site policy` prints it."""
    lim = policy.limits
    lines = [
        f"approval file      {path}",
        f"policy             {policy.mode} "
        + (
            "(config-only FABs on an approved fedgan version)"
            if policy.mode == CONFIG_ONLY
            else "(config-only FABs whose SHA-256 is approved, on an approved fedgan version)"
        ),
        f"approved versions  {', '.join(policy.versions) or 'none'} "
        f"(installed: {installed_version()})",
        f"approved FABs      {', '.join(policy.hashes) or 'none'}",
        f"requires DP        {'yes' if lim.require_dp else 'no'}",
        f"min noise σ        {lim.min_noise_multiplier:g}",
        "max target ε       "
        + ("budget only" if lim.max_target_epsilon is None else f"{lim.max_target_epsilon:g}"),
        f"requires secagg    {'yes' if lim.require_secure_aggregation else 'no'}",
        f"min sites in a sum {lim.min_sites}",
        "threshold rule     "
        + (
            "t ≥ ⌊2n/3⌋ + 1 (default)"
            if lim.colluding_sites is None
            else f"t > (n + {lim.colluding_sites})/2, t ≥ {lim.colluding_sites + 2}"
        ),
        "max noise figure   "
        + ("no limit" if lim.max_noise_figure is None else f"{lim.max_noise_figure:g}"),
        "pretrained inits   "
        + (
            "refused"
            if lim.refuse_init
            else (", ".join(lim.init_hashes) if lim.init_hashes else "any")
        ),
    ]
    return "\n".join(lines)
