"""A round's public parameters, chosen by the server at setup and checked by
every site, and the rules that keep the arithmetic exact."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedgan.secagg.encoding import fields
from fedgan.secagg.errors import SecAggError

BITS = (8, 12, 16)
MIN_SITES = 2
# The fewest sites a site's default policy lets into one sum.
DEFAULT_MIN_SITES = 3


def required_threshold(n: int, colluding: int | None = None) -> int:
    """The least t a site accepts for n sites. Default ⌊2n/3⌋ + 1; a site
    that states c, the colluding sites it tolerates, needs t > (n + c)/2 (two
    survivor sets of t signers then share more than c sites, so an honest
    one signed both: the split view fails) and t ≥ c + 2 (a sum always holds
    two honest updates)."""
    if colluding is None:
        return 2 * n // 3 + 1
    return max((n + colluding) // 2 + 1, colluding + 2)


def default_threshold(n: int) -> int:
    """What the aggregator asks for unless configured: the default rule."""
    return required_threshold(n)


@dataclass(frozen=True)
class ThresholdRule:
    """A site's own rule for the rounds it joins, checked against whatever
    n and t the aggregator announces."""

    min_sites: int = DEFAULT_MIN_SITES
    colluding: int | None = None  # None: the default rule ⌊2n/3⌋ + 1
    owner: str = "this site's"  # whose rule, for the refusal's text
    command: str = "fedgan site policy"  # where it is changed

    def check(self, params: SecAggParams, site_id: str) -> None:
        n, t = params.sites, params.threshold
        if n < max(self.min_sites, MIN_SITES):
            raise SecAggError(
                f"site {site_id}: the round asks {n} sites; {self.owner} rule joins sums of at "
                f"least {self.min_sites} ({self.command} --min-sites)"
            )
        need = required_threshold(n, self.colluding)
        if t < need:
            rule = (
                "⌊2n/3⌋ + 1"
                if self.colluding is None
                else f"t > (n + {self.colluding})/2 and t ≥ {self.colluding + 2}"
            )
            raise SecAggError(
                f"site {site_id}: threshold {t} of {n} sites is below {self.owner} rule "
                f"({rule} = {need}); ask for secagg-threshold {need} or more"
            )


def min_modulus_bits(bits: int, n: int) -> int:
    """n values in [0, 2^bits) sum to less than n·2^bits ≤ 2^(bits + ⌈log2 n⌉):
    a modulus of that size never wraps."""
    return bits + max(1, math.ceil(math.log2(n)))


@dataclass(frozen=True)
class SecAggParams:
    run_id: str
    round: int
    sites: int  # sites asked to take part (n)
    threshold: int  # t: fewer survivors than this abandon the round
    bits: int  # quantization levels per value: 2^bits
    value_range: float  # each value is clipped to [-range, range] before quantizing
    modulus_bits: int  # arithmetic modulo 2^modulus_bits
    length: int  # update values (two fields, weight and count, are appended)

    @classmethod
    def for_round(
        cls,
        run_id: str,
        server_round: int,
        sites: int,
        *,
        bits: int,
        value_range: float,
        length: int,
        threshold: int = 0,
        modulus_bits: int = 0,
    ) -> SecAggParams:
        """Fill in the defaults (threshold ⌊2n/3⌋ + 1, the smallest safe modulus)
        and check everything."""
        params = cls(
            run_id=run_id,
            round=server_round,
            sites=sites,
            threshold=threshold or default_threshold(sites),
            bits=bits,
            value_range=value_range,
            modulus_bits=modulus_bits or min_modulus_bits(bits, max(sites, MIN_SITES)),
            length=length,
        )
        params.check()
        return params

    def check(self) -> None:
        """Refuse parameters that could leak one site's update or wrap the sum."""
        n, t = self.sites, self.threshold
        if n < MIN_SITES:
            raise SecAggError(
                f"secure aggregation needs at least {MIN_SITES} sites, {n} sampled: "
                "a sum of one update is that update"
            )
        if not (n / 2 < t <= n) or t < MIN_SITES:
            raise SecAggError(
                f"threshold {t} must be more than half of the {n} sites, at most {n}, "
                f"and at least {MIN_SITES}"
            )
        if self.bits not in BITS:
            raise SecAggError(f"secure-aggregation bits {self.bits}: use 8, 12 or 16")
        need = min_modulus_bits(self.bits, n)
        if not need <= self.modulus_bits <= 64:
            raise SecAggError(
                f"a modulus of 2^{self.modulus_bits} could wrap the sum of {n} {self.bits}-bit "
                f"values; it needs between {need} and 64 bits"
            )
        if not (self.value_range > 0 and math.isfinite(self.value_range)):
            raise SecAggError("secure-aggregation value range must be a positive number")
        if self.length < 1:
            raise SecAggError("nothing to aggregate: the update is empty")

    @property
    def levels(self) -> int:
        """The largest quantized value, 2^bits − 1."""
        return (1 << self.bits) - 1

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def dtype(self) -> np.dtype:
        """The narrowest unsigned integer that holds a value modulo 2^modulus_bits."""
        for dt in (np.uint16, np.uint32, np.uint64):
            if self.modulus_bits <= np.dtype(dt).itemsize * 8:
                return np.dtype(dt)
        raise AssertionError("modulus_bits <= 64 is checked")

    @property
    def context(self) -> bytes:
        """Binds keys and signatures to this run, round and parameter set."""
        return fields(
            self.run_id,
            self.round,
            self.sites,
            self.threshold,
            self.bits,
            repr(float(self.value_range)),
            self.modulus_bits,
            self.length,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SecAggParams:
        params = cls(
            run_id=str(data["run_id"]),
            round=int(data["round"]),
            sites=int(data["sites"]),
            threshold=int(data["threshold"]),
            bits=int(data["bits"]),
            value_range=float(data["value_range"]),
            modulus_bits=int(data["modulus_bits"]),
            length=int(data["length"]),
        )
        params.check()
        return params
