"""A site's side of a secure-aggregation round, one method per stage.

The session's state (private keys, seeds, the shares it holds) never leaves
the site: between stages it is kept in the SuperNode's memory
(`to_bytes`/`from_bytes`), never written to disk and never logged."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedgan.secagg import shamir
from fedgan.secagg.aead import agree, seal
from fedgan.secagg.aead import open_sealed as _open
from fedgan.secagg.encoding import associated_data
from fedgan.secagg.errors import SecAggError
from fedgan.secagg.identity import Signer, Verifier, check_signature
from fedgan.secagg.messages import (
    Advertisement,
    EncryptedShare,
    RevealedShare,
    consistency_bytes,
    roster_digest,
)
from fedgan.secagg.params import SecAggParams, ThresholdRule
from fedgan.secagg.prg import SEED_BYTES, expand
from fedgan.secagg.quantize import quantize

AGGREGATOR = "aggregator"


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def mask_seed(own_s: X25519PrivateKey, peer_s_pk: bytes, params: SecAggParams) -> bytes:
    """The pair's mask seed; both ends (and the server, for a dropped site)
    derive the same one."""
    return agree(own_s, peer_s_pk, "mask", params.context)


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the pair's mask, −1 if it subtracts it."""
    return 1 if me < peer else -1


def apply_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """acc ± PRG(seed), wrapping in acc's unsigned type (a multiple of the
    modulus, so the result is right modulo the modulus too)."""
    stream = expand(seed, acc.shape[0], acc.dtype)
    if sign > 0:
        np.add(acc, stream, out=acc)
    else:
        np.subtract(acc, stream, out=acc)


@dataclass
class SiteSession:
    params: SecAggParams
    server_pk: bytes
    site_id: str
    c_sk: bytes
    s_sk: bytes
    b: bytes
    stage: str = "advertised"
    # peer -> (c_pk, s_pk, signing key): the signing key checked against its
    # certificate once, then used for the survivor-set signatures.
    roster: dict[str, tuple[bytes, bytes, bytes]] = field(default_factory=dict)
    own_shares: tuple[int, int] = (0, 0)
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # peer -> (b share, s share)
    u2: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)  # the set this site signed (U3)

    # -- stage 1 ---------------------------------------------------------------
    @classmethod
    def start(
        cls,
        params: SecAggParams,
        server_pk: bytes,
        signer: Signer,
        rule: ThresholdRule | None = None,
    ) -> tuple[SiteSession, Advertisement]:
        """Fresh keys and self-mask seed for this round; the signed
        advertisement, made before the site trains. The round's n and t are
        checked against the site's own rule first: the aggregator announces
        them, the site decides."""
        params.check()
        (rule or ThresholdRule()).check(params, signer.site_id)
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        session = cls(
            params=params,
            server_pk=server_pk,
            site_id=signer.site_id,
            c_sk=c.private_bytes_raw(),
            s_sk=s.private_bytes_raw(),
            b=os.urandom(SEED_BYTES),
        )
        ad = Advertisement(signer.site_id, _public(c), _public(s), signer.cert_pem, b"")
        signature = signer.sign(ad.signed_bytes(params, server_pk))
        return session, Advertisement(**{**ad.as_dict(), "signature": signature})

    @property
    def attempt(self) -> str:
        """Names this attempt at the round: the run, the round and this
        site's fresh public key. A retried round (after a crash and a
        resume) is a new attempt with new keys and masks; a replayed request
        within one attempt is the same attempt."""
        own = _public(_private(self.s_sk))
        material = f"{self.params.run_id}\0{self.params.round}\0".encode() + own
        return hashlib.sha256(material).hexdigest()[:32]

    def _roster_digest(self) -> bytes:
        return roster_digest((site, c, s) for site, (c, s, _) in self.roster.items())

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"site {self.site_id}: cannot {action} after stage {self.stage!r} (replayed or "
                "out-of-order request)"
            )

    def _points(self) -> dict[str, int]:
        return {site: i + 1 for i, site in enumerate(sorted(self.roster))}

    # -- stage 2 ---------------------------------------------------------------
    def share_keys(self, ads: list[Advertisement], verify: Verifier) -> list[EncryptedShare]:
        """Check every advertisement, then t-of-n share the seed and mask key,
        each peer's shares encrypted for that peer alone."""
        self._expect("advertised", "share keys")
        ids = [ad.site_id for ad in ads]
        if len(set(ids)) != len(ids):
            raise SecAggError("the roster names a site twice")
        if len(ads) < self.params.threshold or len(ads) > self.params.sites:
            raise SecAggError(
                f"the roster has {len(ads)} sites; this round needs {self.params.threshold} "
                f"to {self.params.sites}"
            )
        c_sk, s_sk = _private(self.c_sk), _private(self.s_sk)
        mine = [ad for ad in ads if ad.site_id == self.site_id]
        if not mine or (mine[0].c_pk, mine[0].s_pk) != (_public(c_sk), _public(s_sk)):
            raise SecAggError(
                f"site {self.site_id}: the roster does not carry this site's own keys"
            )
        signing = {
            ad.site_id: verify(
                ad.site_id,
                ad.cert_pem,
                ad.signed_bytes(self.params, self.server_pk),
                ad.signature,
            )
            for ad in ads
        }
        self.roster = {ad.site_id: (ad.c_pk, ad.s_pk, signing[ad.site_id]) for ad in ads}
        points = self._points()
        xs = [points[s] for s in sorted(points)]
        t = self.params.threshold
        b_shares = shamir.split(int.from_bytes(self.b, "big"), xs, t)
        s_shares = shamir.split(int.from_bytes(self.s_sk, "big"), xs, t)
        own = points[self.site_id]
        self.own_shares = (b_shares[own], s_shares[own])
        out = []
        for peer, x in sorted(points.items()):
            if peer == self.site_id:
                continue
            key = agree(c_sk, self.roster[peer][0], "share", self.params.context)
            plaintext = shamir.to_bytes(b_shares[x]) + shamir.to_bytes(s_shares[x])
            ad = associated_data(self.params.run_id, self.params.round, "share", self.site_id, peer)
            out.append(EncryptedShare(self.site_id, peer, seal(key, plaintext, ad)))
        self.stage = "shared"
        return out

    # -- stage 3 ---------------------------------------------------------------
    def masked_input(
        self, update: np.ndarray, shares: list[EncryptedShare], u2: list[str]
    ) -> tuple[bytes, float]:
        """`accept_shares`, then `mask`: the whole of stage 3 at once."""
        self.accept_shares(shares, u2)
        return self.mask(update)

    def accept_shares(self, shares: list[EncryptedShare], u2: list[str]) -> None:
        """Stage 3, first half, before the site trains: check the sharing
        set and decrypt the shares addressed to this site, so that nothing a
        peer or the server sent wrong can fail after the site spent budget."""
        self._expect("shared", "accept shares")
        u2 = sorted(set(u2))
        if self.site_id not in u2 or not set(u2) <= set(self.roster):
            raise SecAggError(f"site {self.site_id}: the sharing set is not part of the roster")
        if len(u2) < self.params.threshold:
            raise SecAggError(
                f"only {len(u2)} sites shared keys; the threshold is {self.params.threshold}"
            )
        senders = sorted(s.sender for s in shares)
        if senders != [p for p in u2 if p != self.site_id] or any(
            s.receiver != self.site_id for s in shares
        ):
            raise SecAggError(
                f"site {self.site_id}: expected one share from each of {u2}, got from {senders}"
            )
        c_sk = _private(self.c_sk)
        for share in shares:
            key = agree(c_sk, self.roster[share.sender][0], "share", self.params.context)
            ad = associated_data(
                self.params.run_id, self.params.round, "share", share.sender, self.site_id
            )
            plain = _open(key, share.ciphertext, ad, f"share from site {share.sender}")
            half = shamir.SHARE_BYTES
            if len(plain) != 2 * half:
                raise SecAggError(f"share from site {share.sender} has the wrong size")
            self.held[share.sender] = (
                shamir.from_bytes(plain[:half]),
                shamir.from_bytes(plain[half:]),
            )
        self.u2 = u2
        self.stage = "accepted"

    def mask(self, update: np.ndarray) -> tuple[bytes, float]:
        """Stage 3, second half, after training: (the masked, quantized
        update in an AES-GCM envelope for the aggregator, the fraction of
        values clipped to the range). Once per round: the stage moves on."""
        self._expect("accepted", "send its masked input")
        u2 = self.u2
        c_sk = _private(self.c_sk)
        # Every site's update counts equally: a weight would need the sites'
        # image counts, which never leave them.
        vector, clipped = quantize(update, self.params.levels, self.params)
        apply_mask(vector, self.b, +1)
        s_sk = _private(self.s_sk)
        for peer in u2:
            if peer != self.site_id:
                seed = mask_seed(s_sk, self.roster[peer][1], self.params)
                apply_mask(vector, seed, pair_sign(self.site_id, peer))
        if self.params.modulus_bits < vector.dtype.itemsize * 8:
            np.bitwise_and(vector, vector.dtype.type(self.params.modulus - 1), out=vector)
        key = agree(c_sk, self.server_pk, "envelope", self.params.context)
        ad = associated_data(
            self.params.run_id, self.params.round, "masked", self.site_id, AGGREGATOR
        )
        envelope = seal(key, vector.astype(vector.dtype.newbyteorder("<")).tobytes(), ad)
        self.stage = "masked"
        return envelope, clipped

    # -- stage 4: consistency (Bonawitz et al. 2017, §4) -----------------------
    def confirm(self, survivors: list[str], signer: Signer) -> bytes:
        """Sign the survivor set (U3) this site was told. It will reveal only
        for this set, and only once t sites have signed the same one."""
        self._expect("masked", "confirm the survivors")
        told = sorted(set(survivors))
        if self.site_id not in told or not set(told) <= set(self.u2):
            raise SecAggError(
                f"site {self.site_id}: the survivor set is not part of the round's sites"
            )
        if len(told) < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: {len(told)} survivors is below the threshold "
                f"{self.params.threshold}"
            )
        self.survivors = told
        self.stage = "confirmed"
        return signer.sign(
            consistency_bytes(self.params, self.server_pk, self._roster_digest(), told)
        )

    # -- stage 5 ---------------------------------------------------------------
    def unmask(self, signatures: dict[str, bytes]) -> list[RevealedShare]:
        """Shares of the survivors' seeds and of the dropped sites' mask keys,
        never both for one site (the two sets are disjoint by construction),
        and only when at least t survivors signed the very set this site
        signed: a server that told two groups different survivor sets
        cannot gather t signatures for both."""
        self._expect("confirmed", "unmask")
        signers = sorted(signatures)
        outside = sorted(set(signers) - set(self.survivors))
        if outside:
            raise SecAggError(
                f"site {self.site_id}: refusing to unmask; {outside} signed but are not among "
                "the survivors this site was told"
            )
        if self.site_id not in signers or len(signers) < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: refusing to unmask; {len(signers)} sites confirmed the "
                f"survivor set, the threshold is {self.params.threshold}"
            )
        message = consistency_bytes(
            self.params, self.server_pk, self._roster_digest(), self.survivors
        )
        for peer in signers:
            try:
                check_signature(peer, self.roster[peer][2], message, signatures[peer])
            except SecAggError:
                raise SecAggError(
                    f"site {self.site_id}: refusing to unmask; site {peer} did not sign the "
                    "survivor set this site was told (the sites were told different sets)"
                ) from None
        survivors = self.survivors
        dropped = [s for s in self.u2 if s not in survivors]
        x = self._points()[self.site_id]
        held = {**self.held, self.site_id: self.own_shares}
        out = [RevealedShare(s, "b", x, shamir.to_bytes(held[s][0])) for s in sorted(survivors)]
        out += [RevealedShare(s, "s", x, shamir.to_bytes(held[s][1])) for s in sorted(dropped)]
        self.stage = "unmasked"
        return out

    # -- between stages --------------------------------------------------------
    def to_bytes(self) -> bytes:
        b64 = lambda v: base64.b64encode(v).decode()  # noqa: E731
        return json.dumps(
            {
                "params": self.params.as_dict(),
                "server_pk": b64(self.server_pk),
                "site_id": self.site_id,
                "c_sk": b64(self.c_sk),
                "s_sk": b64(self.s_sk),
                "b": b64(self.b),
                "stage": self.stage,
                "roster": {k: [b64(c), b64(s), b64(v)] for k, (c, s, v) in self.roster.items()},
                "own_shares": list(self.own_shares),
                "held": {k: list(v) for k, v in self.held.items()},
                "u2": self.u2,
                "survivors": self.survivors,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SiteSession:
        d = json.loads(data)
        unb = base64.b64decode
        return cls(
            params=SecAggParams.from_dict(d["params"]),
            server_pk=unb(d["server_pk"]),
            site_id=d["site_id"],
            c_sk=unb(d["c_sk"]),
            s_sk=unb(d["s_sk"]),
            b=unb(d["b"]),
            stage=d["stage"],
            roster={k: (unb(c), unb(s), unb(v)) for k, (c, s, v) in d["roster"].items()},
            own_shares=(int(d["own_shares"][0]), int(d["own_shares"][1])),
            held={k: (int(v[0]), int(v[1])) for k, v in d["held"].items()},
            u2=list(d["u2"]),
            survivors=list(d["survivors"]),
        )
