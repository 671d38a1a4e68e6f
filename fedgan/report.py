"""`fedgan report RUN`: one self-contained HTML page per run (images
embedded, charts as inline SVG, no script, nothing fetched), written to
``runs/<id>/report.html``. It reads only what the run folder already holds:
metrics, status, sample grids and this run's audit events.

The evaluation issue adds quality, privacy-attack and utility tables here;
until a run has been evaluated the page says so rather than guess."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from fedgan.aggregator.run_store import latest_by_site, read_records
from fedgan.atomic import write_text_atomic
from fedgan.config.run import parse_classes
from fedgan.errors import FedGanError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


class ReportError(FedGanError):
    """The run folder holds nothing to report on."""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def line_chart(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    y_label: str,
    hlines: dict | None = None,
) -> str:
    """A small SVG line chart: one polyline per series, optional dashed
    horizontal lines (e.g. budgets)."""
    width, height, pad = 560, 220, 40
    points = [p for s in series.values() for p in s] + [(0.0, v) for v in (hlines or {}).values()]
    if not points:
        return ""
    xs = [p[0] for p in points if p[0]] or [1.0]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{_e(title)}">',
        f'<text x="{pad}" y="16" font-size="13">{_e(title)}</text>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#999"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
        f'<text x="4" y="{pad - 6}" font-size="11">{_e(y_label)}</text>',
        f'<text x="{pad - 4}" y="{sy(y1) + 4:.1f}" font-size="10" text-anchor="end">'
        f"{y1:.3g}</text>",
        f'<text x="{pad - 4}" y="{sy(y0) + 4:.1f}" font-size="10" text-anchor="end">'
        f"{y0:.3g}</text>",
        f'<text x="{width - pad}" y="{height - pad + 16}" font-size="10" text-anchor="end">'
        f"round {x1:g}</text>",
    ]
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts.append(
            f'<text x="{width - pad + 4}" y="{pad + 14 * i}" font-size="11" fill="{color}">'
            f"{_e(name)}</text>"
        )
    for i, (_name, value) in enumerate(sorted((hlines or {}).items())):
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<line x1="{pad}" y1="{sy(value):.1f}" x2="{width - pad}" y2="{sy(value):.1f}" '
            f'stroke="{color}" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _png(path: Path, alt: str, width: int) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" width="{width}">'


def _audit_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir.parent / "audit.jsonl"
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("run") == run_dir.name:
            events.append(e)
    return events


def worst_findings(records: list[dict[str, Any]]) -> list[str]:
    """What makes a run's images not worth sharing, said first: no round
    produced a model, or D collapsed (G's loss fell towards 0 while D's rose:
    G was rewarded for anything, which DP noise on a small silo causes)."""
    done = [r for r in records if "skipped" not in r]
    if records and not done:
        return [
            "No round produced a model: there is no generator to share "
            f"(the last round: {records[-1]['skipped']})."
        ]
    losses = [(r["g_loss"], r["d_loss"]) for r in done if "g_loss" in r and "d_loss" in r]
    if len(losses) >= 2 and _collapsed(losses[0], losses[-1]):
        (g0, d0), (g1, d1) = losses[0], losses[-1]
        return [
            f"The discriminator collapsed: G's loss fell from {g0:.3f} to {g1:.3f} while D's "
            f"rose from {d0:.3f} to {d1:.3f}, so G was rewarded for anything and its samples "
            "are not images of the data. Do not share them; under DP this is the noise "
            "drowning what D can learn (docs/privacy.md: the noise figure)."
        ]
    return []


def _collapsed(first: tuple[float, float], last: tuple[float, float]) -> bool:
    """G's loss near 0 and falling while D's rises. A healthy non-saturating
    GAN keeps G's loss near or above ln 2 (D unsure); below 0.1, D calls
    every fake real with about 90 % confidence."""
    (g0, d0), (g1, d1) = first, last
    return g1 < 0.1 and g1 < g0 and d1 > d0


def reading(records: list[dict[str, Any]], status: dict[str, Any]) -> list[str]:
    """A short plain-language reading for clinicians, the worst finding first."""
    done = [r for r in records if "skipped" not in r]
    sites = sorted({s for r in done for s in r["sites"]})
    eps = latest_by_site(records, "epsilon")
    released = any(r.get("mechanism") == "mean-embedding" for r in done)
    lines = [
        f"{len(sites)} hospitals trained one image generator together over {len(records)} "
        "rounds; no image left any hospital.",
    ]
    if released:
        lines[0] = (
            f"{len(sites)} hospitals each released once a noisy summary of their images "
            "(a mean embedding: averages of fixed random features, never an image); the "
            "coordinating server fitted one image generator to the sum of the summaries."
        )
        if any(r.get("release_kept") for r in done):
            lines[0] += (
                " The server stopped while fitting and resumed from the sum it had kept, so no "
                "hospital released twice."
            )
    if eps:
        worst = max(eps.values())
        lines.append(
            f"Each hospital's images are protected by differential privacy: the largest privacy "
            f"loss spent is ε = {worst:.2f} (smaller is more private; a budget of about 10 or "
            "less is common practice)."
        )
        figures = latest_by_site(records, "noise_figure")
        means = [r["noise_figure_mean"] for r in records if "noise_figure_mean" in r]
        where, its = "", "its"
        if figures:
            site, figure = max(figures.items(), key=lambda item: item[1])
            where = f"At the hospital with the noisiest training ({site}), "
        elif means:  # secure aggregation: only the sites' mean is known
            figure, its = means[-1], "their"
            where = "Across the hospitals (a geometric mean; no single one's is known), "
        if where:
            times = f"{figure:.0f}" if figure >= 10 else f"{figure:.2g}"
            lines.append(
                where
                + (f"{its} summary's" if released else "each step's")
                + f" privacy noise was {times} times the strongest signal {its} images could give"
                + (
                    f": {its} images shape the generator only weakly, so expect images less "
                    "faithful than a model trained without privacy (more images, or a smaller "
                    "model, lower this)."
                    if figure > 10
                    else "."
                )
            )
    else:
        lines.append("This run trained without differential privacy: do not share its outputs.")
    if any("secagg" in r for r in records):
        lines.append(
            "Secure aggregation was on: the coordinating server saw only the sum of the "
            "hospitals' updates, never one hospital's."
        )
    if status.get("status") == "stopped":
        lines.append(
            f"The run was stopped after round {status.get('last_round', '?')}: the pictures are "
            "interim (resume it to go on)."
        )
    elif status.get("status") != "completed":
        lines.append(f"The run is {status.get('status', 'unfinished')}: the pictures are interim.")
    lines.append(
        "The images are synthetic. How realistic, diverse and private they are is measured by "
        "`fedgan evaluate` at a hospital; until then, treat them as unvalidated."
    )
    return worst_findings(records) + lines


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((run_dir / "run-config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def starting_point(run_dir: Path) -> str:
    """Where the federation's model started: a pretrained init (which data,
    which hashes) or random weights."""
    init = _run_config(run_dir).get("model-init-record")
    if not isinstance(init, dict):
        return "Started from random weights (no pretrained init)."
    data = init.get("data", {}) if isinstance(init.get("data"), dict) else {}
    return (
        f"Started from a model pretrained without DP on {data.get('description', 'public data')} "
        f"({data.get('images', '?')} images, {init.get('steps', '?')} steps): init file SHA-256 "
        f"{init.get('file_sha256', '?')}, weights SHA-256 {init.get('weights_sha256', '?')}."
    )


def _class_rows(run_dir: Path, rows: int = 8) -> str:
    """A conditional run's grid has one class per row (the ServerApp asks row
    i for class i mod the number of classes): say which."""
    try:
        classes = parse_classes(str(_run_config(run_dir).get("classes", "")))
    except ValueError:  # ConfigError (a class named twice) is a ValueError
        return ""
    if not classes:
        return ""
    names = ", ".join(f"{i + 1}: {classes[i % len(classes)]}" for i in range(rows))
    return f", one class per row ({_e(names)})"


def build(run_dir: Path, baselines: list[tuple[str, Path]] | None = None) -> str:
    """``baselines``: (label, run folder) of runs to compare with, e.g. a
    centralized rehearsal and a federated run without DP, evaluated by the
    same sites with the same encoders."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    if not records:
        raise ReportError(f"{run_dir} holds no metrics.jsonl with a finished round")
    status = _status(run_dir)
    rounds = [r["round"] for r in records]
    body = [
        f"<h1>FedGAN run {_e(run_dir.name)}</h1>",
        f"<p>Status: <b>{_e(status.get('status', 'unknown'))}</b>; rounds "
        f"{min(rounds)}–{max(rounds)}; Flower run {_e(status.get('flower_run_id', '?'))}.</p>",
        f"<p>{_e(starting_point(run_dir))}</p>",
        "<h2>Reading</h2><ul>"
        + "".join(f"<li>{_e(x)}</li>" for x in reading(records, status))
        + "</ul>",
        *_samples(run_dir),
        *_charts(records),
        _rounds_table(records),
        *_secagg(records),
        *_audit(run_dir),
        _evaluation(run_dir),
    ]
    if baselines:
        body.append(_baselines(run_dir, baselines))
    return _page(f"FedGAN run {_e(run_dir.name)}", body)


def _status(run_dir: Path) -> dict[str, Any]:
    """The run's status.json; empty while the ServerApp has not written one."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _samples(run_dir: Path) -> list[str]:
    """The last round's grid large, then every round's small: the same latent
    batch each time, so the rows show the generator improving."""
    grids = sorted(run_dir.glob("samples_round_*.png"))
    if not grids:
        return []
    return [
        "<h2>Samples</h2>",
        f"<p>After round {int(grids[-1].stem[-3:])}{_class_rows(run_dir)}:</p>"
        + _png(grids[-1], "last", 384),
        "<p>Every round (the same latent batch each time):</p><div>"
        + "".join(
            f"<figure style='display:inline-block'>{_png(g, g.stem, 128)}"
            f"<figcaption>round {int(g.stem[-3:])}</figcaption></figure>"
            for g in grids
        )
        + "</div>",
    ]


def _charts(records: list[dict[str, Any]]) -> list[str]:
    """G's and D's losses over the aggregated rounds; each site's ε over every
    round, against its budget (dashed)."""
    done = [r for r in records if "skipped" not in r]
    losses = {
        "G": [(r["round"], r["g_loss"]) for r in done if "g_loss" in r],
        "D": [(r["round"], r["d_loss"]) for r in done if "d_loss" in r],
    }
    charts = ["<h2>Losses</h2>" + line_chart("losses", losses, "loss")]
    eps: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for site, value in r.get("epsilon", {}).items():
            eps.setdefault(site, []).append((r["round"], value))
    if eps:
        budgets = {f"budget {s}": b for s, b in latest_by_site(records, "epsilon_budget").items()}
        charts.append(
            "<h2>Privacy spent per site</h2>" + line_chart("ε per site", eps, "ε", budgets)
        )
    return charts


def _rounds_table(records: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>round</th><th>seconds</th><th>sites in the sum</th><th>sampled</th>"
        "<th>G loss</th><th>D loss (generated images)</th><th>ε max</th><th>bytes sent</th>"
        "<th>note</th></tr>"
    )
    rows = "".join(_round_row(r) for r in records)
    return f"<h2>Rounds</h2><table>{head}{rows}</table>"


def _round_row(r: dict[str, Any]) -> str:
    """One round; "—" where it has no such figure (a skipped round, a
    mean-embedding run's missing D)."""
    e = r.get("epsilon", {})
    note = r.get("skipped", "")
    dropped = r.get("secagg", {}).get("dropped", [])
    if dropped:
        note = (note + " " if note else "") + f"dropped: {', '.join(dropped)}"
    cells = (
        r["round"],
        f"{r.get('seconds', 0):.1f}",
        ", ".join(r.get("sites", [])) if "skipped" not in r else "—",
        r.get("sites_sampled", ""),
        f"{r['g_loss']:.4g}" if "g_loss" in r else "—",
        f"{r['d_loss']:.4g}" if "d_loss" in r else "—",
        f"{max(e.values()):.3f}" if e else "—",
        sum(r.get("update_bytes", {}).values()) or "—",
        note,
    )
    return "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in cells) + "</tr>"


def _secagg(records: list[dict[str, Any]]) -> list[str]:
    """The last secure-aggregation settings the run recorded, if it used it."""
    secagg = next((r["secagg"] for r in reversed(records) if "secagg" in r), None)
    if not secagg:
        return []
    return [
        "<h2>Secure aggregation</h2><p>"
        + _e(
            f"threshold {secagg['threshold']}, {secagg['bits']}-bit values summed modulo "
            f"2^{secagg['modulus_bits']}, value range ±{secagg['value_range']:.3g}; "
            "AES-256-GCM, X25519, HKDF-SHA256, AES-256-CTR masks, Shamir shares."
        )
        + "</p>"
    ]


def _audit(run_dir: Path) -> list[str]:
    events = _audit_events(run_dir)
    if not events:
        return []
    hidden = ("time", "event", "prev", "run")
    items = "".join(
        f"<li>{_e(e.get('time', ''))} {_e(e['event'])} "
        + _e(", ".join(f"{k}={v}" for k, v in e.items() if k not in hidden))
        + "</li>"
        for e in events
    )
    return [f"<h2>Audit events</h2><ul>{items}</ul>"]


def _page(title: str, body: list[str]) -> str:
    """A self-contained page: inline style, nothing fetched. ``title`` is
    already escaped."""
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:13px}"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{style}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write(
    run_dir: Path, out: Path | None = None, baselines: list[tuple[str, Path]] | None = None
) -> Path:
    path = Path(out) if out else Path(run_dir) / "report.html"
    write_text_atomic(path, build(run_dir, baselines))
    return path


EVAL_COLUMNS = (
    ("quality", "domain_fid", "domain-FID", "{:.2f}"),
    ("quality", "domain_fid_start", "domain-FID of the starting model", "{:.2f}"),
    ("quality", "domain_kid_x1000", "KID×1000", "{:.2f}"),
    ("quality", "inception_fid", "Inception FID", "{:.2f}"),
    ("quality", "precision", "precision", "{:.2f}"),
    ("quality", "recall", "recall", "{:.2f}"),
    ("quality", "ssim_nearest", "SSIM (nearest real)", "{:.3f}"),
    ("quality", "psnr_nearest_db", "PSNR dB (nearest real)", "{:.1f}"),
    ("quality", "realism", "realism (D)", "{:.2f}"),
    ("privacy", "mia_discriminator_auc", "MIA AUC (D)", "{:.3f}"),
    ("privacy", "mia_generator_auc", "MIA AUC (G, nearest)", "{:.3f}"),
    ("privacy", "memorized_fraction", "memorized", "{:.1%}"),
    ("utility", "tstr_accuracy", "TSTR accuracy", "{:.3f}"),
    ("utility", "tstr_accuracy_sd", "TSTR s.d. over classifier seeds", "{:.3f}"),
    ("utility", "tstr_mix_accuracy", "TSTR at the site's class mix", "{:.3f}"),
    ("utility", "trtr_accuracy", "train-on-real accuracy", "{:.3f}"),
    ("utility", "trtr_accuracy_sd", "train-on-real s.d. over classifier seeds", "{:.3f}"),
    ("utility", "anomaly_auc", "anomaly detector AUC", "{:.3f}"),
)


def _evaluation(run_dir: Path) -> str:
    """Each site's `fedgan evaluate` numbers, a table and a plain reading."""
    from fedgan.evaluate.results import load_all, reading

    evaluations = load_all(run_dir)
    if not evaluations:
        return (
            "<h2>Evaluation</h2><p>Not evaluated yet: each site measures quality (domain-FID, "
            "precision/recall), privacy attacks and utility with <code>fedgan evaluate "
            f"{_e(run_dir)} --real SILO --holdout HELD_OUT</code>, on its own images.</p>"
        )
    head = (
        "<tr><th>metric</th>"
        + "".join(f"<th>{_e(ev['site'])}</th>" for ev in evaluations)
        + "</tr>"
    )
    rows = []
    for group, key, label, fmt in EVAL_COLUMNS:
        values = [ev.get(group, {}).get(key) for ev in evaluations]
        if all(v is None for v in values):
            continue
        rows.append(
            f"<tr><td>{_e(label)}</td>"
            + "".join(
                f"<td>{_e(fmt.format(v)) if isinstance(v, int | float) else '—'}</td>"
                for v in values
            )
            + "</tr>"
        )
    counts = "; ".join(
        f"{ev['site']}: {ev['images']['members']} training, {ev['images']['held_out']} held-out, "
        f"{ev['images']['synthetic']} synthetic images"
        for ev in evaluations
        if "images" in ev
    )
    plain = "".join(f"<li>{_e(line)}</li>" for ev in evaluations for line in reading(ev))
    return (
        "<h2>Evaluation</h2><p>Measured at each site on its own images (they never left it); "
        "domain-FID and KID are on that site's own encoder, so compare them between runs "
        f"evaluated with the same encoder only. {_e(counts)}.</p>"
        f"<table>{head}{''.join(rows)}</table><ul>{plain}</ul>"
    )


# The baselines table: the headline metrics of each group, from EVAL_COLUMNS.
BASELINE_COLUMNS = tuple(
    c
    for c in EVAL_COLUMNS
    if c[1]
    in (
        "domain_fid",
        "precision",
        "recall",
        "mia_discriminator_auc",
        "mia_generator_auc",
        "memorized_fraction",
        "tstr_accuracy",
    )
)


def _baselines(run_dir: Path, baselines: list[tuple[str, Path]]) -> str:
    """This run against its baselines, per evaluating site. Domain-FID is
    comparable only on the same encoder, so a row evaluated with another
    encoder is marked."""
    from fedgan.evaluate.results import load_all

    runs = [("this run", Path(run_dir)), *((label, Path(d)) for label, d in baselines)]
    by_run = {label: {ev["site"]: ev for ev in load_all(d)} for label, d in runs}
    sites = sorted({site for evs in by_run.values() for site in evs})
    if not sites:
        return "<h2>Baselines</h2><p>No evaluation in this run or its baselines yet.</p>"
    parts = ["<h2>Baselines</h2>"]
    head = (
        "<tr><th>configuration</th>"
        + "".join(f"<th>{_e(label)}</th>" for _, _, label, _ in BASELINE_COLUMNS)
        + "<th>encoder</th></tr>"
    )
    for site in sites:
        own = by_run["this run"].get(site, {}).get("encoder_sha256")
        rows = []
        for label, _ in runs:
            ev = by_run[label].get(site)
            if ev is None:
                rows.append(f"<tr><td>{_e(label)}</td><td colspan='8'>not evaluated</td></tr>")
                continue
            cells = "".join(
                f"<td>{_e(fmt.format(v)) if isinstance(v, int | float) else '—'}</td>"
                for group, key, _, fmt in BASELINE_COLUMNS
                for v in [ev.get(group, {}).get(key)]
            )
            same = ev.get("encoder_sha256") == own and own is not None
            encoder = "same" if same else "other: FID not comparable"
            rows.append(f"<tr><td>{_e(label)}</td>{cells}<td>{encoder}</td></tr>")
        parts.append(f"<h3>At {_e(site)}</h3><table>{head}{''.join(rows)}</table>")
    return "".join(parts)
