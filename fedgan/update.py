"""The update path: what a site sends, and how the server turns what it
receives back into a new global model.

This is the seam for the later layers. Differential privacy's update clipping,
quantization and secure-aggregation masking wrap `make_update` on the site and
replace `weighted_mean` on the server; nothing else in the round changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Arrays = list[np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """Δ = local − global for both networks, and its weight in the mean. A
    site sends 1: FedAvg's weight, the image count, is exact and outside DP,
    so in a federation every site's update counts once (simulations may
    weigh otherwise)."""

    gen: Arrays
    disc: Arrays
    weight: float

    def __post_init__(self) -> None:
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError(f"update weight must be a positive number, got {self.weight}")


@dataclass(frozen=True)
class Release:
    """A mean-embedding site's one release, divided by its noisy image count,
    and that count as its weight (`fedgan.site.release`). Not a model update:
    nothing of G or D is in it."""

    values: np.ndarray  # (classes, 2F + 1)
    weight: float

    def __post_init__(self) -> None:
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError(f"release weight must be a positive number, got {self.weight}")


# What a site sends in a round: its update of G and D, or its release.
Contribution = SiteUpdate | Release


def _delta(local: Sequence[np.ndarray], global_: Sequence[np.ndarray]) -> Arrays:
    if len(local) != len(global_):
        raise ValueError(f"local model has {len(local)} arrays, global has {len(global_)}")
    return [
        (np.asarray(lo, dtype=np.float32) - np.asarray(gl, dtype=np.float32))
        for lo, gl in zip(local, global_, strict=True)
    ]


def make_update(
    local_gen: Sequence[np.ndarray],
    local_disc: Sequence[np.ndarray],
    global_gen: Sequence[np.ndarray],
    global_disc: Sequence[np.ndarray],
    weight: float,
) -> SiteUpdate:
    return SiteUpdate(
        gen=_delta(local_gen, global_gen),
        disc=_delta(local_disc, global_disc),
        weight=float(weight),
    )


def weighted_mean(updates: Sequence[SiteUpdate]) -> tuple[Arrays, Arrays]:
    """Σ wᵢΔᵢ / Σ wᵢ for each network (FedAvg on deltas), in float64 so the
    order in which replies arrive does not change the result."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = sum(u.weight for u in updates)

    def mean(field: str) -> Arrays:
        first: Arrays = getattr(updates[0], field)
        acc = [np.zeros(a.shape, dtype=np.float64) for a in first]
        for u in updates:
            arrays: Arrays = getattr(u, field)
            if [a.shape for a in arrays] != [a.shape for a in first]:
                raise ValueError("sites sent updates of different shapes")
            for i, a in enumerate(arrays):
                acc[i] += u.weight * a.astype(np.float64)
        return [(a / total).astype(np.float32) for a in acc]

    return mean("gen"), mean("disc")


def apply_delta(global_: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays:
    return [
        (np.asarray(g, dtype=np.float32) + d).astype(np.float32)
        for g, d in zip(global_, delta, strict=True)
    ]


def update_norm(update: SiteUpdate) -> float:
    """L2 norm of Δ over both networks together."""
    return float(
        np.sqrt(
            sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update.gen + update.disc)
        )
    )


def clip_update(update: SiteUpdate, max_norm: float) -> tuple[SiteUpdate, bool, float]:
    """Scale Δ (G and D together) down to L2 norm ``max_norm`` if it is larger;
    ``max_norm`` <= 0 disables clipping. Returns (update, clipped?, norm before)."""
    norm = update_norm(update)
    if max_norm <= 0 or norm <= max_norm:
        return update, False, norm
    scale = np.float32(max_norm / norm)
    return (
        SiteUpdate(
            gen=[a * scale for a in update.gen],
            disc=[a * scale for a in update.disc],
            weight=update.weight,
        ),
        True,
        norm,
    )


def flatten(sent: Contribution) -> np.ndarray:
    """G's then D's values (or the release's) in one vector: what secure
    aggregation masks."""
    if isinstance(sent, Release):
        return sent.values.reshape(-1).astype(np.float64)
    return np.concatenate([a.reshape(-1) for a in (*sent.gen, *sent.disc)]).astype(np.float64)


def release_mean(releases: Sequence[Release]) -> np.ndarray:
    """Σ wᵢxᵢ / Σ wᵢ of the releases, summed in float64 (as `weighted_mean`)."""
    if not releases:
        raise ValueError("no releases to aggregate")
    total = sum(r.weight for r in releases)
    mean = sum(r.weight * r.values.astype(np.float64) for r in releases) / total
    return np.asarray(mean).astype(np.float32)


def split_like(vector: np.ndarray, gen: Arrays, disc: Arrays) -> tuple[Arrays, Arrays]:
    """Inverse of `flatten`, for the aggregate: G's and D's arrays in the
    shapes and dtypes of the global model."""
    out, offset = [], 0
    for a in (*gen, *disc):
        out.append(vector[offset : offset + a.size].reshape(a.shape).astype(a.dtype))
        offset += a.size
    if offset != vector.shape[0]:
        raise ValueError(f"the aggregate has {vector.shape[0]} values, the model {offset}")
    return out[: len(gen)], out[len(gen) :]
