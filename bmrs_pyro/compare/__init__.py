"""``bmrs compare``: every pruning method over several seeds on one network and data set.

Four parts: :mod:`.config` (settings, names, data), :mod:`.execution` (tasks, process pool,
resuming), :mod:`.summaries` (the table, knee, widths, the folder's files) and :mod:`.plots`
(the figures); the command-line options live in :mod:`bmrs_pyro.cli`.

:func:`run_compare` trains and prunes with each chosen method of
:data:`bmrs_pyro.baselines.METHODS` for seeds ``0 .. K-1`` (seed ``s`` also draws the
train/validation split, so every method sees the same splits for a seed) and writes
``<output>/<name>/``:

- ``curves.json``: the settings and, per method and seed, the curve points, the stopping point,
  the compaction at the stopping point and the wall time (:func:`record_of`);
- ``accuracy_structures.png`` and ``accuracy_parameters.png``: accuracy against % structures /
  % parameters removed, the mean curve per method with a band of +- 1 sd over seeds, each
  method's own stopping point as a star (:func:`plot_curves`);
- ``results.csv`` and ``results.md``: the table of :func:`summary_rows` (mean +- sd over seeds);
- ``widths.md``: kept structures per layer at each method's stopping point, beside the true width
  when the data set knows it (teacher-student).

The multiplicative-noise criteria (BMRS_N and its reference-code variant, BMRS_U-8, BMRS_U-4, SNR,
E[theta], L2) share one procedure that starts with the same SVI fit; :func:`iter_noise_methods` fits once per seed and
sweeps every criterion from that fit, which gives the same results as running each method on its
own (tested) at a fraction of the time. The wall time of each such method still counts the whole
fit plus its own sweep: what it would cost alone.

Table quantities (:func:`summary_rows`), all per seed, then mean and sd over seeds:

- ``within_1pt``: the largest % structures (and, separately, % parameters) removed among the
  method's curve points and stopping point whose *test* accuracy is within 1 point of that seed's
  unpruned test accuracy (:func:`compression_within`). It picks points with the test set, so it
  is an oracle budget for comparison, not something a method could choose by itself.
- ``stop``: the method's own stopping point (its rule); methods without one (E[theta], L2) show
  blanks.
- ``knee``: Kneedle (Satopaa et al. 2011, package ``kneed``) on accuracy against % parameters
  removed (:func:`knee_point`); seeds where it finds none are left out and counted.
- parameters and FLOPs of the compacted network at the stopping point
  (:func:`bmrs_pyro.compaction.compression_stats` on one example, so FLOPs are per example;
  where compaction does not apply, :func:`bmrs_pyro.curves.count_parameters` counts the
  parameters and FLOPs stay blank; the ``compacted`` column says which).
"""

from .config import (
    QUICK_BUDGET,
    CURVES_FILE,
    FIGURES,
    KNEE_SETTINGS,
    PARTIAL_FILE,
    RESULTS_CSV,
    RESULTS_MD,
    TOLERANCE,
    WIDTHS_MD,
    CompareConfig,
    check_config,
    resolve_methods,
)
from .execution import compaction_at_stop, iter_noise_methods, record_of, run_compare, run_many
from .plots import plot_curves
from .summaries import (
    COLUMNS,
    compression_within,
    format_markdown,
    format_widths,
    kept_width_rows,
    knee_point,
    load_comparison,
    per_seed_values,
    summary_rows,
    write_outputs,
)

__all__ = [
    "COLUMNS",
    "CURVES_FILE",
    "CompareConfig",
    "QUICK_BUDGET",
    "FIGURES",
    "KNEE_SETTINGS",
    "PARTIAL_FILE",
    "RESULTS_CSV",
    "RESULTS_MD",
    "TOLERANCE",
    "WIDTHS_MD",
    "check_config",
    "compaction_at_stop",
    "compression_within",
    "format_markdown",
    "format_widths",
    "iter_noise_methods",
    "kept_width_rows",
    "knee_point",
    "load_comparison",
    "per_seed_values",
    "plot_curves",
    "record_of",
    "resolve_methods",
    "run_compare",
    "run_many",
    "summary_rows",
    "write_outputs",
]
