"""``bmrs compare`` execution: the (methods, seed) tasks, the shared SVI fit of the noise criteria,
the process pool, resuming from ``partial.jsonl`` and the per-seed records."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import pyro
import torch
from tqdm.auto import tqdm

from ..atomic_io import atomic_write_text
from ..baselines import METHODS, MethodResult, NoiseCriterionMethod, get_method
from ..baselines.common import Budget, seed_all
from ..curves import CurvePoint
from ..compaction import compression_stats
from ..curves import count_parameters
from ..guides import AutoTruncatedLogNormal
from ..runlock import RunLock
from .config import CURVES_FILE, PARTIAL_FILE, CompareConfig, _builder, _load_data, check_config
from .summaries import summary_rows, write_outputs


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
    (learning rate, ``kl_weight``, ``guide_lr``, ``warm_start`` or ``anneal``).
    """
    methods = [get_method(n) for n in names]
    for m in methods:
        if not isinstance(m, NoiseCriterionMethod):
            raise ValueError(f"{m.name} is not a multiplicative-noise criterion; run it with METHODS[{m.name!r}].run")
    budget = Budget.coerce(budget)
    opts = {m.name: m.check_options(dict((options or {}).get(m.name, {}))) for m in methods}
    training = {(budget.lr_or(m.lr), float(opts[m.name]["kl_weight"]), float(opts[m.name]["guide_lr"]),
                 float(opts[m.name]["warm_start"]), float(opts[m.name]["anneal"])) for m in methods}
    if len(training) > 1:
        raise ValueError(f"the methods train with different (lr, kl_weight, guide_lr, warm_start, anneal) "
                         f"{sorted(training)}; "
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


def compaction_at_stop(result: MethodResult, x: torch.Tensor) -> Optional[dict]:
    """Parameters and FLOPs (per example) of ``result.model`` compacted at its stopping point.

    ``how`` is ``"compaction"`` (:func:`bmrs_pyro.compaction.compression_stats`) or, where that
    fails, ``"count_parameters"`` (:func:`bmrs_pyro.curves.count_parameters`, FLOPs None) with
    the reason. None when the method has no stopping point.
    """
    if result.stop is None:
        return None
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


def _point(p: CurvePoint) -> dict:
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
