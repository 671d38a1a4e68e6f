"""The aggregator's side of a secure-aggregation round.

It routes ciphertexts it cannot read, and at the end learns one thing: the
weighted sum of the surviving sites' quantized updates (and Σ weight). A
site's masked input alone is uniformly random to it; the seeds it
reconstructs are those of survivors (self-masks) or of dropped sites (mask
keys), never both for one site."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedgan.secagg import shamir
from fedgan.secagg.aead import agree, open_sealed
from fedgan.secagg.client import AGGREGATOR, apply_mask, mask_seed, pair_sign
from fedgan.secagg.encoding import associated_data
from fedgan.secagg.errors import RoundAborted, SecAggError
from fedgan.secagg.identity import check_signature
from fedgan.secagg.messages import (
    Advertisement,
    EncryptedShare,
    RevealedShare,
    consistency_bytes,
    roster_digest,
)
from fedgan.secagg.params import SecAggParams
from fedgan.secagg.quantize import dequantize_mean, error_bound

log = logging.getLogger("fedgan.secagg")


@dataclass(frozen=True)
class Aggregate:
    mean: np.ndarray  # the survivors' mean (Σ α_i v_i / Σ α_i; every α_i is 1), float64
    weight_units: int
    survivors: list[str]
    dropped: list[str]
    error_bound: float  # max |mean − exact weighted mean| per value, from quantization


@dataclass
class ServerSession:
    params: SecAggParams
    _key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    roster: dict[str, Advertisement] = field(default_factory=dict)
    u2: list[str] = field(default_factory=list)
    masked: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    confirmations: dict[str, bytes] = field(default_factory=dict)  # site -> its U3 signature
    refused: dict[str, str] = field(default_factory=dict)  # site -> why its message was rejected

    @property
    def public_key(self) -> bytes:
        """The round's ephemeral key: sites seal their masked inputs to it."""
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def _enough(self, alive: int, stage: str) -> None:
        if alive < self.params.threshold:
            raise RoundAborted(
                f"round {self.params.round} abandoned at {stage}: {alive} sites left, "
                f"threshold {self.params.threshold}; the global model is unchanged"
            )

    def advertised(self, ads: list[Advertisement]) -> list[Advertisement]:
        """The roster (U1) to broadcast. Sites verify the signatures; a
        roster the server tampered with fails there."""
        seen: dict[str, Advertisement] = {}
        for ad in ads:
            if ad.site_id in seen:
                self.refused[ad.site_id] = "advertised twice"
                continue
            seen[ad.site_id] = ad
        self.roster = {k: v for k, v in seen.items() if k not in self.refused}
        self._enough(len(self.roster), "key advertisement")
        return [self.roster[s] for s in sorted(self.roster)]

    def shared(self, shares: dict[str, list[EncryptedShare]]) -> dict[str, list[EncryptedShare]]:
        """Route each site's encrypted shares to their receivers; U2 is the
        sites that sent one share to every other roster member."""
        u2 = []
        for sender, items in sorted(shares.items()):
            receivers = sorted(s.receiver for s in items)
            expected = sorted(p for p in self.roster if p != sender)
            if (
                sender not in self.roster
                or receivers != expected
                or any(s.sender != sender for s in items)
            ):
                self.refused[sender] = "incomplete or misaddressed shares"
                continue
            u2.append(sender)
        self._enough(len(u2), "key sharing")
        self.u2 = u2
        return {
            receiver: [
                s
                for sender in u2
                if sender != receiver
                for s in shares[sender]
                if s.receiver == receiver
            ]
            for receiver in u2
        }

    def received_masked(self, envelopes: dict[str, bytes]) -> tuple[list[str], list[str]]:
        """Open the envelopes; (survivors U3, dropped U2 \\ U3)."""
        width = self.params.dtype
        for site, envelope in sorted(envelopes.items()):
            if site not in self.u2:
                self.refused[site] = "masked input from a site outside the sharing set"
                continue
            key = agree(self._key, self.roster[site].c_pk, "envelope", self.params.context)
            ad = associated_data(self.params.run_id, self.params.round, "masked", site, AGGREGATOR)
            try:
                plain = open_sealed(key, envelope, ad, f"masked input of site {site}")
            except SecAggError as exc:
                self.refused[site] = str(exc)
                log.warning("secure aggregation: %s; site %s counted as dropped", exc, site)
                continue
            vector = np.frombuffer(plain, dtype=width.newbyteorder("<")).astype(width)
            if vector.shape[0] != self.params.length + 2:
                self.refused[site] = "masked input of the wrong length"
                continue
            self.masked[site] = vector
        survivors = sorted(self.masked)
        self._enough(len(survivors), "masked input")
        return survivors, [s for s in self.u2 if s not in self.masked]

    def roster_digest(self) -> bytes:
        """This attempt's roster, as the sites sign it with the survivor set."""
        return roster_digest((s, ad.c_pk, ad.s_pk) for s, ad in self.roster.items())

    def confirmed(self, signatures: dict[str, bytes]) -> dict[str, bytes]:
        """The survivors' signatures on the survivor set (U3), each checked
        against the signing key its certificate holds, so that one site's bad
        signature drops that site instead of making every other site refuse.
        Returns what the unmask request carries."""
        survivors = sorted(self.masked)
        message = consistency_bytes(self.params, self.public_key, self.roster_digest(), survivors)
        for site, signature in sorted(signatures.items()):
            if site not in self.masked:
                continue
            try:
                check_signature(site, _signing_key(self.roster[site]), message, signature)
            except SecAggError:
                self.refused[site] = "its signature on the survivor set does not verify"
                continue
            self.confirmations[site] = signature
        self._enough(len(self.confirmations), "consistency check")
        return dict(sorted(self.confirmations.items()))

    def unmasked(self, reveals: dict[str, list[RevealedShare]]) -> Aggregate:
        """Reconstruct the survivors' self-mask seeds and the dropped sites'
        mask keys from ≥ t sites' shares, remove every mask, dequantize."""
        survivors = sorted(self.masked)
        dropped = [s for s in self.u2 if s not in self.masked]
        points = {site: i + 1 for i, site in enumerate(sorted(self.roster))}
        b_shares: dict[str, dict[int, int]] = {s: {} for s in survivors}
        s_shares: dict[str, dict[int, int]] = {s: {} for s in dropped}
        responders = 0
        for site, items in sorted(reveals.items()):
            if site not in self.confirmations:
                continue
            wanted = {(s, "b") for s in survivors} | {(s, "s") for s in dropped}
            got = {(r.owner, r.kind) for r in items}
            if got != wanted or any(r.x != points[site] for r in items):
                self.refused[site] = "its unmask reply did not match the request"
                continue
            responders += 1
            for r in items:
                (b_shares if r.kind == "b" else s_shares)[r.owner][r.x] = shamir.from_bytes(r.value)
        self._enough(responders, "unmasking")
        t = self.params.threshold
        total = np.zeros(self.params.length + 2, dtype=self.params.dtype)
        for site in survivors:
            np.add(total, self.masked[site], out=total)
            seed = shamir.reconstruct(b_shares[site], t).to_bytes(32, "big")
            apply_mask(total, seed, -1)
        for gone in dropped:
            raw = shamir.reconstruct(s_shares[gone], t)
            try:
                s_sk = X25519PrivateKey.from_private_bytes(raw.to_bytes(32, "big"))
            except (ValueError, OverflowError):
                raise SecAggError(
                    f"the reconstructed mask key of site {gone} is malformed"
                ) from None
            if (
                s_sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                != self.roster[gone].s_pk
            ):
                raise SecAggError(
                    f"the reconstructed mask key of site {gone} does not match its advertisement"
                )
            for site in survivors:
                # Site `site` added pair_sign(site, gone)·PRG(seed); take it back.
                seed = mask_seed(s_sk, self.roster[site].s_pk, self.params)
                apply_mask(total, seed, -pair_sign(site, gone))
        mean, weight = dequantize_mean(total, len(survivors), self.params)
        return Aggregate(
            mean=mean,
            weight_units=weight,
            survivors=survivors,
            dropped=dropped,
            error_bound=error_bound(len(survivors), weight, self.params),
        )


def _signing_key(ad: Advertisement) -> bytes:
    """The raw Ed25519 key in a site's signing certificate (the sites check
    the certificate itself; the server only needs the key)."""
    try:
        key = x509.load_pem_x509_certificate(ad.cert_pem).public_key()
    except ValueError:
        raise SecAggError(f"site {ad.site_id}: its signing certificate is not PEM") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SecAggError(f"site {ad.site_id}: signing certificate does not hold an Ed25519 key")
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
