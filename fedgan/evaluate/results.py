"""Reading sites' evaluations of a run (``<run>/evaluation/<site>.json``),
for the report and the exporter, and saying what they mean in plain words.
No torch here: the exporter imports it at every scrape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVALUATION_DIR = "evaluation"
# Above this, a membership-inference attacker does better than guessing by
# enough to matter (the goal is ≤ 0.55).
MIA_WARN = 0.55


def load_all(run_dir: Path) -> list[dict[str, Any]]:
    """Every site's evaluation of a run; a file that is not JSON is skipped."""
    folder = Path(run_dir) / EVALUATION_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "site" in doc:
            found.append(doc)
    return found


def reading(ev: dict[str, Any]) -> list[str]:
    """What one site's numbers mean, for clinicians: the worst finding first
    (an attack better than guessing, possible copies), then the rest."""
    lines = _lines(ev)
    worst = [x for x in lines if x.endswith((": review.", "do not share them."))]
    return worst + [x for x in lines if x not in worst]


def _lines(ev: dict[str, Any]) -> list[str]:
    q, p, u = ev.get("quality", {}), ev.get("privacy", {}), ev.get("utility", {})
    site = ev["site"]
    out = []
    if "precision" in q:
        out.append(
            f"At {site}, {q['precision']:.0%} of synthetic images fall among the kinds of images "
            f"the site really has (fidelity), and they cover {q['recall']:.0%} of the variety of "
            "its real images (diversity)."
        )
    if "domain_fid_start" in q:
        better = q["domain_fid"] < q["domain_fid_start"]
        out.append(
            f"On {site}'s own images the federation's generator scores a domain-FID of "
            f"{q['domain_fid']:.1f} against {q['domain_fid_start']:.1f} for the model it started "
            "from (lower is closer to the site's images): "
            + (
                "the private rounds brought it closer."
                if better
                else "the private rounds did not bring it closer: review."
            )
        )
    if "inception_fid" in q:
        standard = ev.get("inception_weights", {}).get("standard", False)
        out.append(
            f"On the Inception features published studies use, {site}'s FID is "
            f"{q['inception_fid']:.1f} (lower is closer to real; "
            + (
                "comparable with published values)."
                if standard
                else "computed with non-standard weights: compare only within this consortium)."
            )
        )
    mia = {k: v for k, v in p.items() if k.startswith("mia_") and isinstance(v, float)}
    if mia:
        worst = max(mia.values())
        verdict = (
            "barely better than guessing" if worst <= MIA_WARN else "better than guessing: review"
        )
        out.append(
            f"An attacker trying to tell whether an image of {site} was used in training scores "
            f"at most {worst:.2f} (0.5 is a coin flip, 1.0 certainty): {verdict}."
        )
    elif "mia" in p:
        out.append(f"Membership inference at {site}: {p['mia']}.")
    if "memorized_fraction" in p:
        frac = p["memorized_fraction"]
        out.append(
            f"{frac:.1%} of synthetic images are closer to one of {site}'s training images than "
            "real images are to each other"
            + (": no sign of copying." if frac == 0 else ": possible copies; do not share them.")
        )
    if "tstr_ratio" in u:
        out.append(
            f"A classifier trained only on synthetic images reaches {u['tstr_accuracy']:.0%}"
            + (
                f" (± {u['tstr_accuracy_sd']:.0%} over {u['classifier_seeds']} classifiers)"
                if "tstr_accuracy_sd" in u and u.get("classifier_seeds", 1) > 1
                else ""
            )
            + f" on {site}'s held-out images, {u['tstr_ratio']:.0%} of one trained on real images"
            + (
                f" ({u['tstr_mix_ratio']:.0%} when the synthetic classes follow {site}'s mix)."
                if "tstr_mix_ratio" in u
                else "."
            )
        )
    if "anomaly_auc" in u:
        out.append(
            f"An anomaly detector that learned 'normal' ({u['normal_class']}) from synthetic "
            "images "
            f"only separates {site}'s held-out normal and abnormal images with AUC "
            f"{u['anomaly_auc']:.2f} (0.5 is a coin flip)."
        )
    return out
