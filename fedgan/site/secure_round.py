"""A site's secure-aggregation stages over Flower's per-run context state.

The session (private keys, seeds, shares held) lives in ``context.state``,
which the SuperNode keeps in memory for the run and never sends anywhere;
the ClientApp process of each stage reloads it. Keys are advertised and
shared before the site trains, so a round that cannot reach its threshold
is abandoned before any site spends privacy budget. The ClientApp handlers
in `fedgan.site.client_app` call these.

Which survivor set the site signed is the one thing written to disk
(``<work-dir>/secagg-reveals/``, fsynced, before the signature leaves): a
site whose state was lost after it committed (a crash between its reply and
Flower saving the state, a restart) refuses to sign or reveal for another
set in that attempt at the round, so it never hands out both secrets of one
site. An attempt is named by the site's fresh key: a round the aggregator
retries after a crash is a new attempt, which the site trains (and its
ledger counts) again.

Keys for the next round can be asked for during this round's confirm stage
and wait beside this round's session (``NEXT``) until its unmasking, which
may bring the next round's roster: they then become the session and the
site shares them (`share_ahead`), so the next round opens with training."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedgan import wire
from fedgan.atomic import write_atomic
from fedgan.config.run import SiteSettings
from fedgan.pki import load_cert
from fedgan.round_numbers import Stat, clipped_fraction, encode
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.client import SiteSession
from fedgan.secagg.identity import Signer, Verifier
from fedgan.secagg.messages import Advertisement, EncryptedShare, RevealedShare, pack, unpack
from fedgan.secagg.params import ThresholdRule
from fedgan.site import credentials
from fedgan.site.approval import Limits
from fedgan.update import Contribution, flatten

SESSION = "secagg-session"
NEXT = "secagg-next-session"  # the next round's keys, sent ahead (`advertise`)
REVEALS = "secagg-reveals"
_NEEDS = ("signing-key", "signing-cert", "ca-cert", "crl", "membership")


def rule(limits: Limits) -> ThresholdRule:
    """The site's threshold rule, from its policy (`fedgan site policy`)."""
    return ThresholdRule(min_sites=limits.min_sites, colluding=limits.colluding_sites)


def _require(site: SiteSettings) -> None:
    missing = [k for k in _NEEDS if not getattr(site, k.replace("-", "_"))]
    if missing:
        raise SecAggError(
            f"site {site.site_id}: secure aggregation needs node config "
            f"{', '.join(repr(k) for k in missing)} (paths from the site kit)"
        )


def _verifier(site: SiteSettings) -> Verifier:
    _require(site)
    return credentials.load_verifier(
        Path(site.ca_cert), Path(site.crl), Path(site.membership), Path(site.work_dir)
    )


def _signer(site: SiteSettings) -> Signer:
    _require(site)
    return credentials.load_signer(Path(site.signing_key), Path(site.signing_cert), site.site_id)


def check_setup(
    site: SiteSettings, limits: Limits, params: SecAggParams, crl: bytes, members: bytes
) -> None:
    """Before the site trains or spends anything: its credentials load, the
    newest CRL and membership list it holds (newer CA-signed ones from the
    setup are kept) are current and list this site, and the round's n and t
    meet both the site's own rule and the consortium's. Raises SecAggError
    or PkiError with one line."""
    _require(site)
    ca, work = Path(site.ca_cert), Path(site.work_dir)
    credentials.adopt_crl(ca, Path(site.crl), work, crl)
    credentials.adopt_membership(ca, Path(site.membership), work, members)
    _verifier(site)
    _signer(site)
    rule(limits).check(params, site.site_id)
    consortium = credentials.current_membership(load_cert(ca), Path(site.membership), work)
    consortium.check_member(site.site_id, load_cert(Path(site.signing_cert)))
    if params.sites > len(consortium.sites):
        raise SecAggError(
            f"site {site.site_id}: the round asks {params.sites} sites; the consortium's "
            f"membership list (version {consortium.version}) has {len(consortium.sites)}"
        )
    consortium.rule.check(params, site.site_id)


def advertise(
    state: RecordDict,
    site: SiteSettings,
    params: SecAggParams,
    server_pk: bytes,
    limits: Limits,
    *,
    ahead: bool = False,
) -> Advertisement:
    """Stage 1, before the site trains: fresh round keys, signed. ``ahead``:
    for the next round, asked during this round's confirm stage; the keys
    wait beside this round's session until its unmasking is done."""
    session, ad = SiteSession.start(params, server_pk, _signer(site), rule(limits))
    _save(state, session, NEXT if ahead else SESSION)
    if not ahead and NEXT in state.config_records:
        del state[NEXT]  # a round that advertises on its own replaces any keys sent ahead
    return ad


def _load(state: RecordDict, site: SiteSettings) -> SiteSession:
    if SESSION not in state.config_records:
        raise SecAggError(
            f"site {site.site_id}: no secure-aggregation session (the SuperNode restarted "
            "mid-round); this site sits this round out"
        )
    return SiteSession.from_bytes(state.config_records[SESSION]["state"])  # type: ignore[arg-type]


def _save(state: RecordDict, session: SiteSession, slot: str = SESSION) -> None:
    state[slot] = ConfigRecord({"state": session.to_bytes()})


def share_keys(state: RecordDict, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Stage 2: check the roster's signatures, send encrypted shares."""
    roster = wire.secagg_list(content, "roster", Advertisement)
    return wire.secagg_message(shares=_share(state, site, roster))


def share_ahead(state: RecordDict, site: SiteSettings, roster: bytes) -> bytes:
    """Stage 2 of the next round, during this round's unmasking (after its
    reveals): the keys sent ahead become the session, checked against the
    next round's roster exactly as in a share stage of its own; the packed
    encrypted shares."""
    if NEXT not in state.config_records:
        raise SecAggError(
            f"site {site.site_id}: a roster for the next round, but no keys sent ahead for it"
        )
    state[SESSION] = state.config_records[NEXT]
    del state[NEXT]
    return _share(state, site, [Advertisement.from_dict(d) for d in unpack(roster)])


def _share(state: RecordDict, site: SiteSettings, roster: list[Advertisement]) -> bytes:
    session = _load(state, site)
    shares = session.share_keys(roster, _verifier(site))
    _save(state, session)
    return pack([s.as_dict() for s in shares])


def accept_shares(
    state: RecordDict, site: SiteSettings, inbox: list[EncryptedShare], u2: list[str]
) -> None:
    """Stage 3, before the site trains or spends: the shares addressed to it
    decrypt and the sharing set is sound, and this site has not trained in
    this attempt at the round before (recorded on disk, fsynced): a replayed
    or repeated train request neither spends budget twice nor masks a second
    update with the same masks, which would reveal the difference of the
    two. A retried round comes with fresh keys, so fresh masks."""
    session = _load(state, site)
    session.accept_shares(inbox, u2)
    marker = _committed(site, session).with_suffix(".trained")
    if marker.exists():
        raise SecAggError(
            f"site {site.site_id}: refusing; this site already trained in this attempt at round "
            f"{session.params.round} (recorded in {marker})"
        )
    write_atomic(marker, b"", mode=0o600, overwrite=False)
    _save(state, session)


def masked_input(
    state: RecordDict,
    site: SiteSettings,
    sent: Contribution,
    metrics: Mapping[str, float],
    stats: tuple[Stat, ...],
) -> bytes:
    """Stage 3, right after training: the masked, quantized update in its
    envelope, with the round's numbers (``stats``, from ``metrics``) appended
    inside the mask, so the aggregator learns only their sum."""
    session = _load(state, site)
    r = session.params.value_range
    values = flatten(sent)
    numbers = {**metrics, "secagg-clipped": clipped_fraction(values, r)}
    vector = np.concatenate([values, encode(stats, numbers, r)])
    if session.params.length != vector.size:
        raise SecAggError(f"site {site.site_id}: the update's size does not match the round's")
    envelope, _ = session.mask(vector)
    _save(state, session)
    return envelope


def _committed(site: SiteSettings, session: SiteSession) -> Path:
    """Per attempt, not per round: a round retried after a crash runs with
    fresh keys, so nothing signed or revealed in the lost attempt bears on
    it (and the ledger counts both trainings)."""
    return Path(site.work_dir) / REVEALS / f"{session.attempt}.json"


def _check_commitment(site: SiteSettings, session: SiteSession, survivors: list[str]) -> bool:
    """True if this site already committed to ``survivors`` in this attempt
    at the round; refuses if it committed to another set."""
    path = _committed(site, session)
    if not path.exists():
        return False
    try:
        earlier = json.loads(path.read_text("utf-8"))["survivors"]
    except (ValueError, KeyError, TypeError, OSError):
        earlier = None
    if earlier != sorted(survivors):
        raise SecAggError(
            f"site {site.site_id}: refusing; this site already signed another survivor set for "
            f"round {session.params.round} (recorded in {path}), and will not reveal for a "
            "second one"
        )
    return True


def confirm(state: RecordDict, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Stage 4: sign the survivor set, committing to it on disk first."""
    session = _load(state, site)
    survivors = wire.secagg_names(content, "survivors")
    already = _check_commitment(site, session, survivors)
    signature = session.confirm(survivors, _signer(site))
    if not already:
        record = {
            "run": session.params.run_id,
            "round": session.params.round,
            "survivors": session.survivors,
        }
        write_atomic(_committed(site, session), json.dumps(record).encode(), mode=0o600)
    _save(state, session)
    return wire.secagg_message(signature=signature)


def unmask(state: RecordDict, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Stage 5: shares of the survivors' seeds and the dropped sites' keys,
    for the survivor set this site signed and at least t others did too; the
    session is then forgotten."""
    session = _load(state, site)
    if session.stage == "confirmed" and not _check_commitment(site, session, session.survivors):
        raise SecAggError(
            f"site {site.site_id}: refusing to reveal; no record of the survivor set it signed"
        )
    reveals: list[RevealedShare] = session.unmask(wire.secagg_signatures(content, "signatures"))
    del state[SESSION]
    return wire.secagg_message(reveals=pack([r.as_dict() for r in reveals]))
