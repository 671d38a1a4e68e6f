"""What a site keeps in its work dir, made once when the site is set up.

The privacy ledger and the approval file are the site's guarantees: a ledger
read as empty would hand the silo a fresh ε budget, and a missing approval
file recreated with defaults would reset the site's limits. So neither is
ever created on first use. `ensure` (run when a site starts: the container's
entrypoint, the local federation) creates them only in a work dir that holds
nothing of a site yet; a work dir that holds some of it and lacks the ledger
stops the site with one line. `init` (`fedgan site init`, a person's act,
audited) also writes a missing approval file back with the default limits,
and starts a ledger beside other records only when told the silo never
trained (`no_history`).
"""

from __future__ import annotations

from pathlib import Path

from fedgan.privacy.ledger import LedgerError, PrivacyLedger
from fedgan.site.approval import POLICY_FILE, SITE_AUDIT_FILE, PolicyStore


def _kept(work_dir: Path) -> list[str]:
    """The site's records already in ``work_dir``."""
    ledger = PrivacyLedger.in_work_dir(work_dir)
    names = [ledger.path, ledger.head, work_dir / POLICY_FILE, work_dir / SITE_AUDIT_FILE]
    return [p.name for p in names if p.exists()]


def ensure(work_dir: Path, site_id: str) -> list[str]:
    """Set up a new site's work dir, upgrade an old ledger, or check that a
    used one holds its ledger and approval file. Returns what it did."""
    work_dir = Path(work_dir)
    if not _kept(work_dir):
        return init(work_dir, site_id)
    done = []
    ledger = PrivacyLedger.in_work_dir(work_dir)
    if ledger.upgrade():
        done.append(f"chained the ledger {ledger.path.name} (written by an older version)")
        PolicyStore(work_dir, site_id).audit.append("ledger_chained", site=site_id)
    if not ledger.path.exists():
        raise LedgerError(_missing_ledger(ledger, work_dir))
    ledger.records()  # a damaged ledger stops the site here, not mid-round
    PolicyStore(work_dir, site_id).load()
    return done


def init(work_dir: Path, site_id: str, *, no_history: bool = False) -> list[str]:
    """Create what a site keeps and lacks: the approval file (default, strict
    limits) and the ledger. Returns what it created."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fresh = not _kept(work_dir)
    store = PolicyStore(work_dir, site_id)
    ledger = PrivacyLedger.in_work_dir(work_dir)
    if not ledger.exists() and not (fresh or no_history):
        raise LedgerError(_missing_ledger(ledger, work_dir))
    if ledger.exists() and ledger.upgrade():
        store.audit.append("ledger_chained", site=site_id)
    done = []
    if not store.path.exists():
        store.create()
        done.append(f"wrote {store.path} (default limits: DP and secure aggregation required)")
    if not ledger.exists():
        ledger.create(site_id)
        store.audit.append(
            "ledger_created", site=site_id, no_history=no_history, fresh_work_dir=fresh
        )
        done.append(f"started the privacy ledger {ledger.path} (nothing spent)")
    ledger.records()
    return done


def _missing_ledger(ledger: PrivacyLedger, work_dir: Path) -> str:
    return (
        f"{ledger.path} is missing but {work_dir} holds this site's other records "
        f"({', '.join(_kept(work_dir))}): restore the ledger from the site's backup; starting "
        "a new one would read as nothing spent. Only for a silo that has never trained: "
        "`fedgan site init --no-history`"
    )
