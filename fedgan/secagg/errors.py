"""Why a secure-aggregation round stopped."""

from __future__ import annotations

from fedgan.errors import FedGanError


class SecAggError(FedGanError):
    """A protocol rule was broken (bad signature, failed decryption, a request
    that would reveal too much); the message says which and by whom."""


class RoundAborted(SecAggError):
    """Fewer than the threshold of sites remain: the round is abandoned and
    the global model stays as it was."""
