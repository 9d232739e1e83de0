"""``bmrs compare`` figures: accuracy against compression, the mean curve per method over seeds
with a band of +- 1 sd and each method's stopping point, drawn by the one accuracy-vs-compression
figure of the package, :func:`bmrs_pyro.analysis.plot_accuracy_compression` (``band=True``)."""

from __future__ import annotations

from typing import Mapping, Sequence

from bmrs_pyro.analysis.plots_compression import plot_accuracy_compression

from ..baselines import METHODS, NoiseCriterionMethod
from .config import FIGURES


def plot_curves(records: Sequence[Mapping], methods: Sequence[str], *, x: str = "parameters", title: str = ""):
    """Accuracy (%) against % ``x`` removed (``"structures"`` or ``"parameters"``) of the
    ``bmrs compare`` records: per method the mean curve over seeds with a +- 1 sd band and its
    stopping point (:func:`bmrs_pyro.analysis.plot_accuracy_compression` with ``band=True``).
    Records with an ``error`` are left out. More than six methods are split into two columns: the
    multiplicative-noise criteria, and the other methods with BMRS_N repeated for reference.
    Returns a Figure."""
    if x not in FIGURES:
        raise ValueError(f"x must be one of {tuple(FIGURES)}, got {x!r}")
    present = [m for m in methods if any(r["method"] == m and "error" not in r for r in records)]
    noise = [m for m in present if isinstance(METHODS.get(m), NoiseCriterionMethod)]
    others = [m for m in present if m not in noise]
    ref = None
    if len(present) > 6 and noise and others:
        ref = "bmrs_n" if "bmrs_n" in noise else noise[0]
        panels = [("multiplicative-noise criteria", noise), (f"other methods ({ref} for reference)", [ref] + others)]
    else:
        panels = [("", present)]
    per_method = {m: [r for r in records if r["method"] == m and "error" not in r] for m in present}
    return plot_accuracy_compression(per_method, x=x, band=True, panels=panels, reference=ref, title=title)
