"""The records of a round's messages, in one place for both sides.

A train message carries the global G and D and the round config; the reply
carries the site's update and a few numbers. Numbers only: no pixel data, no
patient tags, no free text from the silo ever goes into a reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgan.update import Arrays, SiteUpdate

GEN, DISC, CONFIG = "gen", "disc", "config"
GEN_DELTA, DISC_DELTA, METRICS, SITE = "gen-delta", "disc-delta", "metrics", "site"


def train_request(gen: Arrays, disc: Arrays, config: dict[str, int | float | bool]) -> RecordDict:
    return RecordDict(
        {GEN: ArrayRecord(gen), DISC: ArrayRecord(disc), CONFIG: ConfigRecord(config)}
    )


def read_train_request(content: RecordDict) -> tuple[Arrays, Arrays, dict]:
    return (
        content.array_records[GEN].to_numpy_ndarrays(),
        content.array_records[DISC].to_numpy_ndarrays(),
        dict(content.config_records[CONFIG]),
    )


def train_reply(update: SiteUpdate, site_id: str, metrics: dict[str, float]) -> RecordDict:
    return RecordDict(
        {
            GEN_DELTA: ArrayRecord(update.gen),
            DISC_DELTA: ArrayRecord(update.disc),
            METRICS: MetricRecord({"num-examples": update.weight, **metrics}),
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


def read_train_reply(content: RecordDict) -> tuple[SiteUpdate | None, str, dict[str, float]]:
    """(update, site id, metrics); the update is None when the site refused."""
    metrics = {k: float(v) for k, v in content.metric_records[METRICS].items()}
    site_id = str(content.config_records[SITE]["site-id"])
    if metrics.get("budget-exhausted"):
        return None, site_id, metrics
    update = SiteUpdate(
        gen=content.array_records[GEN_DELTA].to_numpy_ndarrays(),
        disc=content.array_records[DISC_DELTA].to_numpy_ndarrays(),
        weight=metrics.pop("num-examples"),
    )
    return update, site_id, metrics
