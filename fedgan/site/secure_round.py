"""A site's secure-aggregation stages over Flower's per-run context state.

The session (private keys, seeds, shares held) and the update waiting to be
masked live in ``context.state``, which the SuperNode keeps in memory for
the run and never sends anywhere; the ClientApp process of each stage
reloads them. The ClientApp handlers in `fedgan.site.client_app` call these."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgan import wire
from fedgan.config.run import SiteSettings
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.client import SiteSession
from fedgan.secagg.identity import Verifier
from fedgan.secagg.messages import Advertisement, EncryptedShare, RevealedShare, pack
from fedgan.site import credentials
from fedgan.update import Contribution, flatten

SESSION, PENDING = "secagg-session", "secagg-update"


def _require(site: SiteSettings, *keys: str) -> None:
    missing = [k for k in keys if not getattr(site, k.replace("-", "_"))]
    if missing:
        raise SecAggError(
            f"site {site.site_id}: secure aggregation needs node config "
            f"{', '.join(repr(k) for k in missing)} (paths from `fedgan pki issue-site`)"
        )


def _verifier(site: SiteSettings) -> Verifier:
    _require(site, "ca-cert")
    return credentials.load_verifier(Path(site.ca_cert), Path(site.crl) if site.crl else None)


def advertise(
    state: RecordDict,
    site: SiteSettings,
    params: SecAggParams,
    server_pk: bytes,
    sent: Contribution,
) -> Advertisement:
    """Stage 1: fresh round keys, signed; the update is held back."""
    _require(site, "signing-key", "signing-cert")
    values = flatten(sent)
    if params.length != values.size:
        raise SecAggError(f"site {site.site_id}: the update's size does not match the round's")
    signer = credentials.load_signer(Path(site.signing_key), Path(site.signing_cert), site.site_id)
    session, ad = SiteSession.start(params, server_pk, signer, max(1, round(sent.weight)))
    _save(state, session)
    state[PENDING] = ArrayRecord([values])
    return ad


def _load(state: RecordDict, site: SiteSettings) -> SiteSession:
    if SESSION not in state.config_records:
        raise SecAggError(
            f"site {site.site_id}: no secure-aggregation session (the SuperNode restarted "
            "mid-round); this site sits this round out"
        )
    return SiteSession.from_bytes(state.config_records[SESSION]["state"])  # type: ignore[arg-type]


def _save(state: RecordDict, session: SiteSession) -> None:
    state[SESSION] = ConfigRecord({"state": session.to_bytes()})


def share_keys(state: RecordDict, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Stage 2: check the roster's signatures, send encrypted shares."""
    session = _load(state, site)
    roster = wire.secagg_list(content, "roster", Advertisement)
    shares = session.share_keys(roster, _verifier(site))
    _save(state, session)
    return wire.secagg_message(shares=pack([s.as_dict() for s in shares]))


def masked_input(state: RecordDict, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Stage 3: the masked, quantized update in its envelope, and the
    fraction of its values clipped to the range (a number only)."""
    session = _load(state, site)
    inbox = wire.secagg_list(content, "inbox", EncryptedShare)
    u2 = wire.secagg_names(content, "u2")
    update = state.array_records[PENDING].to_numpy_ndarrays()[0]
    envelope, clipped = session.masked_input(update, inbox, u2)
    _save(state, session)
    del state[PENDING]
    reply = wire.secagg_message(envelope=envelope)
    reply[wire.METRICS] = MetricRecord({"secagg-clipped": clipped})
    return reply


def unmask(state: RecordDict, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Stage 4: shares of the survivors' seeds and the dropped sites' keys;
    the session is then forgotten."""
    session = _load(state, site)
    reveals: list[RevealedShare] = session.unmask(
        wire.secagg_names(content, "survivors"), wire.secagg_names(content, "dropped")
    )
    del state[SESSION]
    return wire.secagg_message(reveals=pack([r.as_dict() for r in reveals]))
