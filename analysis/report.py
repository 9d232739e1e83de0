"""A run's report: figures from the saved inference data and one self-contained HTML page.

A run folder (written by ``bmrs run``) holds ``config.json``, ``metrics.json`` and
``inference_data.nc`` (from :func:`bmrs_pyro.analysis.to_inference_data` with the reduction and
the training history). :func:`build_report` needs nothing else: it renders every figure the saved
data allow into ``figures/*.png`` and writes ``report.html`` with the figures embedded as base64
PNG, inline CSS and no external resource, so the page can be mailed or archived as one file.
An optional ``curves.json`` (``{method: PruneCurve.to_dict()}``) adds the accuracy-vs-compression
figure.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from matplotlib.figure import Figure

from bmrs_pyro import __version__
from bmrs_pyro.atomic_io import atomic_write_bytes, atomic_write_text

from . import plots, plots_compression, plots_training
from .sources import SavedReduction, az, history_from_idata, is_delta_f_method, masks_from_idata, reductions_from_idata, scores_of

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
IDATA_FILE = "inference_data.nc"
CURVES_FILE = "curves.json"
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"

#: Caption of each figure, in the order they appear in the report.
CAPTIONS: dict[str, str] = {
    "kept_width": "Kept width per layer: structures that survive out of each layer's total.",
    "posterior_forest": (
        "Posterior of log theta for every structure (dot: median; thick bar: 50 %; thin bar: 94 %), "
        "sorted by median and coloured by the decision."
    ),
    "delta_f": (
        "Change in log evidence dF of reducing each structure's prior, ranked per layer. A BMRS rule "
        "removes the structures with dF >= -margin (shaded side; the solid line is the decision). The "
        "hatched tie band [-margin, 0) holds posteriors close to the prior: the data give less than the "
        "margin of evidence for keeping them. The margin (1 nat unless the run says otherwise) is a "
        "constant of the evidence scale, never tuned."
    ),
    "reduction_densities": (
        "Prior, posterior and reduced prior of log theta for the structures with the lowest dF, the dF "
        "closest to 0 and the highest dF (titles give the decision; legends give dF)."
    ),
    "e_theta_histograms": "Posterior means E[theta] of all structures before pruning and of the kept ones after.",
    "elbo": ("Evidence lower bound per training epoch; the step line (right axis) is the share of "
             "structures kept after each continuous-pruning step; vertical lines mark a resume and the "
             "start of fine-tuning."),
    "accuracy_compression": "Accuracy against structures removed for each method; stars mark where BMRS stops.",
}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it or rerun `bmrs run`") from None


def _decisions(idata) -> dict[str, Any]:
    reductions = {k: r for k, r in reductions_from_idata(idata).items() if r.keep}
    if not reductions:
        reductions = {"final mask": SavedReduction("mask", {}, masks_from_idata(idata))}
    return reductions


def _in_order(result: Any, order: list) -> Any:
    """``result`` with its sites in network ``order`` (the metrics' layer table), others after."""
    if not order or not isinstance(result, SavedReduction):
        return result
    rank = {site: i for i, site in enumerate(order)}
    sites = sorted(result.keep, key=lambda s: rank.get(s, len(rank)))
    return SavedReduction(result.method, {s: result.scores[s] for s in sites if s in result.scores},
                          {s: result.keep[s] for s in sites}, dict(result.options))


def _density_choice(reductions: Mapping[str, Any]) -> Optional[tuple[str, str, list[int]]]:
    """(label, site, indices): the structures with the lowest dF, the dF nearest 0 and the highest dF."""
    for label, result in reductions.items():
        if not is_delta_f_method(result.method) or not result.scores:
            continue
        best = None
        for site in result.scores:
            df = scores_of(result, site).numpy()
            finite = np.flatnonzero(np.isfinite(df))
            if finite.size == 0:
                continue
            keep = result.keep.get(site) if site in result.keep else None
            pruned = int((~np.asarray(keep, dtype=bool)[finite]).sum()) if keep is not None else int((df[finite] >= 0).sum())
            # Prefer the layer where both decisions occur, so the figure shows the contrast.
            rank = (0 < pruned < finite.size, finite.size)
            if best is None or rank > best[0]:
                best = (rank, site, df, finite)
        if best is None:
            continue
        _, site, df, finite = best
        order = finite[np.argsort(df[finite], kind="stable")]
        picks = [order[0], finite[np.argmin(np.abs(df[finite]))], order[-1], order[order.size // 2]]
        indices = list(dict.fromkeys(int(i) for i in picks))[:3]
        return label, site, indices
    return None


def render_figures(
    idata: Any = None,
    metrics: Optional[Mapping[str, Any]] = None,
    curves: Optional[Mapping[str, Any]] = None,
    *,
    primary: Optional[str] = None,
) -> dict[str, Figure]:
    """Every figure the given data allow, keyed by name (see :data:`CAPTIONS`).

    ``idata``: inference data from :func:`~bmrs_pyro.analysis.to_inference_data` (posteriors,
    decisions, ELBO); ``metrics``: a run's metrics (``layers`` and ``elbo`` stand in when
    ``idata`` is missing); ``curves``: ``{method: PruneCurve or dict}``; ``primary``: the label
    of the run's own reduction, the one the posterior forest is coloured by (default: the first
    stored); the other figures show every stored reduction.
    """
    figures: dict[str, Figure] = {}
    metrics = metrics or {}
    reductions = _decisions(idata) if idata is not None else {}
    order = [row["site"] for row in metrics.get("layers", []) if isinstance(row, Mapping) and "site" in row]
    reductions = {label: _in_order(r, order) for label, r in reductions.items()}
    if reductions:
        figures["kept_width"] = plots_compression.plot_kept_width(reductions)
    elif metrics.get("layers"):
        layers = {row["site"]: (row["kept"], row["total"]) for row in metrics["layers"]}
        figures["kept_width"] = plots_compression.plot_kept_width(layers)
    if reductions:
        main = primary if primary in reductions else next(iter(reductions))
        figures["posterior_forest"] = plots.plot_posterior_forest(idata, {main: reductions[main]})
        if any(is_delta_f_method(r.method) and r.scores for r in reductions.values()):
            figures["delta_f"] = plots.plot_delta_f(reductions)
        choice = _density_choice(reductions)
        if choice is not None:
            label, site, indices = choice
            figures["reduction_densities"] = plots.plot_reduction_densities(idata, site, indices, reductions[label])
        figures["e_theta_histograms"] = plots.plot_e_theta_histograms(idata, reductions)
    history = history_from_idata(idata) if idata is not None else None
    if history is None and metrics.get("elbo"):
        history = {"elbo": metrics["elbo"], "events": []}
    if history is not None and history["elbo"]:
        epochs = metrics.get("epochs") if isinstance(metrics.get("epochs"), Mapping) else {}
        figures["elbo"] = plots_training.plot_elbo(history, train_epochs=epochs.get("train"))
    if curves:
        figures["accuracy_compression"] = plots_compression.plot_accuracy_compression(curves)
    return {name: figures[name] for name in CAPTIONS if name in figures}


def save_figures(figures: Mapping[str, Figure], out_dir: Any, *, dpi: int = 110) -> dict[str, Path]:
    """Write each figure to ``out_dir/<name>.png``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        if not isinstance(fig, Figure):
            raise ValueError(f"figure {name!r} is a {type(fig).__name__}, not a matplotlib Figure")
        if not name or any(c in name for c in "/\\"):
            raise ValueError(f"figure name {name!r} must be a plain file name")
        path = out / f"{name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
        atomic_write_bytes(path, buffer.getvalue())  # a crash never leaves half a PNG
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
background:#f6f7f9;color:#1d2330;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.2rem;margin:32px 0 10px;border-bottom:2px solid #0072B2;
padding-bottom:4px}
.sub{color:#5a6270;margin:0 0 18px;font-size:.92rem}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 14px}
.card .k{font-size:.78rem;color:#5a6270;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:1.35rem;font-weight:600;margin-top:2px}.card .d{font-size:.82rem;color:#5a6270}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e7;font-size:.9rem;margin:4px 0 8px}
th,td{padding:5px 12px;border-bottom:1px solid #e8ebef;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:14px 0;padding:12px}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{font-size:.88rem;color:#3d4452;margin-top:8px}
.bar{display:inline-block;height:10px;background:#0072B2;border-radius:2px;vertical-align:middle}
.bar.t{background:#d9dde3;position:relative}
.decision{background:#fff;border-left:4px solid #D55E00;padding:10px 14px;margin:16px 0 0}
code{font-size:.85rem}footer{margin-top:36px;font-size:.8rem;color:#7a8190}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """A value for display: floats to 4 significant digits, strings of a list joined, long lists
    by length and last value, the rest as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            joined = " ".join(value)  # a command line, a list of names: show it whole
            return joined if len(joined) <= 300 else joined[:297] + "..."
        if len(value) > 8:
            last = format_value(value[-1]) if value else ""
            return f"[{len(value)} values, last {last}]"
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return str(value)


def _flatten(prefix: str, value: Any, out: list) -> None:
    if isinstance(value, Mapping) and value and prefix.count(".") < 2:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def _kv_table(data: Mapping[str, Any], skip: tuple = ()) -> str:
    rows: list = []
    for key, value in data.items():
        if key not in skip:
            _flatten(str(key), value, rows)
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(format_value(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f} %" if isinstance(value, (int, float)) else "n/a"


def _card(title: str, value: str, detail: str = "") -> str:
    return (f'<div class="card"><div class="k">{_esc(title)}</div><div class="v">{_esc(value)}</div>'
            f'<div class="d">{_esc(detail)}</div></div>')


def _cards(metrics: Mapping[str, Any]) -> str:
    cards = []
    if "accuracy_after" in metrics or "accuracy_before" in metrics:
        cards.append(_card("accuracy after pruning", _pct(metrics.get("accuracy_after")),
                           f"before: {_pct(metrics.get('accuracy_before'))}"))
    if "nll_after" in metrics:
        cards.append(_card("NLL after (nats)", format_value(metrics.get("nll_after")),
                           f"before: {format_value(metrics.get('nll_before'))}"))
    for key, title in (("structures", "structures removed"), ("parameters", "parameters removed"), ("flops", "FLOPs removed")):
        part = metrics.get(key)
        if isinstance(part, Mapping) and "removed_pct" in part:
            if key == "structures":
                detail = f"kept {format_value(part.get('kept'))} of {format_value(part.get('total'))}"
            else:
                detail = f"{format_value(part.get('before'))} -> {format_value(part.get('after'))}"
            cards.append(_card(title, f"{float(part['removed_pct']):.2f} %", detail))
    if "seconds" in metrics:
        total = metrics.get("seconds_total", metrics["seconds"])
        resumed = (metrics.get("epochs") or {}).get("resumed_from") if isinstance(metrics.get("epochs"), Mapping) else None
        detail = (f"this invocation {float(metrics['seconds']):.1f} s, resumed at epoch {resumed}"
                  if resumed is not None else "")
        cards.append(_card("run time", f"{float(total):.1f} s", detail))
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def decision_sentence(metrics: Mapping[str, Any]) -> str:
    """One sentence: what the run removed and why (and, when nothing was removed, why not)."""
    decision = metrics.get("decision") if isinstance(metrics.get("decision"), Mapping) else {}
    structures = metrics.get("structures") if isinstance(metrics.get("structures"), Mapping) else {}
    method = decision.get("method", metrics.get("method", "the method"))
    rule = decision.get("rule") or ""
    total, kept = structures.get("total"), structures.get("kept")
    if total is None or kept is None:
        return ""
    removed = int(total) - int(kept)
    band = decision.get("tie_band") if isinstance(decision.get("tie_band"), Mapping) else None
    margin = decision.get("margin")
    if method == "none":
        return (f"Nothing was removed: this run is the unpruned baseline (--method none); the dF shown is "
                f"BMRS_N's, for reference.")
    if removed == 0:
        if margin is not None:
            return (f"{method} removed nothing: every structure has dF < -{float(margin):g}, i.e. the data give "
                    f"at least {float(margin):g} nat{'s' if float(margin) != 1 else ''} of evidence for keeping "
                    f"each one (rule: {rule}).")
        return f"{method} removed nothing (rule: {rule})." if rule else f"{method} removed nothing."
    text = f"{method} removed {removed} of {total} structures ({100.0 * removed / int(total):.1f} %)"
    if rule:
        text += f" by the rule: {rule}"
    if band and band.get("count") and margin is not None and float(margin) > 0:
        text += (f". {band['removed']} of them lie in the tie band [-{float(margin):g}, 0): posteriors close to "
                 f"the prior, for which the data give less than {float(margin):g} nat"
                 f"{'s' if float(margin) != 1 else ''} of evidence")
    return text + "."


def _layer_rows(metrics: Mapping[str, Any], idata: Any) -> list[dict]:
    rows = [dict(r) for r in metrics.get("layers", []) if isinstance(r, Mapping) and "site" in r]
    if rows or idata is None:
        return rows
    first = next(iter(_decisions(idata).values()))
    return [{"site": s, "kept": k, "total": t} for s, (k, t) in first.kept_per_layer.items()]


def _layer_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>No per-layer data were saved.</p>"
    body = []
    for row in rows:
        kept, total = int(row["kept"]), int(row["total"])
        removed = 100.0 * (total - kept) / total if total else 0.0
        width = 160
        bar = (f'<span class="bar t" style="width:{width}px"><span class="bar" '
               f'style="position:absolute;left:0;top:0;width:{round(width * kept / max(total, 1))}px"></span></span>')
        body.append(f"<tr><td><code>{_esc(row['site'])}</code></td><td class=\"n\">{kept}</td>"
                    f"<td class=\"n\">{total}</td><td class=\"n\">{removed:.1f}</td><td>{bar}</td></tr>")
    head = "<tr><th>site</th><th>kept</th><th>total</th><th>removed %</th><th>kept width</th></tr>"
    return f'<table class="layers">{head}{"".join(body)}</table>'


def _figure_html(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    caption = CAPTIONS.get(name, name)
    return (f'<figure id="fig-{_esc(name)}"><img alt="{_esc(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def render_html(
    *,
    title: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    layers: list[dict],
    images: Mapping[str, bytes],
    notes: tuple = (),
) -> str:
    """The self-contained report page (figures as PNG bytes, embedded)."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    decision = decision_sentence(metrics)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">Bayesian structured pruning with exact Bayesian model reduction (BMRS). '
        f"Method: <code>{_esc(config.get('method', 'n/a'))}</code>; model: "
        f"<code>{_esc(config.get('model', 'n/a'))}</code>; data: <code>{_esc(config.get('data', config.get('dataset', 'n/a')))}</code>.</p>",
        _cards(metrics),
        f'<p class="decision">{_esc(decision)}</p>' if decision else "",
        "<h2>Layers</h2>", _layer_table(layers),
        "<h2>Figures</h2>",
    ]
    parts += [_figure_html(name, png) for name, png in images.items()]
    parts += [f'<p class="sub">{_esc(n)}</p>' for n in notes]
    parts += ["<h2>Metrics</h2>", _kv_table(metrics, skip=("layers",)),
              "<h2>Configuration</h2>", _kv_table(config),
              f"<footer>bmrs-pyro {_esc(__version__)} - generated {_esc(now)}</footer>",
              "</main></body></html>"]
    return "\n".join(p for p in parts if p)


def build_report(run_dir: Any, *, dpi: int = 110) -> Path:
    """Render the figures of a run folder into ``figures/`` and write ``report.html``; returns its path.

    Needs ``config.json`` and ``metrics.json``; ``inference_data.nc`` supplies the posteriors,
    decisions and ELBO (without it only the metrics-based figures appear), ``curves.json`` the
    accuracy-vs-compression figure.
    """

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist; pass the folder written by `bmrs run`")
    missing = [f for f in (CONFIG_FILE, METRICS_FILE) if not (run / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} lacks {missing}; a run folder holds {CONFIG_FILE}, {METRICS_FILE} and {IDATA_FILE}")
    config, metrics = _load_json(run / CONFIG_FILE), _load_json(run / METRICS_FILE)
    if not isinstance(config, Mapping) or not isinstance(metrics, Mapping):
        raise ValueError(f"{CONFIG_FILE} and {METRICS_FILE} must each hold a JSON object")
    notes = []
    idata = None
    if (run / IDATA_FILE).is_file():
        idata = az.from_netcdf(run / IDATA_FILE)
    else:
        notes.append(f"{IDATA_FILE} was not found: posterior figures are missing.")
    curves = _load_json(run / CURVES_FILE) if (run / CURVES_FILE).is_file() else None
    method = config.get("method")
    figures = render_figures(idata, metrics, curves, primary=method if isinstance(method, str) else None)
    paths = save_figures(figures, run / FIGURES_DIR, dpi=dpi)
    images = {name: path.read_bytes() for name, path in paths.items()}
    page = render_html(title=f"bmrs-pyro run: {run.name}", config=config, metrics=metrics,
                       layers=_layer_rows(metrics, idata), images=images, notes=tuple(notes))
    return atomic_write_text(run / REPORT_FILE, page)
