"""The site's privacy ledger: an append-only, fsync'd JSON-lines file on the
site's own volume that records every round of DP training ever run on its silo.

Write-ahead: `PrivacyLedger.spend` records a round *before* training starts, so
a crash at any point (even kill -9 mid-step) leaves the round counted as spent,
and a restarted site never under-counts. `complete` appends a second line when
the round finished; it changes nothing in the accounting. Nothing is ever
rewritten or removed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedgan.atomic import append_line_durable
from fedgan.errors import FedGanError
from fedgan.privacy.accountant import Round, epsilon

LEDGER_NAME = "privacy-ledger.jsonl"


class LedgerError(FedGanError):
    """The ledger cannot be trusted; training is refused until a person looks."""


class BudgetExhausted(FedGanError):
    """This round would take the silo past its ε budget."""

    def __init__(self, spent: float, after: float, budget: float) -> None:
        super().__init__(
            f"budget exhausted: ε {spent:.3f} spent, {after:.3f} after this round, "
            f"budget {budget:.3f}"
        )
        self.spent, self.after, self.budget = spent, after, budget


@dataclass(frozen=True)
class Spend:
    run: str
    round: int
    steps: int
    noise: float
    sample_rate: float
    delta: float
    accountant: str
    epsilon_after: float
    time: float
    # How the step was spent (fedgan.privacy.mean_embedding for the other);
    # older ledgers lack it and were all DP-SGD.
    mechanism: str = "dp-sgd"


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_work_dir(cls, work_dir: Path) -> PrivacyLedger:
        return cls(Path(work_dir) / LEDGER_NAME)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record.get("type") not in ("spend", "complete"):
                    raise ValueError
            except ValueError:
                raise LedgerError(
                    f"{self.path} line {number} is not a ledger record; a person must inspect "
                    "it (keep the file: it is the silo's privacy history)"
                ) from None
            records.append(record)
        return records

    def spends(self) -> list[Spend]:
        return [
            Spend(**{k: r[k] for k in Spend.__dataclass_fields__ if k in r})
            for r in self.records()
            if r["type"] == "spend"
        ]

    def latest_noise(self, run: str) -> float | None:
        """σ of the run's latest recorded round: a hint for the next round's
        calibration, which checks it (`calibrate_noise`)."""
        noises = [s.noise for s in self.spends() if s.run == run]
        return noises[-1] if noises else None

    def history(self) -> list[Round]:
        return [(s.noise, s.sample_rate, s.steps) for s in self.spends()]

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        return epsilon(self.history(), delta, accountant)

    def spend(
        self,
        *,
        run: str,
        server_round: int,
        round_: Round,
        delta: float,
        budget: float,
        accountant: str = "prv",
        mechanism: str = "dp-sgd",
    ) -> Spend:
        """Check the budget, then record the round before any training.
        Raises `BudgetExhausted` (recording nothing) if it would exceed."""
        history = self.history()
        after = epsilon([*history, round_], delta, accountant)
        if after > budget:
            # ε so far is needed only for the refusal (each accounting costs ~0.4 s).
            raise BudgetExhausted(epsilon(history, delta, accountant), after, budget)
        noise, rate, steps = round_
        entry = Spend(
            run, server_round, steps, noise, rate, delta, accountant, after, time.time(), mechanism
        )
        append_line_durable(self.path, json.dumps({"type": "spend", **asdict(entry)}))
        return entry

    def complete(self, *, run: str, server_round: int) -> None:
        record = {"type": "complete", "run": run, "round": server_round, "time": time.time()}
        append_line_durable(self.path, json.dumps(record))
