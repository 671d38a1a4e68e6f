"""The aggregator's side of a secure-aggregation round over a `Transport`.
`fedgan.aggregator.round` sends stage 1 (keys advertised, before training)
and stage 3 (training and masking, the train message); this drives stage 2
(shares) and stages 4-5 (the consistency check, unmasking) and returns the
aggregate. Each round but the last carries stages 1 and 2 of the next one
on its stages 4 and 5 (`Ahead`): the next round, if it starts as planned,
opens with training, two Flower messages sooner.
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
    # Stage 2's result, when it rode on the previous round (`Ahead`).
    routed: dict[str, list[EncryptedShare]] | None = None

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
        also: Callable[[str, RecordDict], None] | None = None,
    ) -> dict[str, T]:
        """Send one stage's requests; each reply's ``field``, parsed. A site
        that errs, times out or sends something unreadable is noted in
        ``failures`` and left out; the bytes each site sent are counted.
        ``also`` sees each good reply whole, after its field was read."""
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
            if also is not None:
                also(site, reply.content)
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
            packed = self._roster(ads)
            shares = self._exchange(
                "secagg_share",
                {site: wire.secagg_message(roster=packed) for site in self.session.roster},
                "shares",
                _shares,
            )
            return self.session.shared(shares)

    def _roster(self, ads: dict[int, Advertisement], count: bool = True) -> bytes:
        for node, ad in ads.items():
            self.nodes[ad.site_id] = node
            if count:  # keys sent ahead counted in the round that carried them
                self._count(ad.site_id, ad.c_pk, ad.s_pk, ad.cert_pem, ad.signature)
        return pack([a.as_dict() for a in self.session.advertised(list(ads.values()))])

    def finish(self, envelopes: dict[str, bytes], ahead: Ahead | None = None) -> Aggregate:
        """Stages 4-5 after the sites trained and sent their masked updates
        (site → envelope): the consistency check and unmasking. With
        ``ahead``, the next round's stages 1 and 2 ride on them, if every
        site it plans is a survivor here: its setup on the confirm requests
        (keys back), its roster on the unmask requests (shares back)."""
        with self._noting_refusals():
            for site, envelope in envelopes.items():
                self._count(site, envelope)
            survivors, _ = self.session.received_masked(envelopes)
            asked = ahead.sites(self.nodes, survivors) if ahead is not None else {}
            ads: dict[int, Advertisement] = {}
            setup = ahead.request() if ahead is not None else None
            signatures = self._exchange(
                "secagg_confirm",
                {
                    s: wire.secagg_request(setup if s in asked else None, survivors=survivors)
                    for s in survivors
                },
                "signature",
                lambda raw: raw,
                also=lambda site, content: self._ahead_field(
                    site, asked.get(site), content, "advertisement", wire.unpack_advertisement, ads
                ),
            )
            confirmed = self.session.confirmed(signatures)
            packed = wire.pack_signatures(confirmed)
            roster = (
                ahead.roster(ads)
                if ahead is not None and asked and len(ads) == len(asked)
                else None
            )
            shares: dict[int, list[EncryptedShare]] = {}
            reveals = self._exchange(
                "secagg_unmask",
                {
                    s: wire.with_next(wire.secagg_message(signatures=packed), roster=roster)
                    if roster is not None and s in asked
                    else wire.secagg_message(signatures=packed)
                    for s in confirmed
                },
                "reveals",
                lambda raw: [RevealedShare.from_dict(d) for d in unpack(raw)],
                also=lambda site, content: self._ahead_shares(
                    site, asked.get(site), content, shares, ahead
                ),
            )
            if roster is not None and ahead is not None and len(shares) == len(asked):
                ahead.take(shares)
            return self.session.unmasked(reveals)

    def _ahead_field(
        self,
        site: str,
        node: int | None,
        content: RecordDict,
        key: str,
        parse: Callable[[bytes], T],
        into: dict[int, T],
    ) -> None:
        """The next round's ``key`` in a reply from a site the next round
        plans (``node``), parsed into ``into`` if it reads. Its bytes count
        in this round, whose exchange carried them, whether or not the next
        round uses them. A site that sent none or an unreadable one makes the
        next round run its own stages."""
        if node is None:
            return
        try:
            raw = wire.next_bytes(content, key)
            if raw is None:
                return
            self._count(site, raw)
            into[node] = parse(raw)
        except (SecAggError, KeyError, TypeError, ValueError) as exc:
            log.warning(
                "round %d: site %s: an unreadable %s ahead (%s)", self.params.round, site, key, exc
            )

    def _ahead_shares(
        self,
        site: str,
        node: int | None,
        content: RecordDict,
        into: dict[int, list[EncryptedShare]],
        ahead: Ahead | None,
    ) -> None:
        self._ahead_field(site, node, content, "shares", _shares, into)
        if ahead is None or node is None:
            return
        try:
            why = wire.next_bytes(content, "refused")
        except SecAggError:
            why = None
        if why:
            ahead.refused[site] = why.decode("utf-8", "replace")[:300]

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


def _shares(raw: bytes) -> list[EncryptedShare]:
    return [EncryptedShare.from_dict(d) for d in unpack(raw)]


@dataclass
class Ahead:
    """The next round's stages 1 and 2, riding on this round's 4 and 5
    (issue 34: each Flower message costs a round about 3.5 s). ``secure`` is
    the next round's own `SecureRound`; it keeps what the sites send back
    only when every site the next round samples (``nodes``) took part, and
    the next round uses it only if it starts exactly as planned
    (`fedgan.aggregator.round`)."""

    secure: SecureRound
    contract: dict
    nodes: list[int]
    refused: dict[str, str] = field(default_factory=dict)  # site -> why it refused the roster

    @property
    def round(self) -> int:
        return self.secure.params.round

    def request(self) -> tuple[dict, wire.SecAggSetup]:
        return self.contract, self.secure.setup()

    def sites(self, site_nodes: dict[str, int], survivors: list[str]) -> dict[str, int]:
        """This round's survivors that the next round plans (site → node);
        none unless the plan's sites all are."""
        asked = {s: site_nodes[s] for s in survivors if site_nodes.get(s) in self.nodes}
        return asked if len(asked) == len(self.nodes) else {}

    def roster(self, ads: dict[int, Advertisement]) -> bytes | None:
        try:
            with self.secure._noting_refusals():
                return self.secure._roster(ads, count=False)
        except SecAggError as exc:
            log.warning("round %d: no roster ahead: %s", self.round, exc)
            return None

    def take(self, shares: dict[int, list[EncryptedShare]]) -> None:
        sent = {site: shares[node] for site, node in self.secure.nodes.items() if node in shares}
        try:
            with self.secure._noting_refusals():
                self.secure.routed = self.secure.session.shared(sent)
        except SecAggError as exc:
            log.warning("round %d: the shares sent ahead do not route: %s", self.round, exc)
