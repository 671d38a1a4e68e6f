"""One round as the operator reads it, from its metrics record: the same
lines for `fedgan demo` (which reads metrics.jsonl) and `fedgan run` (which
reads the ServerApp's log stream)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# The ServerApp logs each round's record after this marker, as JSON.
ROUND_MARKER = "FEDGAN-ROUND "
# A failed run's reason follows this in the ServerApp's last error line
# (flwr exits 0 whatever the ServerApp decided).
VERDICT_MARKER = "fedgan: "
# ... and the progress of a mean-embedding run's fit of G (minutes on a CPU)
# in lines that start here, which `fedgan run` and `fedgan demo` pass on.
FIT_MARKER = "fitting G to the releases"


def fit_progress(line: str) -> str | None:
    """The fit's progress from one line of the ServerApp's log, or None."""
    at = line.find(FIT_MARKER)
    return None if at < 0 else "  " + line[at:].strip()


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_round(r: dict[str, Any], rounds: int) -> list[str]:
    head = f"round {r['round']}/{rounds} {_bar(r['round'], rounds)}"
    if "skipped" in r:
        lines = [f"{head}  skipped: {r['skipped']}"]
    else:
        eps = r.get("epsilon", {})
        privacy = f"  ε max {max(eps.values()):.2f}" if eps else "  no DP"
        secure = "  secure sum" if "secagg" in r else ""
        ms = f"  mode-seeking {r['mode_seeking_loss']:.3f}" if "mode_seeking_loss" in r else ""
        losses = (
            f"G fit to the releases {r['g_loss']:.4f} (from {r['fit_loss_first']:.4f})"
            if r.get("mechanism") == "mean-embedding"
            else f"G loss {r['g_loss']:.3f}{ms}  D loss on fakes {r['d_loss']:.3f}"
        )
        lines = [
            f"{head} {r['seconds']:6.1f} s  sites {len(r['sites'])}/{r['sites_sampled']}  "
            f"{losses}{privacy}{secure}"
        ]
    for name, figure in r.get("class_noise_figure", {}).items():
        if figure > 1:
            count = max(0.0, r["class_counts"][name])
            lines.append(
                f"  class {name}: about {count:.0f} images in the sum; its noise is "
                f"{figure:.1f}× its signal, so expect noise in its samples"
            )
    for site, why in r.get("refused", {}).items():
        lines.append(f"  {site} refused: {why}; left out of later rounds")
    for site, why in r.get("budget_exhausted", {}).items():
        lines.append(
            f"  {site} refused: budget exhausted (ε {why['epsilon']:.2f} spent, "
            f"{why['epsilon_next']:.2f} after, budget {why['budget']:.2f})"
        )
    for site, why in r.get("secagg", {}).get("failures", {}).items():
        lines.append(f"  {site} dropped out: {why}")
    return lines


def step_progress(say: Callable[[str], None], what: str) -> Callable[[int, int], None]:
    """A trainer's ``progress(step, total)`` that prints a bar with the time
    spent and left at every tenth of the work, for long runs at a terminal."""
    start = time.perf_counter()

    def report(step: int, total: int) -> None:
        if step != total and step % max(1, total // 10):
            return
        spent = time.perf_counter() - start
        left = spent / step * (total - step) if step else 0.0
        say(f"  {what} {_bar(step, total)} {step}/{total} steps, {spent:.0f} s, ~{left:.0f} s left")

    return report
