"""The aggregator's side of a secure-aggregation round over a `Transport`.
`fedgan.aggregator.round` sends stage 1 (keys advertised, before training)
and stage 3 (training and masking, the train message); this drives stage 2
(shares) and stages 4-5 (the consistency check, unmasking) and returns the
aggregate.
Protocol decisions are `fedgan.secagg.server`'s; this only
moves records and notes who answered, with how many bytes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from flwr.app import RecordDict

from fedgan import wire
from fedgan.aggregator.transport import Request, Transport
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.messages import Advertisement, EncryptedShare, RevealedShare, pack, unpack
from fedgan.secagg.server import Aggregate, ServerSession

log = logging.getLogger("fedgan.server")
T = TypeVar("T")


@dataclass
class SecureRound:
    transport: Transport
    params: SecAggParams
    timeout: float
    crl: bytes = b""  # the newest CRL the aggregator holds, for the setup
    membership: bytes = b""  # the newest membership list, likewise
    session: ServerSession = field(init=False)
    nodes: dict[str, int] = field(default_factory=dict)  # site id -> node id
    bytes_sent: dict[str, int] = field(default_factory=dict)  # per site, all stages
    failures: dict[str, str] = field(default_factory=dict)  # site -> why it dropped out

    def __post_init__(self) -> None:
        self.session = ServerSession(self.params)

    def setup(self) -> wire.SecAggSetup:
        return wire.SecAggSetup(self.params, self.session.public_key, self.crl, self.membership)

    def _count(self, site: str, *payloads: bytes) -> None:
        self.bytes_sent[site] = self.bytes_sent.get(site, 0) + sum(len(p) for p in payloads)

    def _exchange(
        self,
        stage: str,
        requests: dict[str, RecordDict],
        field: str,
        parse: Callable[[bytes], T],
    ) -> dict[str, T]:
        """Send one stage's requests; each reply's ``field``, parsed. A site
        that errs, times out or sends something unreadable is noted in
        ``failures`` and left out; the bytes each site sent are counted."""
        outgoing = [
            Request(self.nodes[site], f"train.{stage}", f"{self.params.round}-{stage}", content)
            for site, content in sorted(requests.items())
        ]
        by_node = {node: site for site, node in self.nodes.items()}
        out: dict[str, T] = {}
        for reply in self.transport.exchange(outgoing, self.timeout):
            site = by_node.get(reply.node)
            if site is None:
                continue
            if reply.content is None:
                self.failures[site] = f"{stage}: {reply.error}"
                log.warning(
                    "round %d: site %s failed at %s: %s",
                    self.params.round,
                    site,
                    stage,
                    reply.error,
                )
                continue
            try:
                raw = wire.secagg_bytes(reply.content, field)
                out[site] = parse(raw)
            except SecAggError as exc:
                self.failures[site] = f"{stage}: {exc}"
                continue
            self._count(site, raw)
        for site in requests:
            if site not in out and site not in self.failures:
                self.failures[site] = f"{stage}: no reply within {self.timeout:.0f} s"
        return out

    def share(self, ads: dict[int, Advertisement]) -> dict[str, list[EncryptedShare]]:
        """Stage 2, before anyone trains: broadcast the roster of the sites
        that advertised (node → ad), collect their encrypted shares and route
        them. Returns each sharing site's inbox; raises RoundAborted when
        fewer than the threshold remain, so no site trains for nothing."""
        with self._noting_refusals():
            for node, ad in ads.items():
                self.nodes[ad.site_id] = node
                self._count(ad.site_id, ad.c_pk, ad.s_pk, ad.cert_pem, ad.signature)
            roster = self.session.advertised(list(ads.values()))
            packed = pack([a.as_dict() for a in roster])
            shares = self._exchange(
                "secagg_share",
                {a.site_id: wire.secagg_message(roster=packed) for a in roster},
                "shares",
                lambda raw: [EncryptedShare.from_dict(d) for d in unpack(raw)],
            )
            return self.session.shared(shares)

    def finish(self, envelopes: dict[str, bytes]) -> Aggregate:
        """Stages 4-5 after the sites trained and sent their masked updates
        (site → envelope): the consistency check and unmasking."""
        with self._noting_refusals():
            for site, envelope in envelopes.items():
                self._count(site, envelope)
            survivors, _ = self.session.received_masked(envelopes)
            signatures = self._exchange(
                "secagg_confirm",
                {s: wire.secagg_message(survivors=survivors) for s in survivors},
                "signature",
                lambda raw: raw,
            )
            confirmed = self.session.confirmed(signatures)
            packed = wire.pack_signatures(confirmed)
            reveals = self._exchange(
                "secagg_unmask",
                {s: wire.secagg_message(signatures=packed) for s in confirmed},
                "reveals",
                lambda raw: [RevealedShare.from_dict(d) for d in unpack(raw)],
            )
            return self.session.unmasked(reveals)

    def note(self, site: str, why: str) -> None:
        """A site that shared keys but sent no masked update (it failed or
        refused while training)."""
        self.failures.setdefault(site, why)

    @contextmanager
    def _noting_refusals(self) -> Iterator[None]:
        try:
            yield
        finally:
            for site, why in self.session.refused.items():
                self.failures.setdefault(site, why)

    def summary(self) -> dict:
        """For metrics.jsonl and the audit: parameters, who made it, why
        others did not (reasons only, never key material)."""
        s = self.session
        survivors = sorted(s.masked)
        return {
            "threshold": self.params.threshold,
            "bits": self.params.bits,
            "modulus_bits": self.params.modulus_bits,
            "value_range": self.params.value_range,
            "survivors": survivors,
            "dropped": [x for x in s.u2 if x not in s.masked],
            "failures": dict(sorted(self.failures.items())),
        }
