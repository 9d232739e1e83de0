"""Diagnostics of a pruning run: ArviZ conversion, figures and a self-contained HTML report.

- :func:`to_inference_data`: posterior draws of every noise site, per-structure summaries, the
  decisions (dF / scores and keep masks) of one or more reductions, held-out pointwise log
  likelihood and the ELBO history, as :class:`arviz.InferenceData` (round-trips through netCDF).
- :func:`compare_pruned`: ``az.compare`` of the unpruned and pruned networks.
- :mod:`.plots`: the figures; :func:`build_report`: the report of a run folder.
"""

from .inference_data import compare_pruned, pointwise_log_likelihood, posterior_draws, to_inference_data
from .plots import plot_delta_f, plot_e_theta_histograms, plot_posterior_forest, plot_reduction_densities
from .plots_compression import plot_accuracy_compression, plot_kept_width
from .plots_training import plot_elbo
from .report import build_report, render_figures, save_figures
from .sources import (
    SavedReduction,
    history_from_idata,
    masks_from_idata,
    posteriors_from_idata,
    reductions_from_idata,
    summaries_from_idata,
)

__all__ = [
    "SavedReduction",
    "build_report",
    "compare_pruned",
    "history_from_idata",
    "masks_from_idata",
    "plot_accuracy_compression",
    "plot_delta_f",
    "plot_e_theta_histograms",
    "plot_elbo",
    "plot_kept_width",
    "plot_posterior_forest",
    "plot_reduction_densities",
    "pointwise_log_likelihood",
    "posterior_draws",
    "posteriors_from_idata",
    "reductions_from_idata",
    "render_figures",
    "save_figures",
    "summaries_from_idata",
    "to_inference_data",
]
