"""Whole aggregator rounds in memory, for the unit tests: the aggregator's
real round (`fedgan.aggregator.round`) over an in-memory transport whose
sites answer with the real wire records and, under secure aggregation, the
real site side of the protocol (`fedgan.site.secure_round`) with keys and
certificates from a throwaway consortium PKI. No process, no network."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import RecordDict

from fedgan import pki, round_numbers, wire
from fedgan.aggregator.mechanisms import mechanism_for
from fedgan.aggregator.preview import Preview
from fedgan.aggregator.round import Federation
from fedgan.aggregator.run import start
from fedgan.aggregator.run_store import RunOutputs
from fedgan.aggregator.transport import Reply, Request
from fedgan.audit_log import AuditLog
from fedgan.config.appbundle import default_run_config
from fedgan.config.run import RunSettings, SiteSettings
from fedgan.errors import FedGanError
from fedgan.secagg.messages import Advertisement, pack, unpack
from fedgan.site import client_app, secure_round
from fedgan.site.approval import AppRefused, Limits
from fedgan.update import Release, SiteUpdate

# A tiny model: the round's arithmetic, not the GAN, is under test.
SMALL = {"image-size": 16, "channels": 1, "latent-dim": 8, "width": 8}


@dataclass
class MemorySite:
    """One site: a fixed update (its delta is ``step`` in every value of G
    and D, times its weight), or a refusal, or silence at a chosen stage."""

    site_id: str
    weight: float
    step: float
    settings: SiteSettings
    # "secagg_advertise", "secagg_share", "train", "secagg_confirm" or "secagg_unmask"
    silent_at: str = ""
    error_at: str = ""  # the stage at which it answers with this error
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    state: RecordDict = field(default_factory=RecordDict)  # Flower's per-run node state
    # The protocol's floor (t > n/2, n ≥ 2), so that the aggregator's
    # arithmetic is tested at any n; the sites' default rule has its own tests.
    limits: Limits = field(default_factory=lambda: Limits(min_sites=2, colluding_sites=0))
    trained: int = 0  # train requests answered: a site spends ε only there
    keys_ahead: bool = True  # sends the next round's keys with its signature when asked
    # It receives the next round's roster with one peer's signature forged.
    tampered_roster_ahead: bool = False

    def answer(self, request: Request) -> RecordDict | str | None:
        stage = request.kind.removeprefix("train.")
        if stage == self.silent_at:
            return None
        if stage == self.error_at:
            return self.error
        if stage == "train":
            return self._train(request.content)
        if stage == "secagg_advertise":
            _, setup = wire.read_advertise_request(request.content)
            ad = self._advertise(setup)
            return ad if isinstance(ad, str) else wire.advertise_reply(ad, self.site_id)
        if stage == "secagg_confirm":
            reply = secure_round.confirm(self.state, self.settings, request.content)
            ahead = wire.read_lookahead(request.content)
            if ahead is not None and self.keys_ahead:
                ad = self._advertise(ahead[1], ahead=True)
                if not isinstance(ad, str):
                    wire.with_next(reply, advertisement=wire.pack_advertisement(ad))
            return reply
        if stage == "secagg_unmask":
            reply = secure_round.unmask(self.state, self.settings, request.content)
            content = request.content
            if self.tampered_roster_ahead and wire.next_bytes(content, "roster") is not None:
                content = _with_a_forged_signature(content)
            # The real site code: shares, or the refusal (audited), or nothing.
            sent = client_app.shares_ahead(self.state, self.settings, "memory-run", content)
            return wire.with_next(reply, **sent) if sent else reply
        return secure_round.share_keys(self.state, self.settings, request.content)

    def update_for(self, gen: list[np.ndarray], disc: list[np.ndarray]) -> SiteUpdate:
        return SiteUpdate(
            gen=[np.full_like(a, self.step) for a in gen],
            disc=[np.full_like(a, self.step) for a in disc],
            weight=self.weight,
        )

    def release_for(self, record: dict) -> Release:
        """A release of the round's shape: classes × (2·features + 1)."""
        rows = max(len([c for c in str(record["classes"]).split(",") if c]), 1)
        shape = (rows, 2 * int(record["embedding-features"]) + 1)
        return Release(np.full(shape, self.step, dtype=np.float32), self.weight)

    def _train(self, content: RecordDict) -> RecordDict:
        gen, disc, record = wire.read_train_request(content)
        update = self.release_for(record) if record["mechanism"] == "mean-embedding" else None
        update = update or self.update_for(gen, disc)
        metrics = {"g-loss": 1.0 + self.step, "d-loss": 2.0, "update-clipped": 0.0}
        metrics |= self.metrics
        self.trained += 1
        masking = wire.read_masking(content)
        if masking is None:
            return wire.train_reply(update, self.site_id, metrics)
        secure_round.accept_shares(self.state, self.settings, *masking)
        stats = round_numbers.stats_for(record["mechanism"] == "mean-embedding")
        envelope = secure_round.masked_input(self.state, self.settings, update, metrics, stats)
        weight = update.weight if isinstance(update, Release) else None
        return wire.masked_reply(self.site_id, metrics, envelope, weight)

    def _advertise(self, setup: wire.SecAggSetup, ahead: bool = False) -> Advertisement | str:
        try:
            secure_round.check_setup(
                self.settings, self.limits, setup.params, setup.crl, setup.membership
            )
        except FedGanError as exc:
            return str(AppRefused(self.site_id, str(exc)))
        return secure_round.advertise(
            self.state, self.settings, setup.params, setup.server_pk, self.limits, ahead=ahead
        )


def _with_a_forged_signature(content: RecordDict) -> RecordDict:
    """An unmask request whose roster ahead has one peer's signature flipped,
    as an aggregator substituting keys would send it."""
    roster = unpack(wire.next_bytes(content, "roster") or b"")
    roster[-1] = {**roster[-1], "signature": bytes(64)}
    forged = RecordDict(dict(content.items()))
    return wire.with_next(forged, roster=pack(roster))


@dataclass
class MemoryTransport:
    sites: dict[int, MemorySite]
    log: list[Request] = field(default_factory=list)

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]:
        replies = []
        for request in requests:
            self.log.append(request)
            answer = self.sites[request.node].answer(request)
            if isinstance(answer, str):
                replies.append(Reply(request.node, None, answer))
            elif answer is not None:
                replies.append(Reply(request.node, answer))
        return replies


def consortium(root: Path, site_ids: Sequence[str]) -> dict[str, SiteSettings]:
    """A throwaway PKI and each site's settings pointing into it."""
    pki.init_ca(root / "certs", "test-consortium")
    issued = {site_id: pki.issue_site(root / "certs", site_id) for site_id in site_ids}
    # The floor (t > n/2, n ≥ 2), as the memory sites' limits.
    pki.write_membership(root / "certs", min_sites=2, colluding=0)
    out = {}
    for site_id, paths in issued.items():
        out[site_id] = SiteSettings(
            site_id=site_id,
            data_dir=str(root / "data" / site_id),
            kind="fundus",
            work_dir=str(root / "work" / site_id),
            device="cpu",
            epsilon_budget=10.0,
            signing_key=str(paths.signing_key),
            signing_cert=str(paths.signing_cert),
            ca_cert=str(root / "certs" / "ca" / "ca.crt"),
            crl=str(root / "certs" / "ca" / "crl.pem"),
            membership=str(root / "certs" / "ca" / "membership.json"),
        )
    return out


def aggregator(
    tmp_path: Path, sites: Sequence[MemorySite], **run_config: object
) -> tuple[MemoryTransport, RunSettings, RunOutputs, AuditLog]:
    """What the ServerApp hands `run_federation`, for ``sites`` (node ids
    1, 2, ...); ``run_config`` overrides keys (``_`` for ``-``)."""
    cfg = default_run_config() | SMALL | {"run-dir": str(tmp_path / "run")}
    cfg |= {k.replace("_", "-"): v for k, v in run_config.items()}
    settings = RunSettings.from_run_config(cfg)
    store = RunOutputs(Path(settings.run_dir))
    audit = AuditLog(tmp_path / "audit.jsonl")
    return MemoryTransport({i + 1: s for i, s in enumerate(sites)}), settings, store, audit


def federation(tmp_path: Path, sites: Sequence[MemorySite], **run_config: object) -> Federation:
    """The aggregator's run state, for driving single rounds."""
    transport, settings, store, audit = aggregator(tmp_path, sites, **run_config)
    gen, disc, _ = start(settings, store)
    return Federation(
        transport,
        settings,
        store,
        audit,
        mechanism_for(settings, store, audit),
        gen,
        disc,
        Preview(settings),
    )
