"""The records of a round's messages, in one place for both sides.

A train message carries the global G and D and the round config; the reply
carries the site's update and a few numbers. Numbers only: no pixel data, no
patient tags, no free text from the silo ever goes into a reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgan.round_numbers import CLEAR, KEPT_AT_SITE
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.messages import Advertisement, EncryptedShare, pack, unpack
from fedgan.update import Arrays, Contribution, Release, SiteUpdate

T = TypeVar("T")

GEN, DISC, CONFIG = "gen", "disc", "config"
GEN_DELTA, DISC_DELTA, METRICS, SITE = "gen-delta", "disc-delta", "metrics", "site"
RELEASE = "release"


def train_request(
    gen: Arrays,
    disc: Arrays,
    config: dict[str, int | float | bool],
    secagg: ConfigRecord | None = None,
) -> RecordDict:
    records = {GEN: ArrayRecord(gen), DISC: ArrayRecord(disc), CONFIG: ConfigRecord(config)}
    if secagg is not None:
        records[SECAGG] = secagg
    return RecordDict(records)


def read_train_request(content: RecordDict) -> tuple[Arrays, Arrays, dict]:
    return (
        content.array_records[GEN].to_numpy_ndarrays(),
        content.array_records[DISC].to_numpy_ndarrays(),
        dict(content.config_records[CONFIG]),
    )


def train_reply(sent: Contribution, site_id: str, metrics: dict[str, float]) -> RecordDict:
    """A plain round's reply: the update in the clear (the site's policy
    allowed it) and its numbers, less those that tell its image count."""
    metrics = {k: v for k, v in metrics.items() if k not in KEPT_AT_SITE}
    arrays = (
        {RELEASE: ArrayRecord([sent.values])}
        if isinstance(sent, Release)
        else {GEN_DELTA: ArrayRecord(sent.gen), DISC_DELTA: ArrayRecord(sent.disc)}
    )
    return RecordDict(
        {
            **arrays,
            METRICS: MetricRecord({"num-examples": sent.weight, **metrics}),
            SITE: ConfigRecord({"site-id": site_id}),
        }
    )


def budget_reply(site_id: str, spent: float, after: float, budget: float) -> RecordDict:
    """A site's refusal: its ε would pass its budget. Numbers only."""
    return RecordDict(
        {
            METRICS: MetricRecord(
                {
                    "budget-exhausted": 1.0,
                    "epsilon": spent,
                    "epsilon-next": after,
                    "epsilon-budget": budget,
                }
            ),
            SITE: ConfigRecord({"site-id": site_id}),
        }
    )


def read_train_reply_metrics(content: RecordDict) -> tuple[str, dict[str, float]]:
    """(site id, metrics) of a train reply, without reading any update."""
    metrics = {k: float(v) for k, v in content.metric_records[METRICS].items()}
    return str(content.config_records[SITE]["site-id"]), metrics


def read_train_reply(content: RecordDict) -> tuple[Contribution | None, str, dict[str, float]]:
    """(what the site sent, site id, metrics); None when the site refused."""
    site_id, metrics = read_train_reply_metrics(content)
    if metrics.get("budget-exhausted"):
        return None, site_id, metrics
    if RELEASE in content.array_records:
        arrays = content.array_records[RELEASE].to_numpy_ndarrays()
        if len(arrays) != 1:
            raise ValueError(f"a release is one array, this reply carries {len(arrays)}")
        return Release(arrays[0], metrics.pop("num-examples")), site_id, metrics
    update = SiteUpdate(
        gen=content.array_records[GEN_DELTA].to_numpy_ndarrays(),
        disc=content.array_records[DISC_DELTA].to_numpy_ndarrays(),
        weight=metrics.pop("num-examples"),
    )
    return update, site_id, metrics


# -- secure aggregation --------------------------------------------------------
# The protocol's own messages (`fedgan.secagg.messages`) travel as packed
# bytes in one ConfigRecord; these helpers only wrap and unwrap them.

SECAGG = "secagg"


@dataclass(frozen=True)
class SecAggSetup:
    """What a secure round's train request carries besides the model: the
    parameters, the aggregator's round key, and the newest CRL and membership
    list the aggregator holds (sites keep them only if the CA signed them and
    they are newer than theirs; b"": none sent)."""

    params: SecAggParams
    server_pk: bytes
    crl: bytes = b""
    membership: bytes = b""


def secagg_setup(setup: SecAggSetup) -> ConfigRecord:
    return ConfigRecord(
        {
            **setup.params.as_dict(),
            "server-pk": setup.server_pk,
            "crl": setup.crl,
            "membership": setup.membership,
        }
    )


def read_secagg_setup(content: RecordDict) -> SecAggSetup | None:
    """The round's secure-aggregation setup, or None for a plain round."""
    if SECAGG not in content.config_records:
        return None
    record = dict(content.config_records[SECAGG])
    extras = [record.pop(k, b"") for k in ("server-pk", "crl", "membership")]
    if not all(isinstance(x, bytes) for x in extras) or not extras[0]:
        raise SecAggError("malformed secure-aggregation setup: no server key")
    server_pk, crl, members = extras
    return SecAggSetup(SecAggParams.from_dict(record), server_pk, crl, members)


def advertise_request(config: dict[str, int | float | bool], setup: SecAggSetup) -> RecordDict:
    """A secure round's first message, before anyone trains: the round's
    contract (so the site checks its limits first) and the setup."""
    return RecordDict({CONFIG: ConfigRecord(config), SECAGG: secagg_setup(setup)})


def read_advertise_request(content: RecordDict) -> tuple[dict, SecAggSetup]:
    setup = read_secagg_setup(content)
    if setup is None:
        raise SecAggError("malformed secure-aggregation setup: none in the request")
    return dict(content.config_records[CONFIG]), setup


def advertise_reply(ad: Advertisement, site_id: str) -> RecordDict:
    """The site's signed round keys; nothing about its data."""
    return RecordDict(
        {
            SITE: ConfigRecord({"site-id": site_id}),
            SECAGG: ConfigRecord({"advertisement": pack_advertisement(ad)}),
        }
    )


# Stages 1 and 2 of the next round ride on stages 4 and 5 of this one (issue
# 34): the confirm request may carry the next round's contract and setup
# (NEXT_CONFIG, NEXT_SECAGG) and its reply that site's fresh, signed keys for
# it; the unmask request may then carry the next round's roster and its reply
# that site's encrypted shares for it. The next round then starts with the
# train message, two Flower messages (about 7 s) sooner. Any doubt and the
# next round advertises and shares on its own.
NEXT_CONFIG, NEXT_SECAGG = "next-config", "next-secagg"


def secagg_request(
    lookahead: tuple[dict[str, int | float | bool], SecAggSetup] | None = None,
    **fields: bytes | list[str],
) -> RecordDict:
    """A confirm request (``survivors``) or an unmask request
    (``signatures``), with the next round's advertise request when the
    aggregator plans that round for this site."""
    content = secagg_message(**fields)
    if lookahead is not None:
        config, setup = lookahead
        content[NEXT_CONFIG] = ConfigRecord(config)
        content[NEXT_SECAGG] = secagg_setup(setup)
    return content


def read_lookahead(content: RecordDict) -> tuple[dict, SecAggSetup] | None:
    """The next round's advertise request inside a confirm request, or None."""
    if NEXT_CONFIG not in content.config_records:
        return None
    inner = RecordDict(
        {
            CONFIG: content.config_records[NEXT_CONFIG],
            SECAGG: content.config_records.get(NEXT_SECAGG, ConfigRecord()),
        }
    )
    return read_advertise_request(inner)


def with_next(content: RecordDict, **fields: bytes) -> RecordDict:
    """``content`` carrying the next round's ``fields`` (an advertisement,
    a roster, shares) beside this round's."""
    content[NEXT_SECAGG] = ConfigRecord(dict(fields))
    return content


def next_bytes(content: RecordDict, key: str) -> bytes | None:
    """The next round's ``key`` in a message, None when it carries none (a
    site that refused the roster ahead sends ``refused`` and no ``shares``)."""
    if key not in content.config_records.get(NEXT_SECAGG, ConfigRecord()):
        return None
    return secagg_bytes(RecordDict({SECAGG: content.config_records[NEXT_SECAGG]}), key)


def masking_record(inbox: list[EncryptedShare], u2: list[str]) -> ConfigRecord:
    """What a secure round's train request carries instead of a setup: the
    shares addressed to the site and the sites that shared (U2)."""
    return ConfigRecord({"inbox": pack([s.as_dict() for s in inbox]), "u2": list(u2)})


def read_masking(content: RecordDict) -> tuple[list[EncryptedShare], list[str]] | None:
    """(the site's inbox, U2) of a secure round's train request, or None for
    a plain round."""
    if SECAGG not in content.config_records:
        return None
    return secagg_list(content, "inbox", EncryptedShare), secagg_names(content, "u2")


def masked_reply(
    site_id: str, metrics: dict[str, float], envelope: bytes, weight: float | None = None
) -> RecordDict:
    """A trained site's reply under secure aggregation: its masked update,
    sealed to the aggregator, and in the clear only the privacy ledger's
    figures (`round_numbers.CLEAR`); its other numbers are inside the mask.
    ``weight``: a release's noisy count (part of its DP release); an update
    sends none."""
    sent = {k: v for k, v in metrics.items() if k in CLEAR}
    if weight is not None:
        sent["num-examples"] = weight
    return RecordDict(
        {
            METRICS: MetricRecord(sent),
            SITE: ConfigRecord({"site-id": site_id}),
            SECAGG: ConfigRecord({"envelope": envelope}),
        }
    )


def read_advertisement(content: RecordDict) -> Advertisement:
    return unpack_advertisement(secagg_bytes(content, "advertisement"))


def pack_advertisement(ad: Advertisement) -> bytes:
    return pack([ad.as_dict()])


def unpack_advertisement(raw: bytes) -> Advertisement:
    items = unpack(raw)
    if len(items) != 1:
        raise SecAggError("a train reply carries exactly one advertisement")
    return Advertisement.from_dict(items[0])


def secagg_message(**fields: bytes | list[str]) -> RecordDict:
    return RecordDict({SECAGG: ConfigRecord(dict(fields))})


def secagg_bytes(content: RecordDict, key: str) -> bytes:
    try:
        value = content.config_records[SECAGG][key]
    except KeyError:
        raise SecAggError(f"secure-aggregation message without {key!r}") from None
    if not isinstance(value, bytes):
        raise SecAggError(f"secure-aggregation field {key!r} is not bytes")
    return value


def secagg_list(content: RecordDict, key: str, kind: type[T]) -> list[T]:
    """A packed list of protocol messages of one kind."""
    return [kind.from_dict(d) for d in unpack(secagg_bytes(content, key))]  # type: ignore[attr-defined]


def secagg_signatures(content: RecordDict, key: str) -> dict[str, bytes]:
    """Site id → signature, as the unmask request carries them."""
    items = unpack(secagg_bytes(content, key))
    out: dict[str, bytes] = {}
    for item in items:
        site, signature = item.get("site"), item.get("signature")
        if not isinstance(site, str) or not isinstance(signature, bytes) or site in out:
            raise SecAggError(f"secure-aggregation field {key!r} is not a list of signatures")
        out[site] = signature
    return out


def pack_signatures(signatures: dict[str, bytes]) -> bytes:
    return pack([{"site": s, "signature": sig} for s, sig in sorted(signatures.items())])


def secagg_names(content: RecordDict, key: str) -> list[str]:
    value = content.config_records[SECAGG].get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SecAggError(f"secure-aggregation field {key!r} is not a list of site ids")
    return list(value)


# -- refusals ------------------------------------------------------------------
# A site that will not run an app bundle or a run's settings raises; Flower
# carries the exception's text to the ServerApp as the error reply's reason.

_REFUSAL = re.compile(r"refused by site ([a-z0-9][a-z0-9-]*): (.+?)(?:'>)?\s*$", re.S)


def refusal_text(site_id: str, reason: str) -> str:
    return f"refused by site {site_id}: {reason}"


def parse_refusal(text: str) -> tuple[str, str] | None:
    """(site id, reason) from a refusal as it arrives in an error reply."""
    m = _REFUSAL.search(text)
    return (m.group(1), m.group(2).strip()) if m else None
