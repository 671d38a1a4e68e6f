"""What a site keeps in its work dir, made once when the site is set up.

The privacy ledger and the approval file are the site's guarantees: a ledger
read as empty would hand the silo a fresh ε budget, and a missing approval
file recreated with defaults would reset the site's limits. So neither is
ever created on first use. `ensure` (run when a site starts: the container's
entrypoint, the local federation) creates them only in an empty or new work
dir; a work dir holding anything else (a cache, reveal records, an adopted
CRL, Flower's state) and lacking the ledger stops the site with one line.
`init` (`fedgan site init`, a person's act, audited) also writes a missing
approval file back with the default limits, starts a ledger beside other
records only when told the silo never trained (``no_history``), and chains
a ledger an older version wrote only when told to (``upgrade_ledger``).
"""

from __future__ import annotations

from pathlib import Path

from fedgan.privacy.ledger import LedgerError, PrivacyLedger
from fedgan.site.approval import PolicyStore


def _used(work_dir: Path) -> list[str]:
    """What ``work_dir`` already holds: anything at all means a site ran
    here (deleting the ledger and its neighbours must not look new)."""
    return sorted(p.name for p in work_dir.iterdir()) if work_dir.is_dir() else []


def ensure(work_dir: Path, site_id: str) -> list[str]:
    """Set up a new site's work dir, or check that a used one holds its
    ledger (chained, whole) and approval file. Returns what it did."""
    work_dir = Path(work_dir)
    if not _used(work_dir):
        return init(work_dir, site_id)
    ledger = PrivacyLedger.in_work_dir(work_dir)
    if not ledger.path.exists():
        raise LedgerError(_missing_ledger(ledger, work_dir))
    ledger.records()  # a damaged or unchained ledger stops the site here, not mid-round
    PolicyStore(work_dir, site_id).load()
    return []


def init(
    work_dir: Path, site_id: str, *, no_history: bool = False, upgrade_ledger: bool = False
) -> list[str]:
    """Create what a site keeps and lacks: the approval file (default, strict
    limits) and the ledger. Returns what it did."""
    work_dir = Path(work_dir)
    fresh = not _used(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    store = PolicyStore(work_dir, site_id)
    ledger = PrivacyLedger.in_work_dir(work_dir)
    if not ledger.exists() and not (fresh or no_history):
        raise LedgerError(_missing_ledger(ledger, work_dir))
    done = []
    if upgrade_ledger:
        ledger.upgrade()
        store.audit.append("ledger_chained", site=site_id)
        done.append(f"chained the ledger {ledger.path} (written by an older version)")
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
    held = _used(work_dir)
    return (
        f"{ledger.path} is missing but {work_dir} is not new (it holds "
        f"{', '.join(held[:4])}{' …' if len(held) > 4 else ''}): restore the ledger from the "
        "site's backup; starting a new one would read as nothing spent. Only for a silo that "
        "has never trained: `fedgan site init --no-history`"
    )
