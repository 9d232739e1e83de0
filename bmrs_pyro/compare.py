"""``bmrs compare``: every pruning method over several seeds on one network and data set.

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

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyro
import torch

from .checks import check_int
from .atomic_io import atomic_write_json, atomic_write_text
from .baselines import METHODS, MethodResult, NoiseCriterionMethod, get_method
from .baselines.common import Budget, Point, seed_all
from .guides import AutoTruncatedLogNormal
from .nn import noise_modules

__all__ = [
    "COLUMNS",
    "CompareConfig",
    "DESCRIPTION",
    "EPILOG",
    "TOLERANCE",
    "KNEE_SETTINGS",
    "add_arguments",
    "check_config",
    "cmd_compare",
    "compaction_at_stop",
    "compression_within",
    "config_from_args",
    "format_markdown",
    "format_widths",
    "iter_noise_methods",
    "knee_point",
    "kept_width_rows",
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

#: Accuracy loss (points, i.e. percent) allowed for the "compression at <= 1 point" columns.
TOLERANCE = 1.0

#: Kneedle settings: accuracy falls as compression grows and bends down (concave, decreasing);
#: S = 1 is the sensitivity recommended by Satopaa et al.; the curve is used as measured
#: (interp1d, no smoothing); online=True so that kneed reports every candidate knee, of which
#: :func:`knee_point` keeps the most pronounced. (kneed's offline mode returns the first candidate
#: it meets, and on a falling curve it scans from the right: with a flat floor after the collapse
#: that is the bottom corner, not the top one.)
KNEE_SETTINGS: dict[str, Any] = {"S": 1.0, "curve": "concave", "direction": "decreasing",
                                 "interp_method": "interp1d", "online": True}

CURVES_FILE = "curves.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
WIDTHS_MD = "widths.md"
#: Records of the finished (method, seed) tasks of a comparison that has not ended yet, one JSON
#: object a line after a header line with the settings; a re-run with the same settings skips them.
PARTIAL_FILE = "partial.jsonl"
FIGURES = {"structures": "accuracy_structures.png", "parameters": "accuracy_parameters.png"}

# Budgets of --quick: a smoke test that runs in seconds, not a comparison.
_QUICK = {"epochs": 2, "finetune_epochs": 1, "rounds": 2, "round_epochs": 1, "fraction_step": 0.25,
          "subset": 400}


# ---------------------------------------------------------------------------------- settings


@dataclass
class CompareConfig:
    """Every setting of one comparison.

    ``methods``: registry names (:func:`resolve_methods`); ``seeds``: K, seeds 0..K-1;
    ``epochs`` .. ``lr``: the :class:`~bmrs_pyro.baselines.Budget` every method gets;
    ``fraction_step``: grid of the swept methods (noise criteria, RNI); ``warm_start``: share of
    ``epochs`` the noise criteria train deterministically before SVI (None: their default,
    :data:`bmrs_pyro.infer.WARM_START_FRACTION`; counted inside ``epochs``); ``hidden`` and
    ``activation``: the mlp's; ``data_options``: passed to :func:`bmrs_pyro.data.load`
    (e.g. ``{"subset": 500}``); ``workers``: processes run in parallel (each with ``threads`` torch
    threads); ``overwrite``: replace an existing comparison folder.
    """

    data: str = "digits"
    model: str = "mlp"
    methods: tuple[str, ...] = ()
    seeds: int = 3
    # The budget's defaults are the baselines' Budget defaults, not a copy of them.
    epochs: int = Budget.epochs
    finetune_epochs: int = Budget.finetune_epochs
    rounds: int = Budget.rounds
    round_epochs: int = Budget.round_epochs
    batch_size: int = Budget.batch_size
    lr: Optional[float] = Budget.lr
    fraction_step: float = 0.1
    warm_start: Optional[float] = None
    hidden: Optional[tuple[int, ...]] = (100, 100)
    activation: str = "tanh"
    data_options: dict = field(default_factory=dict)
    output: str = "compare"
    name: Optional[str] = None
    workers: int = 1
    threads: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.methods = tuple(resolve_methods(self.methods or "all"))
        if self.model != "mlp":
            self.hidden = None
        elif self.hidden is not None:
            self.hidden = tuple(int(h) for h in self.hidden)
        if self.name is None:
            self.name = f"{self.data}-{self.model}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        for key in ("seeds", "workers", "threads"):
            value = getattr(self, key)
            check_int(key, value, minimum=1)
        if not 0 < self.fraction_step <= 1:
            raise ValueError(f"fraction_step must be in (0, 1], got {self.fraction_step!r}")
        if self.warm_start is not None and (isinstance(self.warm_start, bool)
                                            or not isinstance(self.warm_start, (int, float))
                                            or not 0 <= self.warm_start < 1):
            raise ValueError(f"warm_start must be a share of the epochs in [0, 1) or None, got {self.warm_start!r}")
        self.budget()  # validates epochs, rounds, batch size and lr

    def budget(self) -> Budget:
        """The :class:`~bmrs_pyro.baselines.Budget` of every method."""
        return Budget(epochs=self.epochs, finetune_epochs=self.finetune_epochs, rounds=self.rounds,
                      round_epochs=self.round_epochs, batch_size=self.batch_size, lr=self.lr)

    def model_kwargs(self) -> dict:
        """Keyword arguments of :func:`bmrs_pyro.models.build` beyond shape and classes."""
        return {"hidden": self.hidden, "activation": self.activation} if self.model == "mlp" else {}

    def method_options(self, name: str) -> dict:
        """The options this comparison passes to method ``name`` (the sweep grid and the warm start
        where it has them)."""
        defaults = get_method(name).defaults
        options = {"fraction_step": self.fraction_step} if "fraction_step" in defaults else {}
        if self.warm_start is not None and "warm_start" in defaults:
            options["warm_start"] = float(self.warm_start)
        return options

    def to_dict(self) -> dict:
        """JSON-friendly settings."""
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["hidden"] = None if self.hidden is None else list(self.hidden)
        return d


def resolve_methods(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, ``"m1,m2"`` or a list of names -> registry names in the given order.

    Raises ValueError naming the valid methods for an unknown or empty selection.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        what = f"unknown method(s) {', '.join(unknown)}" if unknown else "no method given"
        raise ValueError(f"{what}; valid methods: all, {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


_DATA_CACHE: dict[str, Any] = {}


def _load_data(config: CompareConfig, seed: int):
    # Cached per process: MNIST-1D takes seconds to generate and a worker runs many tasks of a seed.
    from .data import load

    key = json.dumps([config.data, seed, config.data_options], sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) > 16:
            _DATA_CACHE.clear()
        _DATA_CACHE[key] = load(config.data, seed=seed, **config.data_options)
    return _DATA_CACHE[key]


def _builder(config: CompareConfig, data) -> Callable[[], torch.nn.Module]:
    from bmrs_pyro.models.registry import build

    kwargs = config.model_kwargs()
    return lambda: build(config.model, data.input_shape, data.num_classes, **kwargs)


def check_config(config: CompareConfig) -> None:
    """Load the data of seed 0 and build the model once, so bad names fail before any training."""
    from bmrs_pyro.models import MODELS

    from .data import DATASETS

    if config.data not in DATASETS:
        raise ValueError(f"unknown data set {config.data!r}; valid data sets: {', '.join(DATASETS)}")
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; valid models: {', '.join(MODELS)}")
    data = _load_data(config, 0)
    model = _builder(config, data)()
    if not noise_modules(model):
        raise ValueError(f"model {config.model!r} has no noise layer: nothing to prune")


# ------------------------------------------------------------------- the shared-fit noise criteria


def iter_noise_methods(names: Sequence[str], model_builder: Callable[[], torch.nn.Module], data, *, seed: int = 0,
                       budget: Budget | Mapping | None = None,
                       options: Optional[Mapping[str, Mapping]] = None) -> Iterator[MethodResult]:
    """Run several multiplicative-noise criteria from ONE SVI fit; yield a result per method.

    Each result equals ``METHODS[name].run(model_builder, data, seed=seed, budget=budget,
    **options[name])`` (the procedure of :class:`~bmrs_pyro.baselines.NoiseCriterionMethod`),
    but the fit is shared: every method's sweep starts from the same trained snapshot. The
    methods share one model, so use each yielded ``result.model`` (pruned at its stopping point)
    before asking for the next one. ``wall_time`` = fit + that method's own sweep.

    Raises ValueError if a name is not a noise criterion, or the methods would train differently
    (learning rate, ``kl_weight``, ``guide_lr`` or ``warm_start``).
    """
    methods = [get_method(n) for n in names]
    for m in methods:
        if not isinstance(m, NoiseCriterionMethod):
            raise ValueError(f"{m.name} is not a multiplicative-noise criterion; run it with METHODS[{m.name!r}].run")
    budget = Budget.coerce(budget)
    opts = {m.name: m.check_options(dict((options or {}).get(m.name, {}))) for m in methods}
    training = {(budget.lr_or(m.lr), float(opts[m.name]["kl_weight"]), float(opts[m.name]["guide_lr"]),
                 float(opts[m.name]["warm_start"])) for m in methods}
    if len(training) > 1:
        raise ValueError(f"the methods train with different (lr, kl_weight, guide_lr, warm_start) {sorted(training)}; "
                         "run them apart")
    start = time.perf_counter()
    with pyro.get_param_store().scope():
        seed_all(seed)
        fitted = methods[0].fit_noise_model(model_builder, data, seed, budget, opts[methods[0].name])
        fit_time = time.perf_counter() - start
        for method in methods:
            t0 = time.perf_counter()
            result = method.sweep(fitted, data, seed, budget, opts[method.name])
            result.info.update({"options": dict(opts[method.name]), "budget": asdict(budget), "shared_fit": True})
            result.wall_time = fit_time + time.perf_counter() - t0
            yield result


# --------------------------------------------------------------------------------- one record


def compaction_at_stop(result: MethodResult, x: torch.Tensor) -> Optional[dict]:
    """Parameters and FLOPs (per example) of ``result.model`` compacted at its stopping point.

    ``how`` is ``"compaction"`` (:func:`bmrs_pyro.compaction.compression_stats`) or, where that
    fails, ``"count_parameters"`` (:func:`bmrs_pyro.curves.count_parameters`, FLOPs None) with
    the reason. None when the method has no stopping point.
    """
    if result.stop is None:
        return None
    from .compaction import compression_stats
    from .curves import count_parameters

    guide = result.guide if isinstance(result.guide, AutoTruncatedLogNormal) else None
    model = result.model
    was_training = model.training
    model.eval()
    try:
        stats = compression_stats(model, guide, example_input=x[:1])
        return {"how": "compaction", "params_before": stats["params_before"], "params_after": stats["params_after"],
                "flops_before": stats["flops_before"], "flops_after": stats["flops_after"],
                "max_abs_diff": stats["max_abs_diff"]}
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as err:
        kept, total = count_parameters(model, inputs=((x[:2],), {}))
        return {"how": "count_parameters", "params_before": total, "params_after": kept, "flops_before": None,
                "flops_after": None, "reason": f"{type(err).__name__}: {err}"}
    finally:
        model.train(was_training)


def _point(p: Point) -> dict:
    return {"structures_removed": float(p.structures_removed), "parameters_removed": float(p.parameters_removed),
            "accuracy": float(p.accuracy), "val_accuracy": None if p.val_accuracy is None else float(p.val_accuracy),
            "step": p.step if isinstance(p.step, (int, float)) or p.step is None else str(p.step),
            "kept_per_layer": {k: [int(v[0]), int(v[1])] for k, v in p.kept_per_layer.items()}}


def record_of(result: MethodResult, seed: int, x: torch.Tensor) -> dict:
    """The JSON record of one method x seed: curve, stop, compaction at the stop, wall time.

    The removed indices and method internals (importances, ELBO traces) are left out to keep
    ``curves.json`` small.
    """
    return {"method": result.method, "seed": seed, "unpruned_accuracy": float(result.unpruned_accuracy),
            "unpruned_val_accuracy": result.unpruned_val_accuracy, "num_structures": int(result.num_structures),
            "num_parameters": int(result.num_parameters), "wall_time": float(result.wall_time),
            "curve": [_point(p) for p in result.curve],
            "stop": None if result.stop is None else _point(result.stop),
            "compaction": compaction_at_stop(result, x)}


# ------------------------------------------------------------------------------- running


def _tasks(config: CompareConfig) -> list[tuple[tuple[str, ...], int]]:
    """(methods, seed) units of work: the noise criteria of a seed together, the others alone."""
    noise = tuple(m for m in config.methods if isinstance(METHODS[m], NoiseCriterionMethod))
    others = [m for m in config.methods if m not in noise]
    tasks = []
    for seed in range(config.seeds):
        if noise:
            tasks.append((noise, seed))
        tasks += [((m,), seed) for m in others]
    return tasks


def _run_task(config: CompareConfig, methods: tuple[str, ...], seed: int) -> list[dict]:
    """Records of ``methods`` at ``seed``; a method that raises gives an ``error`` record instead
    (so one diverged run does not lose an hour of others)."""
    torch.set_num_threads(config.threads)
    data = _load_data(config, seed)
    builder = _builder(config, data)
    budget = config.budget()
    x = data.train[0]
    records: list[dict] = []
    try:
        if isinstance(METHODS[methods[0]], NoiseCriterionMethod):
            options = {m: config.method_options(m) for m in methods}
            for r in iter_noise_methods(methods, builder, data, seed=seed, budget=budget, options=options):
                records.append(record_of(r, seed, x))
        else:
            name = methods[0]
            result = METHODS[name].run(builder, data, seed=seed, budget=budget, **config.method_options(name))
            records.append(record_of(result, seed, x))
    except (ValueError, RuntimeError, ArithmeticError, NotImplementedError) as err:
        done = {r["method"] for r in records}
        records += [{"method": m, "seed": seed, "error": f"{type(err).__name__}: {err}"}
                    for m in methods if m not in done]
    return records


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _cost(config: CompareConfig, methods: tuple[str, ...]) -> float:
    """Rough work of a task in example-epochs, to start the longest tasks first."""
    n = len(_load_data(config, 0).train[1]) * (3 if config.model != "mlp" else 1)
    if isinstance(METHODS[methods[0]], NoiseCriterionMethod):
        points = math.floor(1 / config.fraction_step) + 2  # the grid, the guard point and the stop
        return n * (config.epochs + len(methods) * points * max(config.finetune_epochs, 0.3))
    # SVI over Bayesian weights costs several times a deterministic epoch.
    return n * (config.epochs + config.rounds * config.round_epochs) * (8 if methods[0] == "self_compression" else 1)


def run_compare(config: CompareConfig, *, progress: bool = True, write: bool = True) -> dict:
    """Run every method of ``config`` over its seeds; write the outputs (unless ``write=False``).

    Returns ``{"config", "records", "rows", "dir", "teacher_width"}``: the settings, one
    :func:`record_of` per method x seed, the :func:`summary_rows`, the output folder (None
    without ``write``) and the data set's true width where it has one.
    """
    return run_many([config], workers=config.workers, progress=progress, write=write)[0]


def run_many(configs: Sequence[CompareConfig], *, workers: int = 1, progress: bool = True, write: bool = True,
             on_result: Optional[Callable[[CompareConfig, list], None]] = None) -> list[dict]:
    """:func:`run_compare` for several comparisons sharing one pool of ``workers`` processes.

    Every (methods, seed) task of every config goes into one queue, longest first, so no worker
    idles at the end of one comparison while the next waits. ``on_result(config, records)`` is
    called as each task finishes (e.g. to log). Returns one result dict per config, in order.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    for config in configs:
        check_config(config)
    from .runlock import RunLock

    locks: list = []
    try:
        dirs = [_prepare_dir(c) if write else None for c in configs]
        for d in dirs:
            if d is not None:
                locks.append(RunLock(d, "compare").acquire())  # one writer per comparison folder
        found: list[list[dict]] = [_resume_records(d, c) if d is not None else [] for c, d in zip(configs, dirs)]
        return _run_jobs(configs, dirs, found, workers=workers, progress=progress, write=write, on_result=on_result)
    finally:
        for lock in locks:
            lock.release()


def _task_done(records: Sequence[Mapping], methods: Sequence[str], seed: int) -> bool:
    ok = {(r["method"], r["seed"]) for r in records if "error" not in r}
    return all((m, seed) in ok for m in methods)


def _run_jobs(configs: Sequence[CompareConfig], dirs: list, found: list[list[dict]], *, workers: int, progress: bool,
              write: bool, on_result) -> list[dict]:
    jobs = [(i, m, s) for i, c in enumerate(configs) for m, s in _tasks(c) if not _task_done(found[i], m, s)]
    # Records of a task that is run again (it failed before) are replaced by the new ones.
    for i, m, s in jobs:
        found[i] = [r for r in found[i] if not (r["seed"] == s and r["method"] in m)]
    journals = [open(d / PARTIAL_FILE, "a", encoding="utf-8") if d is not None else None for d in dirs]
    from tqdm.auto import tqdm

    label = configs[0].name if len(configs) == 1 else f"{len(configs)} comparisons"
    bar = tqdm(total=sum(len(m) for _, m, _ in jobs), disable=not progress, desc=f"compare {label}", unit="run")

    def done(i: int, got: list) -> None:
        found[i] += got
        journal = journals[i]
        if journal is not None:  # kept on disk at once: an interrupted comparison resumes from here
            for record in got:
                journal.write(json.dumps(record, default=_json_value) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        bar.update(len(got))
        if on_result is not None:
            on_result(configs[i], got)

    try:
        if workers == 1:
            for i, methods, seed in jobs:
                bar.set_postfix_str(f"{'+'.join(methods)} seed {seed}")
                done(i, _run_task(configs[i], methods, seed))
        else:
            # spawn: a forked child would inherit the parent's torch thread pools and Pyro state.
            ctx = multiprocessing.get_context("spawn")
            order = sorted(jobs, key=lambda j: -_cost(configs[j[0]], j[1]))
            threads = max(c.threads for c in configs)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
                futures = {pool.submit(_run_task, configs[i], m, s): i for i, m, s in order}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
    finally:
        bar.close()
        for journal in journals:
            if journal is not None:
                journal.close()
    outs = []
    for config, records, run_dir in zip(configs, found, dirs):
        rank = {m: i for i, m in enumerate(config.methods)}
        records.sort(key=lambda r: (rank[r["method"]], r["seed"]))
        out = {"config": config.to_dict(), "records": records, "rows": summary_rows(records, config.methods),
               "dir": run_dir, "teacher_width": _load_data(config, 0).info.get("teacher_width")}
        if write:
            write_outputs(run_dir, out)
            (run_dir / PARTIAL_FILE).unlink(missing_ok=True)  # curves.json now holds every record
        outs.append(out)
    return outs


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _settings_key(config: CompareConfig) -> str:
    """The settings that decide the records (not where they go or how many processes run them)."""
    d = config.to_dict()
    for key in ("output", "name", "workers", "threads", "overwrite"):
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


def _resume_records(run_dir: Path, config: CompareConfig) -> list[dict]:
    """Records of an interrupted comparison in ``run_dir`` with the same settings (else [])."""
    path = run_dir / PARTIAL_FILE
    key = _settings_key(config)
    if path.is_file() and not config.overwrite:
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if lines and header.get("settings") != key:
            raise ValueError(f"{run_dir} holds an unfinished comparison with other settings; run it with the same "
                             "options to continue it, pass --overwrite to start over, or pick another --name")
        records = []
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption: that task runs again
        if records or lines:
            return records

    atomic_write_text(path, json.dumps({"settings": key}) + "\n")
    return []


def _prepare_dir(config: CompareConfig) -> Path:
    run_dir = Path(config.output) / str(config.name)
    if (run_dir / CURVES_FILE).exists() and not config.overwrite:
        raise ValueError(f"{run_dir} already holds a comparison; pick another --name or pass --overwrite")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write {run_dir}: {err.strerror or err}; pick another --output") from None
    return run_dir


# ------------------------------------------------------------------------------- the metrics


def compression_within(points: Sequence[Mapping], unpruned_accuracy: float,
                       tolerance: float = TOLERANCE) -> tuple[float, float]:
    """(largest % structures removed, largest % parameters removed) among ``points`` whose
    accuracy is at most ``tolerance`` points below ``unpruned_accuracy``.

    Accuracies are fractions in [0, 1], ``tolerance`` is in points (percent). The two maxima are
    taken separately; the unpruned network (0, 0) always qualifies.
    """
    s_best = p_best = 0.0
    for pt in points:
        if 100.0 * (unpruned_accuracy - float(pt["accuracy"])) <= tolerance + 1e-9:
            s_best = max(s_best, float(pt["structures_removed"]))
            p_best = max(p_best, float(pt["parameters_removed"]))
    return s_best, p_best


def knee_point(x: Sequence[float], y: Sequence[float]) -> Optional[tuple[float, float]]:
    """The Kneedle knee ``(x, y)`` of a falling accuracy curve, or None if there is none.

    Points are sorted by ``x``; equal ``x`` are merged by their mean ``y``. Of the candidate knees
    kneed reports (:data:`KNEE_SETTINGS`), the most pronounced is returned: the largest value of
    Kneedle's difference curve, which for a concave decreasing curve normalised to the unit square
    is ``y_n + x_n - 1`` (the height above the chord from the first to the last point). Fewer than
    three distinct ``x``, a flat curve or one with no bend give None.
    """
    import warnings

    from kneed import KneeLocator

    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    ux = np.unique(xs)
    if ux.size < 3:
        return None
    uy = np.array([ys[xs == v].mean() for v in ux])
    if np.ptp(uy) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns when it finds no knee; None says so
        kl = KneeLocator(ux, uy, **KNEE_SETTINGS)
    candidates = [float(k) for k in (kl.all_knees or ())]
    if not candidates:
        return None
    xn = (ux - ux[0]) / (ux[-1] - ux[0])
    yn = (uy - uy.min()) / np.ptp(uy)
    height = yn + xn - 1.0
    idx = [int(np.argmin(np.abs(ux - k))) for k in candidates]
    best = max(idx, key=lambda i: height[i])
    return float(ux[best]), float(uy[best])


def _mean_sd(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    v = np.array([float(a) for a in values if a is not None and np.isfinite(a)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


#: Table columns: key, header, format ("pct": accuracy fraction shown in %, "f1": one decimal, "int").
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("unpruned_acc", "unpruned acc %", "pct"),
    ("within_structures", "struct. removed % (<=1pt)", "f1"),
    ("within_parameters", "params removed % (<=1pt)", "f1"),
    ("stop_structures", "stop: struct. removed %", "f1"),
    ("stop_parameters", "stop: params removed %", "f1"),
    ("stop_acc", "stop: acc %", "pct"),
    ("stop_loss", "stop: acc loss (pts)", "f2"),
    ("knee_parameters", "knee: params removed %", "f1"),
    ("knee_acc", "knee: acc %", "pct"),
    ("params_after", "params at stop", "int"),
    ("flops_after", "FLOPs/example at stop", "int"),
    ("wall_time", "wall time s", "f1"),
)


def per_seed_values(record: Mapping) -> dict[str, Optional[float]]:
    """The table quantities of one method x seed record (None where they do not exist)."""
    base = float(record["unpruned_accuracy"])
    stop = record.get("stop")
    points = list(record["curve"]) + ([stop] if stop else [])
    ws, wp = compression_within(points, base)
    curve = record["curve"]
    knee = knee_point([p["parameters_removed"] for p in curve], [p["accuracy"] for p in curve])
    comp = record.get("compaction") or {}
    return {
        "unpruned_acc": base, "within_structures": ws, "within_parameters": wp,
        "stop_structures": stop["structures_removed"] if stop else None,
        "stop_parameters": stop["parameters_removed"] if stop else None,
        "stop_acc": stop["accuracy"] if stop else None,
        "stop_loss": 100.0 * (base - stop["accuracy"]) if stop else None,
        "knee_parameters": knee[0] if knee else None, "knee_acc": knee[1] if knee else None,
        "params_after": comp.get("params_after"), "flops_after": comp.get("flops_after"),
        "wall_time": record.get("wall_time"),
    }


def summary_rows(records: Sequence[Mapping], methods: Optional[Sequence[str]] = None) -> list[dict]:
    """One row per method: ``<key>_mean``, ``<key>_sd``, ``<key>_n`` for every :data:`COLUMNS` key,
    plus ``seeds`` (that ran), ``failed`` (that raised), ``knee_found`` (seeds with a knee) and
    ``compacted`` (how the parameters were counted)."""
    methods = list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for m in methods:
        failed = sum(1 for r in records if r["method"] == m and "error" in r)
        recs = [r for r in records if r["method"] == m and "error" not in r]
        if not recs and not failed:
            continue
        values = [per_seed_values(r) for r in recs]
        row: dict[str, Any] = {"method": m, "seeds": len(recs), "failed": failed}
        for key, _, _ in COLUMNS:
            mean, sd, n = _mean_sd([v[key] for v in values])
            row.update({f"{key}_mean": mean, f"{key}_sd": sd, f"{key}_n": n})
        row["knee_found"] = sum(v["knee_parameters"] is not None for v in values)
        hows = sorted({(r.get("compaction") or {}).get("how") for r in recs} - {None})
        row["compacted"] = "+".join(hows) if hows else ""
        rows.append(row)
    return rows


def _fmt(mean: float, sd: float, kind: str) -> str:
    if not np.isfinite(mean):
        return "-"
    k = 100.0 if kind == "pct" else 1.0
    if kind == "int":
        text = f"{mean:,.0f}"
        return text if not np.isfinite(sd) else f"{text} ± {sd:,.0f}"
    digits = 2 if kind == "f2" else 1
    text = f"{k * mean:.{digits}f}"
    return text if not np.isfinite(sd) else f"{text} ± {k * sd:.{digits}f}"


def format_markdown(rows: Sequence[Mapping]) -> str:
    """The table as GitHub markdown, mean ± sd over seeds (a dash where a method has no value)."""
    head = ["method", "seeds"] + [h for _, h, _ in COLUMNS] + ["knee found", "counted by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['method']}`", str(r["seeds"]) + (f" ({r['failed']} failed)" if r.get("failed") else "")]
        cells += [_fmt(r[f"{k}_mean"], r[f"{k}_sd"], kind) for k, _, kind in COLUMNS]
        cells += [f"{r['knee_found']}/{r['seeds']}", r["compacted"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_text(rows: Sequence[Mapping]) -> str:
    keys = ["method", "seeds", "failed"] + [f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "sd", "n")] + \
        ["knee_found", "compacted"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r.get(k), float) and not np.isfinite(r[k]) else r.get(k, "")) for k in keys})
    return buf.getvalue()


def kept_width_rows(records: Sequence[Mapping], methods: Optional[Sequence[str]] = None) -> list[dict]:
    """Per method, per noise site: kept structures at the stopping point (mean, sd, total, seeds)."""
    methods = list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for m in methods:
        stops = [r["stop"] for r in records if r["method"] == m and r.get("stop")]  # error records have none
        if not stops:
            continue
        for site in stops[0]["kept_per_layer"]:
            kept = [s["kept_per_layer"][site][0] for s in stops]
            mean, sd, n = _mean_sd(kept)
            rows.append({"method": m, "site": site, "kept_mean": mean, "kept_sd": sd,
                         "total": stops[0]["kept_per_layer"][site][1], "seeds": n})
    return rows


def format_widths(rows: Sequence[Mapping], true_width: Optional[int] = None) -> str:
    """Markdown table of :func:`kept_width_rows` (one column per layer), with the true width if known."""
    sites = list(dict.fromkeys(r["site"] for r in rows))
    totals = {r["site"]: r["total"] for r in rows}
    head = ["method"] + [f"{s} (of {totals[s]})" for s in sites]
    lines = []
    if true_width is not None:
        lines.append(f"True width (the teacher's hidden layer): **{true_width}**.\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [f"`{m}`"]
        for s in sites:
            r = next((r for r in rows if r["method"] == m and r["site"] == s), None)
            cells.append("-" if r is None else _fmt(r["kept_mean"], r["kept_sd"], "f1"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the figures


def _styles(group: Sequence[str], reference: Optional[str] = None) -> dict[str, tuple[str, str]]:
    """Colour and line style per method of one panel: distinct colours within the panel (Okabe-Ito,
    yellow last), ``reference`` always blue; past the palette the lines turn dashed."""
    from bmrs_pyro.analysis.palette import METHOD_CYCLE

    blue = METHOD_CYCLE[0]
    free = [c for c in METHOD_CYCLE if c != blue] if reference in group else list(METHOD_CYCLE)
    out, i = {}, 0
    for m in group:
        if m == reference:
            out[m] = (blue, "-")
            continue
        out[m] = (free[i % len(free)], "-" if i < len(free) else "--")
        i += 1
    return out


def _mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over seeds of the curves interpolated on ``grid`` (NaN where fewer than half cover)."""
    rows = []
    for xs, ys in curves:
        ux = np.unique(xs)
        uy = np.array([ys[xs == v].mean() for v in ux])
        row = np.full(grid.shape, np.nan)
        if ux.size == 1:
            row[np.isclose(grid, ux[0], atol=0.26)] = uy[0]
        else:
            inside = (grid >= ux[0]) & (grid <= ux[-1])
            row[inside] = np.interp(grid[inside], ux, uy)
        rows.append(row)
    a = np.array(rows)
    count = np.isfinite(a).sum(0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(a, 0)
            sd = np.nanstd(a, 0)
    enough = count >= max(1, math.ceil(len(curves) / 2))
    mean[~enough] = np.nan
    sd[~enough] = np.nan
    return mean, sd


def plot_curves(records: Sequence[Mapping], methods: Sequence[str], *, x: str = "parameters", title: str = ""):
    """Accuracy (%) against % ``x`` removed (``"structures"`` or ``"parameters"``): per method the
    mean curve over seeds with a +- 1 sd band and its stopping point (mean +- sd, a star with
    error bars; stars at the same place nest, the first method's largest). The top row shows the
    whole range, the bottom row zooms on the top of the curves where the 1-point budget lies.
    More than six methods are split into two columns: the multiplicative-noise criteria, and the
    other methods with BMRS_N repeated for reference. Returns a Figure."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if x not in FIGURES:
        raise ValueError(f"x must be one of {tuple(FIGURES)}, got {x!r}")
    key = f"{x}_removed"
    present = [m for m in methods if any(r["method"] == m and "error" not in r for r in records)]
    noise = [m for m in present if isinstance(METHODS.get(m), NoiseCriterionMethod)]
    others = [m for m in present if m not in noise]
    ref = None
    if len(present) > 6 and noise and others:
        ref = "bmrs_n" if "bmrs_n" in noise else noise[0]
        panels = [("multiplicative-noise criteria", noise), (f"other methods ({ref} for reference)", [ref] + others)]
    else:
        panels = [("", present)]
    fig = Figure(figsize=(6.2 * len(panels), 7.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, height_ratios=[1.0, 1.25])
    grid = np.linspace(0.0, 100.0, 401)
    tops, bases = [], []
    for col, (sub, group) in enumerate(panels):
        styles = _styles(group, ref)
        handles = []
        for j, m in enumerate(group):
            colour, ls = styles[m]
            recs = [r for r in records if r["method"] == m and "error" not in r]
            bases += [100 * r["unpruned_accuracy"] for r in recs]
            curves = [(np.array([p[key] for p in r["curve"]], float),
                       100 * np.array([p["accuracy"] for p in r["curve"]])) for r in recs if r["curve"]]
            mean, sd = _mean_band(curves, grid) if curves else (np.full(grid.shape, np.nan),) * 2
            ok = np.isfinite(mean)
            stops = [r["stop"] for r in recs if r.get("stop")]
            size = max(7.0, 17.0 - 1.6 * j)
            for ax in axes[:, col]:
                if ok.any():
                    ax.plot(grid[ok], mean[ok], color=colour, linestyle=ls, linewidth=1.5)
                    ax.fill_between(grid, mean - sd, mean + sd, where=ok, color=colour, alpha=0.13, linewidth=0)
                if stops:
                    sx = np.array([st[key] for st in stops], float)
                    sy = 100 * np.array([st["accuracy"] for st in stops], float)
                    ax.errorbar([sx.mean()], [sy.mean()], xerr=[sx.std()], yerr=[sy.std()], fmt="*",
                                markersize=size, color=colour, markeredgecolor="black", markeredgewidth=0.6,
                                elinewidth=0.9, capsize=2, zorder=5 + j)
                    tops.append(float(sy.mean()))
            if ok.any():
                tops.append(float(np.nanmax(mean)))
            handles.append(Line2D([], [], color=colour, linestyle=ls, linewidth=1.5, marker="*" if stops else None,
                                  markersize=9, markeredgecolor="black", markeredgewidth=0.5,
                                  label=m if stops else f"{m} (no stop rule)"))
        top, zoom = axes[0, col], axes[1, col]
        top.set_title(sub, fontsize=9)
        top.set_ylim(0, 101)
        zoom.legend(handles=handles, loc="lower left", fontsize=7.5, framealpha=0.92, ncol=2 if len(group) > 4 else 1)
        for ax in (top, zoom):
            ax.set_xlim(-2, 102)
            ax.grid(alpha=0.3)
        zoom.set_xlabel(f"{x} removed (%)")
    if bases and tops:
        hi = max(tops + bases)
        lo = min(bases) - 6.0
        for ax in axes[1, :]:
            ax.set_ylim(lo, hi + 1.0)
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[1, 0].set_ylabel("test accuracy (%), zoomed")
    fig.suptitle(title or f"Accuracy against {x} removed\nmean ± sd over seeds; ★ = own stopping point",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------------------- writing


def write_outputs(run_dir: str | os.PathLike, out: Mapping, *, dpi: int = 80) -> dict[str, Path]:
    """Write ``curves.json``, the two figures, ``results.csv``, ``results.md`` and ``widths.md``."""

    run_dir = Path(run_dir)
    records, rows = out["records"], out["rows"]
    methods = out["config"]["methods"]
    saved = {"config": out["config"], "tolerance_points": TOLERANCE, "knee_settings": KNEE_SETTINGS,
             "teacher_width": out.get("teacher_width"), "records": records}
    if out.get("seconds") is not None:
        saved["seconds"] = out["seconds"]
    paths = {"curves": atomic_write_json(run_dir / CURVES_FILE, saved)}
    title = f"{out['config']['data']} / {out['config']['model']}"
    for x, fname in FIGURES.items():
        fig = plot_curves(records, methods, x=x, title=f"{title}: test accuracy against {x} removed\n"
                                                          f"mean ± sd over {out['config']['seeds']} seed(s); "
                                                          "★ = own stopping point (mean ± sd)")
        path = run_dir / fname
        fig.savefig(path, dpi=dpi)
        paths[x] = path
    paths["csv"] = atomic_write_text(run_dir / RESULTS_CSV, _csv_text(rows))
    paths["md"] = atomic_write_text(run_dir / RESULTS_MD, format_markdown(rows) + "\n")
    paths["widths"] = atomic_write_text(run_dir / WIDTHS_MD, format_widths(kept_width_rows(records, methods),
                                                                           out.get("teacher_width")) + "\n")
    return paths


def load_comparison(run_dir: str | os.PathLike) -> dict:
    """``curves.json`` of a comparison folder, with ``rows`` recomputed."""
    path = Path(run_dir) / CURVES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by `bmrs compare`")
    data = json.loads(path.read_text())
    data["rows"] = summary_rows(data["records"], data["config"]["methods"])
    return data


# ------------------------------------------------------------------------------- command line

DESCRIPTION = ("Run every chosen pruning method over K seeds on the same network and data (seed s draws "
               "the same train/validation split for every method) and write <output>/<name>/: curves.json, "
               "accuracy-against-compression figures, results.csv, results.md and widths.md. Prints the "
               "markdown table.")
EPILOG = """\
examples:
  bmrs compare --quick                                    smoke test: every method, tiny budgets
  bmrs compare --data digits --model mlp --methods bmrs_n,snr,iap --seeds 5
  bmrs compare --data digits --model lenet5 --methods all --seeds 3 --epochs 30 --workers 2
"""


def add_arguments(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options of ``bmrs compare`` (budget options default to None: --quick or the built-in budget)."""
    from bmrs_pyro.models import MODELS

    from .data import DATASETS

    d = CompareConfig.__dataclass_fields__
    # Options whose default depends on others (--quick, the model) are SUPPRESSed: absent from the
    # namespace unless given, and their help states the default itself.
    g = p.add_argument_group("what to compare")
    g.add_argument("--data", choices=DATASETS, default="digits", help="data set")
    g.add_argument("--model", choices=list(MODELS), default="mlp", help="network")
    g.add_argument("--hidden", default=argparse.SUPPRESS,
                   help="hidden widths of the mlp, comma-separated (default: 100,100)")
    g.add_argument("--activation", choices=("tanh", "relu", "gelu", "sigmoid"), default="tanh",
                   help="activation of the mlp")
    g.add_argument("--methods", default="all", help=f"'all' or a comma-separated list of {', '.join(METHODS)}")
    g.add_argument("--seeds", type=int, default=d["seeds"].default, help="number of seeds (0..K-1)")
    g.add_argument("--subset", type=int, default=argparse.SUPPRESS,
                   help="keep this many training + validation examples (default: all; --quick: 400)")
    g = p.add_argument_group("budget (defaults: the built-in budget, or --quick's)")
    g.add_argument("--epochs", type=int, default=argparse.SUPPRESS,
                   help=f"training epochs before pruning ({d['epochs'].default})")
    g.add_argument("--finetune-epochs", type=int, default=argparse.SUPPRESS,
                   help=f"fine-tuning after each one-shot pruning ({d['finetune_epochs'].default})")
    g.add_argument("--rounds", type=int, default=argparse.SUPPRESS,
                   help=f"iterative methods' rounds ({d['rounds'].default})")
    g.add_argument("--round-epochs", type=int, default=argparse.SUPPRESS,
                   help=f"retraining epochs per round ({d['round_epochs'].default})")
    g.add_argument("--fraction-step", type=float, default=argparse.SUPPRESS,
                   help=f"grid step of the swept curves ({d['fraction_step'].default})")
    g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help=f"minibatch size ({d['batch_size'].default})")
    g.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help="learning rate of the weights (default: each method's own)")
    g.add_argument("--warm-start", type=float, default=argparse.SUPPRESS,
                   help="noise criteria: share of --epochs trained deterministically (theta = 1) before SVI, "
                        "counted inside --epochs; 0 = SVI from the start (default: 0.5, the training recipe)")
    g.add_argument("--quick", action="store_true",
                   help=f"tiny budgets for a smoke test: {', '.join(f'{k}={v}' for k, v in _QUICK.items())}")
    g = p.add_argument_group("running and output")
    g.add_argument("--workers", type=int, default=1, help="processes in parallel")
    g.add_argument("--threads", type=int, default=1, help="torch threads per process")
    g.add_argument("--output", default="compare", help="folder that holds comparison folders")
    g.add_argument("--name", default=argparse.SUPPRESS, help="comparison folder name (default: <data>-<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing comparison folder")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """A :class:`CompareConfig` from parsed ``bmrs compare`` arguments."""
    from .runs import parse_hidden

    given = vars(args)
    budget = {k: given[k] for k in ("epochs", "finetune_epochs", "rounds", "round_epochs", "fraction_step",
                                    "batch_size", "lr", "warm_start") if k in given}
    values = dict(_QUICK) if args.quick else {}
    subset = given.get("subset", values.pop("subset", None))
    values.pop("subset", None)
    data_options = {} if subset is None else {"subset": subset}
    values.update(budget)
    if "hidden" in given and args.model != "mlp":
        raise ValueError("--hidden applies to --model mlp only")
    hidden = parse_hidden(given["hidden"]) if "hidden" in given else (100, 100)
    return CompareConfig(data=args.data, model=args.model, methods=tuple(resolve_methods(args.methods)),
                         seeds=args.seeds, hidden=hidden, activation=args.activation, data_options=data_options,
                         output=args.output, name=given.get("name"), workers=args.workers, threads=args.threads,
                         overwrite=args.overwrite, **values)


def cmd_compare(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``bmrs compare``: run, write the folder, print the markdown table; returns the exit code."""
    import sys

    config = config_from_args(args)
    start = time.perf_counter()
    try:
        out = run_compare(config, progress=not args.quiet)
    except KeyboardInterrupt:
        folder = Path(config.output) / str(config.name)
        print(f"bmrs: interrupted; the finished (method, seed) pairs are kept in {folder / PARTIAL_FILE}: run the "
              f"same command with --name {config.name} to continue", file=sys.stderr)
        return 130
    print(format_markdown(out["rows"]))
    errors = [r for r in out["records"] if "error" in r]
    for r in errors:
        print(f"bmrs: {r['method']} seed {r['seed']} failed: {r['error']}", file=sys.stderr)
    if not args.quiet:
        print(f"bmrs: wrote {out['dir']} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 1 if errors else 0
