"""The site's privacy ledger: an append-only, fsync'd JSON-lines file on the
site's own volume that records every round of DP training ever run on its silo.

Write-ahead: `PrivacyLedger.spend` records a round *before* training starts, so
a crash at any point (even kill -9 mid-step) leaves the round counted as spent,
and a restarted site never under-counts. `complete` appends a second line when
the round finished; it changes nothing in the accounting. Nothing is ever
rewritten or removed.

The ledger fails closed. It is created once, when the site is set up
(`create`; `fedgan site init`), and a missing, truncated or edited ledger
refuses training: read as "nothing spent", it would hand the silo a fresh
budget. Each line carries a sequence number and the SHA-256 of the line
before it, and a head file beside it (entries, last hash; replaced
atomically after each append) makes a truncated tail visible, as the audit
log does. The budget check and the append it allows run under one exclusive
`flock`, so two rounds at one site cannot both pass a check that only one of
them fits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedgan.atomic import write_atomic, write_text_atomic
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


GENESIS = "0" * 64
_KINDS = ("created", "spend", "complete", "chained")


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head = self.path.with_name(self.path.name + ".head")

    @classmethod
    def in_work_dir(cls, work_dir: Path) -> PrivacyLedger:
        return cls(Path(work_dir) / LEDGER_NAME)

    def exists(self) -> bool:
        return self.path.exists() or self.head.exists()

    def create(self, site_id: str) -> None:
        """Start the ledger of a silo that has never trained (never over an
        existing one)."""
        if self.exists():
            raise LedgerError(f"{self.path} exists: a ledger is never started anew")
        line = self._line({"type": "created", "site": site_id, "time": time.time()}, 1, GENESIS)
        write_atomic(self.path, (line + "\n").encode(), mode=0o600, overwrite=False)
        self._write_head(1, _digest(line))

    def upgrade(self) -> None:
        """Chain a ledger written before lines carried hashes (no head, no
        line with one): its lines are kept as they are and a head is written
        over them. A person's act (`fedgan site init --upgrade-ledger`),
        never automatic: an unchained file cannot be told from a chained one
        whose head was deleted and hashes stripped, so whoever asks vouches
        for it (the site's audit log records that)."""
        if self.head.exists():
            raise LedgerError(f"{self.path} is chained already ({self.head.name} exists)")
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            raise LedgerError(f"{self.path} is missing: nothing to upgrade") from None
        lines = text.split("\n")
        if lines.pop() != "" or not lines or any(not x.strip() for x in lines):
            raise LedgerError(
                f"{self.path} is empty, has blank lines or no final newline: not a ledger an "
                "older version wrote; restore it from backup"
            )
        if any("prev" in _parsed(self.path, n, x) for n, x in enumerate(lines, 1)):
            raise LedgerError(f"{self.path} is chained but its head is missing; restore both")
        with self._locked() as fd:
            prev = GENESIS
            for line in lines:
                prev = _digest(line)
            self._write_head(len(lines), prev)
            self._append(fd, {"type": "chained", "time": time.time()}, len(lines), prev)

    def records(self) -> list[dict]:
        with self._locked(shared=True):
            return [r for r in self._verified()[0] if r["type"] in ("spend", "complete")]

    def spends(self) -> list[Spend]:
        return _spends(self.records())

    def latest_noise(self, run: str) -> float | None:
        """σ of the run's latest recorded round: a hint for the next round's
        calibration, which checks it (`calibrate_noise`)."""
        noises = [s.noise for s in self.spends() if s.run == run]
        return noises[-1] if noises else None

    def history(self) -> list[Round]:
        return _history(_spends(self.records()))

    def deltas(self) -> list[float]:
        """Every δ a spend was accounted at (the site never accounts above
        the smallest again)."""
        return [s.delta for s in self.spends() if s.delta > 0]

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
        """Check the budget, then record the round before any training, both
        under the ledger's lock. Raises `BudgetExhausted` (recording nothing)
        if it would exceed."""
        with self._locked() as fd:
            records, entries, last = self._verified()
            history = _history(_spends(records))
            after = epsilon([*history, round_], delta, accountant)
            if after > budget:
                # ε so far is needed only for the refusal (each accounting costs ~0.4 s).
                raise BudgetExhausted(epsilon(history, delta, accountant), after, budget)
            noise, rate, steps = round_
            entry = Spend(
                run,
                server_round,
                steps,
                noise,
                rate,
                delta,
                accountant,
                after,
                time.time(),
                mechanism,
            )
            self._append(fd, {"type": "spend", **asdict(entry)}, entries, last)
        return entry

    def complete(self, *, run: str, server_round: int) -> None:
        with self._locked() as fd:
            _, entries, last = self._verified()
            record = {"type": "complete", "run": run, "round": server_round, "time": time.time()}
            self._append(fd, record, entries, last)

    # -- the file ----------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[int]:
        """The ledger open and flock'ed; never created here (a missing ledger
        is refused, not started)."""
        try:
            fd = os.open(self.path, os.O_RDWR if not shared else os.O_RDONLY)
        except FileNotFoundError:
            raise LedgerError(
                f"{self.path} is missing: this silo's privacy history cannot be read, so "
                "training is refused. Restore it from the site's backup; a new site runs "
                "`fedgan site init` once"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _verified(self) -> tuple[list[dict], int, str]:
        """(every record, the count of lines, the last line's hash), after
        checking the chain and the head. A line appended whose head update
        was lost to a crash is kept (it was written ahead: counting it never
        under-counts); a torn last line (a crash mid-write, never
        acknowledged) is ignored and cut at the next append."""
        text = self.path.read_text("utf-8")
        whole = text.split("\n")
        whole.pop()  # after the last newline: "" or a torn, unacknowledged line
        records: list[dict] = []
        prev, chained = GENESIS, False
        for number, line in enumerate(whole, start=1):
            record = _parsed(self.path, number, line)
            if "prev" in record:
                chained = True
                if record["prev"] != prev or record.get("seq") != number:
                    raise LedgerError(
                        f"{self.path} line {number} does not follow line {number - 1} (a line "
                        "was edited, inserted or deleted); training is refused until a person "
                        "restores the ledger from backup"
                    )
            elif chained:
                raise LedgerError(f"{self.path} line {number} carries no hash; restore the ledger")
            prev = _digest(line)
            records.append(record)
        head = self._read_head()
        entries = len(whole)
        if head != (entries, prev) and not self._one_past(whole, head):
            raise LedgerError(
                f"{self.path} holds {entries} entries but {self.head.name} records "
                f"{head[0]}: the ledger was truncated or replaced, and this silo's privacy "
                "history cannot be trusted; restore it from backup"
            )
        return records, entries, prev

    @staticmethod
    def _one_past(lines: list[str], head: tuple[int, str]) -> bool:
        """The file is one whole line past its head: an append whose head
        update a crash interrupted."""
        entries, last = head
        return len(lines) == entries + 1 and (
            (entries == 0 and last == GENESIS)
            or (entries > 0 and _digest(lines[entries - 1]) == last)
        )

    def _read_head(self) -> tuple[int, str]:
        try:
            head = json.loads(self.head.read_text("utf-8"))
            return int(head["entries"]), str(head["last"])
        except FileNotFoundError:
            raise LedgerError(
                f"{self.head} is missing: the ledger's end cannot be checked, so training is "
                "refused. Restore it with the ledger from backup (a ledger an older version "
                "wrote, which never had one: `fedgan site init --upgrade-ledger`)"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise LedgerError(f"{self.head} is unreadable; restore it from backup") from None

    def _write_head(self, entries: int, last: str) -> None:
        write_text_atomic(
            self.head, json.dumps({"entries": entries, "last": last}) + "\n", mode=0o600
        )

    @staticmethod
    def _line(record: dict, seq: int, prev: str) -> str:
        return json.dumps({**record, "seq": seq, "prev": prev}, sort_keys=True)

    def _append(self, fd: int, record: dict, entries: int, last: str) -> None:
        """One line after the ``entries`` whole lines `_verified` read (a torn
        tail after the last newline is cut), then the head. Called under the
        exclusive lock."""
        os.ftruncate(fd, self.path.read_bytes().rfind(b"\n") + 1)
        line = self._line(record, entries + 1, last)
        os.lseek(fd, 0, os.SEEK_END)
        data = (line + "\n").encode()
        while data:  # a short write (a full disk) must not be acknowledged
            data = data[os.write(fd, data) :]
        os.fsync(fd)
        self._write_head(entries + 1, _digest(line))


def _parsed(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
        if not isinstance(record, dict) or record.get("type") not in _KINDS:
            raise ValueError
    except ValueError:
        raise LedgerError(
            f"{path} line {number} is not a ledger record; a person must inspect it (keep the "
            "file: it is the silo's privacy history)"
        ) from None
    return record


def _spends(records: list[dict]) -> list[Spend]:
    return [
        Spend(**{k: r[k] for k in Spend.__dataclass_fields__ if k in r})
        for r in records
        if r["type"] == "spend"
    ]


def _history(spends: list[Spend]) -> list[Round]:
    return [(s.noise, s.sample_rate, s.steps) for s in spends]
