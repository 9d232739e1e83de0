"""Figures and the run report (issue 5, parts 2 and 3)."""

from __future__ import annotations

import base64
import html
import shutil
import importlib.util
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure
from scipy import stats

from bmrs_pyro.analysis import plots_compression, plots_training
from bmrs_pyro.analysis import build_report, plots, render_figures, save_figures, to_inference_data
from bmrs_pyro.infer import History, evaluate, fit
from bmrs_pyro.reduction import delta_f_log_normal, delta_f_log_uniform

from test_analysis import SITES, WIDTHS, FakeReduction, make_model, set_posterior  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCS = {SITES[0]: [-18.0, -17.0, -19.0, -16.0] + list(np.linspace(-2.0, -0.3, 8)),
        SITES[1]: [-18.5, -17.5, -19.5] + list(np.linspace(-1.5, -0.2, 5))}
SCALES = {SITES[0]: [2.0, 2.5, 1.5, 3.0] + [0.3] * 8, SITES[1]: [2.0, 1.8, 2.2] + [0.4] * 5}


def mixed_guide():
    """A guide whose first structures pile up at the lower bound (prunable) and the rest near 0."""
    model, guide = make_model()
    for site in SITES:
        set_posterior(guide, site, torch.tensor(LOCS[site]), torch.tensor(SCALES[site]))
    return model, guide


def fake_reductions(guide, margin: float = 1.0) -> list[FakeReduction]:
    out = []
    for method, fn in (("bmrs_n", delta_f_log_normal), ("bmrs_u", delta_f_log_uniform)):
        scores = {s: fn(*(t.detach() for t in guide.loc_scale(s)), -20.0, 0.0) for s in SITES}
        out.append(FakeReduction(method, scores, {s: d < -margin for s, d in scores.items()}, {"margin": margin}))
    snr = {s: guide.posterior(s).signal_to_noise.detach().double() for s in SITES}
    out.append(FakeReduction("snr", snr, {s: v >= 1 for s, v in snr.items()}))
    return out


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def assert_labelled(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    for ax in visible_axes(fig):
        assert ax.get_xlabel() and ax.get_ylabel(), ax
        assert ax.get_title() or (fig._suptitle is not None and fig._suptitle.get_text())
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=40)
    assert png.getvalue().startswith(b"\x89PNG")


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


# ---------------------------------------------------------------- figures


def test_forest_intervals_are_truncated_normal_quantiles():
    model, guide = mixed_guide()
    bmrs_n = fake_reductions(guide)[0]
    fig = plots.plot_posterior_forest((model, guide), bmrs_n)
    assert_labelled(fig)
    axes = visible_axes(fig)
    assert len(axes) == len(SITES)
    for ax, site in zip(axes, SITES):
        lcs = [c for c in ax.collections if isinstance(c, LineCollection)]
        dots = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert len(lcs) == 4 and len(dots) == 2  # (94 %, 50 %) x (kept, pruned); medians per decision
        kept = int(bmrs_n.keep[site].sum())
        assert legend_texts(ax) == [f"kept ({kept})", f"pruned ({len(LOCS[site]) - kept})"]
        assert len(dots[0].get_offsets()) == kept
        loc, scale = np.array(LOCS[site]), np.array(SCALES[site])
        dist = stats.truncnorm((-20 - loc) / scale, (0 - loc) / scale, loc=loc, scale=scale)
        thick = [c for c in lcs if c.get_linewidth()[0] > 2]
        lows = sorted(seg[0][1] for c in thick for seg in c.get_segments())
        highs = sorted(seg[1][1] for c in thick for seg in c.get_segments())
        np.testing.assert_allclose(lows, np.sort(dist.ppf(0.25)), atol=1e-4)
        np.testing.assert_allclose(highs, np.sort(dist.ppf(0.75)), atol=1e-4)
        thin = [c for c in lcs if c.get_linewidth()[0] < 2]
        np.testing.assert_allclose(sorted(seg[0][1] for c in thin for seg in c.get_segments()),
                                   np.sort(dist.ppf(0.03)), atol=1e-4)
        medians = np.concatenate([d.get_offsets()[:, 1] for d in dots])
        np.testing.assert_allclose(np.sort(medians), np.sort(dist.ppf(0.5)), atol=1e-4)
    # several reductions: one column each
    assert len(visible_axes(plots.plot_posterior_forest(guide, fake_reductions(guide)[:2]))) == 4


def test_delta_f_ranked_with_zero_line_decision_line_and_tie_band():
    _, guide = mixed_guide()
    reds = fake_reductions(guide)
    fig = plots.plot_delta_f(reds)  # snr has no dF and is left out
    assert_labelled(fig)
    for ax, site in zip(visible_axes(fig), SITES):
        assert len(ax.lines) == 4  # bmrs_n, bmrs_u, the zero line, the decision line at -margin
        for line, red in zip(ax.lines[:2], reds[:2]):
            np.testing.assert_allclose(line.get_ydata(), np.sort(red.scores[site].numpy())[::-1])
        assert ax.lines[2].get_ydata()[0] == 0 and ax.lines[3].get_ydata()[0] == -1.0
        assert len(ax.patches) == 2  # the removed side dF >= -1 and the tie band [-1, 0)
        band = [p for p in ax.patches if p.get_hatch()]
        assert len(band) == 1 and band[0].get_y() == pytest.approx(-1.0) and band[0].get_height() == pytest.approx(1.0)
        removed = int((~reds[0].keep[site]).sum())
        texts = legend_texts(ax)
        assert f"bmrs_n: {removed} of {WIDTHS[SITES.index(site)]} removed" in texts
        assert "tie band [-1, 0)" in texts and "decision: dF = -1" in texts
        assert ax.get_yscale() == "symlog"
        # plain numbers on the symlog axis where people read them, no -10^0
        labels = [plots._symlog_label(v) for v in (-1000.0, -10.0, -1.0, 0.0, 1.0, -1e5)]
        assert labels == ["-1000", "-10", "-1", "0", "1", "$-10^{5}$"]
    # the strict rule (margin 0): a decision line at 0 and no tie band
    strict = plots.plot_delta_f(fake_reductions(guide, margin=0.0)[:1])
    ax = visible_axes(strict)[0]
    assert not [p for p in ax.patches if p.get_hatch()]
    with pytest.raises(ValueError, match="dF"):
        plots.plot_delta_f(reds[2])


def test_reduction_densities_show_delta_f_of_quadrature():
    _, guide = mixed_guide()
    site, idx = SITES[0], [0, 5, 11]
    a, b, b2 = -20.0, 0.0, -8 * math.log(2)
    fig = plots.plot_reduction_densities(guide, site, idx, reduced="bmrs_u")
    assert_labelled(fig)
    axes = visible_axes(fig)
    assert len(axes) == 3
    for ax, i in zip(axes, idx):
        loc, scale = LOCS[site][i], SCALES[site][i]
        z = stats.norm(loc, scale)
        # dF_U = log of posterior mass in [a, b'] over the prior's, both by the normal cdf
        expected = math.log((z.cdf(b2) - z.cdf(a)) / (z.cdf(b) - z.cdf(a)) * (b - a) / (b2 - a))
        labels = legend_texts(ax)
        assert len(ax.lines) == 3 and len(labels) == 3
        assert labels[2].endswith(f"dF of this posterior {expected:.2f}")
        # the default margin: removed where dF >= -1
        assert ax.get_title().split(": ")[1].startswith("removed" if expected >= -1 else "kept")
        assert ax.get_yscale() == "log"
    fig = plots.plot_reduction_densities(guide, site, [0, 7], reduced={"method": "bmrs_n"})
    for ax, i in zip(visible_axes(fig), [0, 7]):
        loc, scale = LOCS[site][i], SCALES[site][i]
        # a near point mass at a: dF_N -> log((b - a) q(a)), q the truncated normal density
        q_a = stats.norm(loc, scale).pdf(a) / (stats.norm(loc, scale).cdf(b) - stats.norm(loc, scale).cdf(a))
        df = math.log((b - a) * q_a) if q_a > 0 else -math.inf
        text = legend_texts(ax)[2]
        shown = float(text.rsplit(" ", 1)[1])
        assert shown == pytest.approx(df, abs=0.01) if math.isfinite(df) else shown < -1e3
        assert len(ax.texts) == 1  # the arrow for the point mass
    exact = [float(legend_texts(ax)[2].rsplit(" ", 1)[1]) for ax in visible_axes(fig)]
    # reference_code: the same exact dF, decided with the margin 0.5 log(2 pi)
    ref = plots.plot_reduction_densities(guide, site, [0, 7], reduced={"method": "bmrs_n", "reference_code": True})
    for ax, df in zip(visible_axes(ref), exact):
        shown = float(legend_texts(ax)[2].rsplit(" ", 1)[1])
        assert shown == df
        verdict = "removed" if df >= -0.5 * math.log(2 * math.pi) else "kept"
        assert ax.get_title().split(": ")[1].startswith(verdict) and "-0.919" in ax.get_title()
    assert len(visible_axes(plots.plot_reduction_densities(guide, site, [1, 2, 3, 4]))) == 4
    with pytest.raises(ValueError, match="indices"):
        plots.plot_reduction_densities(guide, site, [12])
    with pytest.raises(ValueError, match="unknown site"):
        plots.plot_reduction_densities(guide, "nope.theta", [0])
    with pytest.raises(ValueError, match="bmrs_n and bmrs_u"):
        plots.plot_reduction_densities(guide, site, [0], reduced="snr")


def test_e_theta_histograms_before_and_after():
    _, guide = mixed_guide()
    reds = fake_reductions(guide)
    fig = plots.plot_e_theta_histograms(guide, reds)
    assert_labelled(fig)
    for ax, site in zip(visible_axes(fig), SITES):
        assert len(ax.patches) == 1 + len(reds)
        assert ax.get_xscale() == "log"
        labels = legend_texts(ax)
        assert labels[0] == f"before: all {WIDTHS[SITES.index(site)]}"
        kept = int(reds[1].keep[site].sum())
        assert labels[2] == f"after bmrs_u: {kept} kept, {WIDTHS[SITES.index(site)] - kept} pruned"
    with pytest.raises(ValueError, match="reduction"):
        plots.plot_e_theta_histograms(guide, None)


def test_elbo_trace_shows_kept_share_resume_and_finetuning():
    elbo = [-3000.0, -500.0, -60.0, -50.0, -30.0, -20.0, -18.0, -17.5, -17.0, -16.0, -15.9, -15.8]
    history = History(elbo=elbo,
                      events=[{"epoch": 1, "event": "prune", "method": "bmrs_n", "fraction_removed": 0.2},
                              {"epoch": 3, "event": "prune", "method": "bmrs_n", "fraction_removed": 0.3},
                              {"epoch": 5, "event": "resume"},
                              {"epoch": 9, "event": "finetune"}])
    fig = plots_training.plot_elbo(history)
    assert_labelled(fig)
    ax, twin = fig.axes[0], fig.axes[1]
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), elbo)
    # one step line of the kept share instead of a vertical line per reduction
    step = twin.lines[0]
    assert list(step.get_ydata()) == pytest.approx([100.0, 80.0, 70.0, 70.0])
    assert list(twin.lines[1].get_xdata()) == [2, 4]  # epochs are 1-based on the axis
    vlines = [line for line in ax.lines[1:]]
    assert sorted(line.get_xdata()[0] for line in vlines) == [5.5, 9.5]
    assert {t.get_text() for t in ax.texts} == {"resumed", "fine-tuning (masks frozen)"}
    texts = legend_texts(ax)
    assert "resumed" in texts and "fine-tuning (masks frozen)" in texts
    # the first epochs do not set the range: the rest of the curve stays readable
    bottom, top = ax.get_ylim()
    assert bottom > -3000.0 and bottom < -60.0 and top > -15.8
    assert "below the range" in fig._suptitle.get_text()
    # without events: the ELBO alone; train_epochs marks fine-tuning when no event says so
    ax = visible_axes(plots_training.plot_elbo({"elbo": elbo, "events": []}, train_epochs=10))[0]
    assert [line.get_xdata()[0] for line in ax.lines[1:]] == [10.5]
    assert len(visible_axes(plots_training.plot_elbo([-3.0, -2.0]))[0].lines) == 1
    with pytest.raises(ValueError, match="ELBO"):
        plots_training.plot_elbo([])


def test_accuracy_compression_curves_and_stop_points():
    pts = lambda f: [{"structures_removed": p, "parameters_removed": 1.5 * p, "accuracy": f(p)} for p in (0, 25, 50, 75)]
    curves = {
        "snr": {"points": pts(lambda p: 0.9 - p / 500), "baseline": {"accuracy": 0.9}},
        "bmrs_n": {"points": pts(lambda p: 0.92 - p / 1000), "baseline": {"accuracy": 0.9},
                   "stop_point": {"structures_removed": 40.0, "parameters_removed": 55.0, "accuracy": 0.91}},
    }
    fig = plots_compression.plot_accuracy_compression(curves)
    assert_labelled(fig)
    ax = visible_axes(fig)[0]
    assert len(ax.lines) == 4  # unpruned reference, two curves, one stop marker
    assert legend_texts(ax) == ["unpruned", "snr", "bmrs_n", "bmrs_n stop (40%)"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [90.0, 85.0, 80.0, 75.0])
    np.testing.assert_allclose(ax.lines[3].get_xydata(), [[40.0, 91.0]])
    ax = visible_axes(plots_compression.plot_accuracy_compression(curves, x="parameters"))[0]
    np.testing.assert_allclose(ax.lines[2].get_xdata(), [0, 37.5, 75, 112.5])
    assert ax.get_xlabel() == "parameters removed (%)"
    with pytest.raises(ValueError, match="x must be"):
        plots_compression.plot_accuracy_compression(curves, x="flops")


def test_accuracy_compression_reads_prune_curve_objects():
    from bmrs_pyro.curves import CurvePoint, PruneCurve

    point = lambda f, s, acc: CurvePoint(step=f, structures_removed=s, parameters_removed=s * 1.2,
                                         accuracy=acc, nll=0.3, kept_per_layer={})
    curve = PruneCurve(criterion="bmrs_n", options={}, mode="mean", baseline={"accuracy": 0.95},
                       points=[point(0.5, 50.0, 0.8), point(0.0, 0.0, 0.95)], stop_point=point(None, 30.0, 0.94))
    ax = visible_axes(plots_compression.plot_accuracy_compression({"bmrs_n": curve}))[0]
    np.testing.assert_allclose(ax.lines[1].get_xydata(), [[0.0, 95.0], [50.0, 80.0]])  # sorted by x
    np.testing.assert_allclose(ax.lines[2].get_xydata(), [[30.0, 94.0]])
    assert ax.lines[0].get_ydata()[0] == pytest.approx(95.0)


def test_kept_width_bars_and_counts():
    fig = plots_compression.plot_kept_width({"a.theta": (3, 10), "b.theta": (7, 7)})
    assert_labelled(fig)
    ax = visible_axes(fig)[0]
    assert len(ax.patches) == 4
    assert [p.get_height() for p in ax.patches] == [10, 7, 3, 7]
    assert [t.get_text() for t in ax.texts] == ["3/10", "7/7"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    _, guide = mixed_guide()
    reds = fake_reductions(guide)
    ax = visible_axes(plots_compression.plot_kept_width(reds))[0]
    assert len(ax.patches) == len(SITES) * (1 + len(reds))
    assert legend_texts(ax) == ["total", "bmrs_n", "bmrs_u", "snr"]
    with pytest.raises(ValueError, match="kept <= total"):
        plots_compression.plot_kept_width({"a": (5, 3)})


# ---------------------------------------------------------------- report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits):
    """A run folder as `bmrs run` writes it: a tiny model trained briefly, then reduced."""
    import pyro

    from bmrs_pyro.pruner import reduce

    pyro.clear_param_store()
    (xtr, ytr), (xte, yte) = digits
    model, guide = make_model()
    history = fit(model, guide, (xtr[:400], ytr[:400]), epochs=2, batch_size=100, lr=1e-2, progress=False)
    for site in SITES:  # as if training had driven some structures to the lower bound
        loc, scale = (t.detach().clone() for t in guide.loc_scale(site))
        loc[:3], scale[:3] = -18.0, 2.0
        set_posterior(guide, site, loc, scale)
    before = evaluate(model, guide, (xte, yte))
    results = [reduce(model, guide, "bmrs_n"), reduce(model, guide, "snr")]
    idata = to_inference_data(model, guide, num_samples=100, data=(xte[:100], yte[:100]),
                              reduction=results, history=history)
    results[0].apply()
    after = evaluate(model, guide, (xte, yte))
    kept = results[0].kept_per_layer
    total, left = sum(t for _, t in kept.values()), sum(k for k, _ in kept.values())
    metrics = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "nll_before": before["nll"], "nll_after": after["nll"],
        "structures": {"total": total, "kept": left, "removed_pct": 100 * (total - left) / total},
        "layers": [{"site": s, "kept": k, "total": t} for s, (k, t) in kept.items()],
        "parameters": {"before": 1000, "after": 800, "removed_pct": 20.0},
        "flops": {"before": 2000, "after": 1500, "removed_pct": 25.0},
        "elbo": history.elbo, "seconds": 1.25,
    }
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps({"method": "bmrs_n", "model": "mlp", "data": "digits", "epochs": 2}))
    (run / "metrics.json").write_text(json.dumps(metrics))
    idata.to_netcdf(str(run / "inference_data.nc"))
    return run, metrics


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self._row, self._in_layers, self.refs = [], None, False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._in_layers = attrs.get("class") == "layers"
        elif tag == "tr" and self._in_layers:
            self._row = []
        for key in ("src", "href"):
            if key in attrs:
                self.refs.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._in_layers = False

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def _check_report_module():
    spec = importlib.util.spec_from_file_location("check_report", ROOT / "scripts" / "check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_is_one_self_contained_page(run_dir):
    run, metrics = run_dir
    page = build_report(run)
    assert page == run / "report.html"
    text = page.read_text()
    pngs = sorted((run / "figures").glob("*.png"))
    names = {p.stem for p in pngs}
    assert names == {"kept_width", "posterior_forest", "delta_f", "reduction_densities", "e_theta_histograms", "elbo"}
    assert text.count('src="data:image/png;base64,') == len(pngs)
    for png in pngs:  # each saved figure is embedded byte for byte
        assert base64.b64encode(png.read_bytes()).decode() in text
    parser = _Tables()
    parser.feed(text)
    assert all(ref.startswith("data:") for ref in parser.refs), parser.refs
    assert not re.search(r"(?i)(url\(|@import|<link|<script)", text)
    assert parser.rows[0] == ["site", "kept", "total", "removed %", "kept width"]
    body = [row[:4] for row in parser.rows[1:]]
    assert body == [[r["site"], str(r["kept"]), str(r["total"]), f"{100 * (r['total'] - r['kept']) / r['total']:.1f}"]
                    for r in metrics["layers"]]
    assert f"{100 * metrics['accuracy_after']:.2f} %" in text
    assert f"{100 * metrics['accuracy_before']:.2f} %" in text
    for key in ("nll_before", "nll_after"):
        assert f"{metrics[key]:.4g}" in text
    assert "25.00 %" in text and "20.00 %" in text  # FLOPs and parameters removed
    assert "digits" in text and "bmrs_n" in text
    assert _check_report_module().inspect_dom(text)["ok"]


def test_report_adds_curves_and_survives_missing_inference_data(run_dir, tmp_path):
    run, metrics = run_dir
    curve = {"points": [{"structures_removed": p, "parameters_removed": p, "accuracy": 0.9} for p in (0, 50)],
             "stop_point": {"structures_removed": 20, "parameters_removed": 20, "accuracy": 0.9}}
    (run / "curves.json").write_text(json.dumps({"bmrs_n": curve}))
    try:
        build_report(run)
        assert (run / "figures" / "accuracy_compression.png").is_file()
        assert 'alt="accuracy_compression"' in (run / "report.html").read_text()
    finally:
        (run / "curves.json").unlink()
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.json"):
        (bare / name).write_text((run / name).read_text())
    text = build_report(bare).read_text()
    assert {p.stem for p in (bare / "figures").glob("*.png")} == {"kept_width", "elbo"}
    assert "inference_data.nc was not found" in text


def test_report_errors_name_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        build_report(tmp_path)
    (tmp_path / "metrics.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_report(tmp_path)


def test_save_figures_and_render_from_idata_alone(tmp_path, run_dir):
    import arviz as az

    run, _ = run_dir
    idata = az.from_netcdf(str(run / "inference_data.nc"))
    figures = render_figures(idata)
    assert list(figures) == ["kept_width", "posterior_forest", "delta_f", "reduction_densities",
                             "e_theta_histograms", "elbo"]
    paths = save_figures(figures, tmp_path / "figs", dpi=50)
    for name, path in paths.items():
        assert path == tmp_path / "figs" / f"{name}.png" and path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="plain file name"):
        save_figures({"a/b": figures["elbo"]}, tmp_path)


def test_a_figure_that_fails_halfway_leaves_the_previous_png(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    out = tmp_path / "figs"
    first = save_figures({"elbo": fig}, out, dpi=30)["elbo"].read_bytes()

    def broken(self, target, **kwargs):
        target.write(b"\x89PNG half")  # bytes reach the target, then the renderer fails
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(type(fig), "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        save_figures({"elbo": fig}, out, dpi=30)
    assert (out / "elbo.png").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["elbo.png"]  # no temporary left behind
    plt.close(fig)


def test_dom_check_flags_external_and_broken_images():
    check = _check_report_module()
    good = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (3).to_bytes(4, "big") + (2).to_bytes(4, "big")).decode()
    ok = check.inspect_dom(f'<img src="data:image/png;base64,{good}"><a href="#top">x</a>')
    assert ok["ok"] and ok["image_details"][0]["width"] == 3 and ok["image_details"][0]["height"] == 2
    assert not check.inspect_dom('<img src="https://example.org/a.png">')["ok"]
    assert not check.inspect_dom('<img src="data:image/png;base64,AAAA">')["ok"]
    bad = check.inspect_dom(f'<img src="data:image/png;base64,{good}"><link href="http://x/s.css">')
    assert not bad["ok"] and bad["external_refs"] == ["<link href=http://x/s.css>"]
    assert not check.inspect_dom("<p>no images</p>")["ok"]


def test_report_says_what_was_removed_and_why(run_dir, tmp_path):
    from bmrs_pyro.analysis.report import decision_sentence
    from bmrs_pyro.run_summary import decision_summary

    run, metrics = run_dir
    base = {"structures": {"total": 200, "kept": 36, "removed_pct": 82.0}, "method": "bmrs_n",
            "decision": {"method": "bmrs_n", "rule": "prune where dF >= -1 nat", "margin": 1.0,
                         "tie_band": {"band": [-1.0, 0.0], "count": 170, "removed": 164}}}
    text = decision_sentence(base)
    assert text.startswith("bmrs_n removed 164 of 200 structures (82.0 %) by the rule: prune where dF >= -1 nat")
    assert "164 of them lie in the tie band [-1, 0)" in text and "less than 1 nat of evidence" in text
    nothing = dict(base, structures={"total": 200, "kept": 200, "removed_pct": 0.0})
    assert "removed nothing: every structure has dF < -1" in decision_sentence(nothing)
    assert "unpruned baseline" in decision_sentence(dict(nothing, decision={"method": "none", "rule": "keep"}))
    # in the page, for a real reduction of the run folder's model
    metrics = dict(metrics, decision={"method": "bmrs_n", "rule": "prune where dF >= -1 nat", "margin": 1.0,
                                      "tie_band": {"band": [-1.0, 0.0], "count": 1, "removed": 1}},
                   seconds=2.5, seconds_total=40.0, epochs={"train": 2, "finetune": 0, "resumed_from": 1})
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    page = build_report(folder).read_text()
    assert f'<p class="decision">{html.escape(decision_sentence(metrics))}</p>' in page
    # the run-time card counts the whole run, not only the resumed invocation
    assert "40.0 s" in page and "this invocation 2.5 s, resumed at epoch 1" in page


def test_layers_keep_network_order_through_netcdf(tmp_path):
    """Twelve-module backbones have sites net.2 ... net.11: stored JSON sorts them as text."""
    from bmrs_pyro.analysis import to_inference_data
    from bmrs_pyro.analysis.sources import posteriors
    from bmrs_pyro.analysis.sources import reductions_from_idata, site_table
    from bmrs_pyro.guides import AutoTruncatedLogNormal
    from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier
    from bmrs_pyro.pruner import reduce

    import arviz as az

    layers, width = [torch.nn.Flatten()], 64
    for w in (5, 4, 3, 6):
        layers += [torch.nn.Linear(width, w), torch.nn.Tanh(), MultiplicativeNoise(w)]
        width = w
    model = NoisyClassifier(torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)))
    guide = AutoTruncatedLogNormal(model)
    guide(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    order = list(guide.site_names)
    assert order == ["net.3.theta", "net.6.theta", "net.9.theta", "net.12.theta"]
    assert sorted(order) != order  # text order would differ
    path = tmp_path / "idata.nc"
    to_inference_data(model, guide, num_samples=5, reduction=reduce(model, guide, "bmrs_n")).to_netcdf(str(path))
    idata = az.from_netcdf(str(path))
    assert [m["site"] for m in site_table(idata).values()] == order
    assert list(posteriors(idata)) == order
    assert list(next(iter(reductions_from_idata(idata).values())).keep) == order


def test_density_legends_are_readable():
    _, guide = mixed_guide()
    fig = plots.plot_reduction_densities(guide, SITES[0], [0, 5, 11])
    for ax in visible_axes(fig):
        assert all(t.get_fontsize() >= 9 for t in ax.get_legend().get_texts())


def test_elbo_figure_puts_the_warm_start_first():
    history = History(elbo=[-90.0, -60.0, -50.0, -45.0, -44.0, -43.0], warm_start=[-80.0, -40.0, -30.0, -25.0],
                      events=[{"epoch": 3, "event": "warm_start_end", "epochs": 4},
                              {"epoch": 7, "event": "prune", "method": "bmrs_n", "fraction_removed": 0.5}])
    fig = plots_training.plot_elbo(history)
    ax = fig.axes[0]
    elbo_line, warm_line = ax.lines[0], ax.lines[1]
    assert list(elbo_line.get_xdata()) == [5, 6, 7, 8, 9, 10]  # after the 4 warm-start epochs
    assert list(warm_line.get_xdata()) == [1, 2, 3, 4] and list(warm_line.get_ydata()) == history.warm_start
    assert "warm start" in [t.get_text() for t in ax.texts]
    assert list(fig.axes[1].lines[1].get_xdata()) == [8]  # the reduction after epoch index 7


def test_accuracy_compression_band_is_the_mean_over_seeds():
    """band=True (what `bmrs compare` draws): the line is the mean of the seeds' curves on a grid,
    the band +- their sd, the star the mean stopping point."""
    rec = lambda acc, stop_acc: {"unpruned_accuracy": acc[0], "stop": {"structures_removed": 50.0,
                                 "parameters_removed": 50.0, "accuracy": stop_acc},
                                 "curve": [{"structures_removed": s, "parameters_removed": s, "accuracy": a}
                                           for s, a in zip((0.0, 50.0, 100.0), acc)]}
    fig = plots_compression.plot_accuracy_compression(
        {"bmrs_n": [rec((0.9, 0.8, 0.1), 0.82), rec((0.9, 0.6, 0.3), 0.78)]}, x="structures", band=True)
    top = fig.axes[0]
    xy = top.lines[0].get_xydata()
    at = lambda v: xy[np.argmin(abs(xy[:, 0] - v)), 1]
    assert at(0.0) == pytest.approx(90.0) and at(50.0) == pytest.approx(70.0) and at(100.0) == pytest.approx(20.0)
    assert at(25.0) == pytest.approx((85.0 + 75.0) / 2)  # linear interpolation per seed, then the mean
    star = [line for line in top.lines if line.get_marker() == "*"][0]
    np.testing.assert_allclose(star.get_xydata(), [[50.0, 80.0]])
    with pytest.raises(ValueError, match="x must be"):
        plots_compression.plot_accuracy_compression({"bmrs_n": [rec((0.9, 0.8, 0.1), 0.8)]}, x="flops", band=True)
