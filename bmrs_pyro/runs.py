"""One pruning run from start to finish, as plain functions the command line (and scripts) call.

The pieces, in the order ``bmrs run`` uses them (settings and the run folder's checks live in
:mod:`bmrs_pyro.run_config`, the reported numbers and the summary table in
:mod:`bmrs_pyro.run_summary`, atomic writes in :mod:`bmrs_pyro.atomic_io`):

- :class:`~bmrs_pyro.run_config.RunConfig` -- every option of a run, validated;
- :func:`~bmrs_pyro.run_config.prepare_run_dir` -- create and test the run folder *before* any training;
- :func:`build_experiment` -- data, model, guide (already run once) and optimizer from a config;
- :func:`train` -- SVI with continuous pruning, a checkpoint after every epoch;
- :func:`final_reduction` and :func:`finetune` -- the last pruning step, then training with the
  masks frozen;
- :func:`evaluate_model`, :func:`~bmrs_pyro.run_summary.compaction_summary` (with latency);
- :func:`write_run` -- ``config.json``, ``metrics.json``, ``compacted.pt``, ``inference_data.nc``;
- :func:`execute` -- all of the above, resumable from a run folder's checkpoint.

Every file is written atomically (:mod:`bmrs_pyro.atomic_io`): a temporary file in the same
folder, then :func:`os.replace`, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pyro
import torch


from .distributed import decide_on_rank0
from .atomic_io import atomic_torch_save, atomic_write_json, atomic_write_with
from .infer import History, _adam, anneal_epochs_for, evaluate, fit, warm_start_epochs_for
from .nn import noise_modules
from .run_config import CHECKPOINT_FILE, COMPACTED_FILE, COMPACTED_STATE_FILE, CONFIG_FILE, FINAL_FILE, IDATA_FILE, METRICS_FILE, Experiment, RunConfig, _preflight_new, _refuse_existing_config, check_device, config_record, ensure_writable, trainable_parameters
from .run_summary import compaction_summary, decision_summary, reduction_to_dict, structure_summary
from . import checkpoint  # module attribute lookups: tests replace checkpoint.save_checkpoint
from .checks import check_data
from . import data as datasets  # module attribute lookup: tests replace data.load
from .guides import AutoTruncatedLogNormal
from .pruner import guarded_reduce, prune_event
from .runlock import RunLock, create_unique_dir
from bmrs_pyro.analysis import to_inference_data
from bmrs_pyro.models import build


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------ configuration


# ------------------------------------------------------------------------------ run folder


# ------------------------------------------------------------------------------ experiment


def build_experiment(config: RunConfig) -> Experiment:
    """Load the data, build model and guide from ``config``, run the guide once, make the optimizer.

    Seeds Pyro and torch with ``config.seed`` first, so the initial weights are reproducible.
    """

    device = check_device(config.device)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    splits = datasets.load(config.data, root=config.root, seed=config.seed)
    kwargs: dict[str, Any] = {}
    if config.model == "mlp":
        kwargs = {"hidden": tuple(config.hidden or ()), "activation": config.activation}
    if config.norm != "none":
        kwargs["norm"] = config.norm
    model = build(config.model, splits.input_shape, splits.num_classes, **kwargs).to(device)
    guide = AutoTruncatedLogNormal(model).to(device)
    # An AutoGuide creates its parameters on its first call; do it now so that the optimizer and a
    # checkpoint have them.
    with torch.no_grad():
        guide(splits.train[0][:2].to(device))
    guide.to(device)
    # The variational parameters get their own rate: Adam moves a parameter ~lr per step and the
    # posteriors live on log theta in [-20, 0] (see fit's guide_lr).
    params = trainable_parameters(model, guide)
    variational = {id(p) for p in guide.parameters()}
    optimizer = _adam([  # fused update: the same algorithm as torch.optim.Adam, fewer operations
        {"params": [p for p in params if id(p) not in variational], "lr": config.lr},
        {"params": [p for p in params if id(p) in variational], "lr": config.guide_lr},
    ])
    return Experiment(config, splits, model, guide, optimizer, device)


def _checkpoint_callback(exp: Experiment, path: Optional[Path]) -> Callable:

    def callback(epoch: int, history: History, model, guide) -> bool:
        if path is not None:
            checkpoint.save_checkpoint(path, model, guide, optimizer=exp.optimizer, history=history,
                            config=exp.config.to_dict(), epoch=epoch + 1,
                            extra={"stage": "train", "elapsed": exp.elapsed()},
                            rng_state=getattr(history, "rng_state", None))
        return False

    return callback


def train(
    exp: Experiment,
    *,
    start_epoch: int = 0,
    checkpoint: Optional[Path] = None,
    progress: bool = True,
) -> History:
    """Train ``exp`` from ``start_epoch`` to ``config.epochs`` with continuous pruning.

    The first ``warm_start_epochs`` epochs train the deterministic twin (theta = 1, no KL; see
    :func:`bmrs_pyro.infer.fit`), the last ``anneal_epochs`` train the weights at a tenth of
    ``lr``. Reductions happen after epoch ``prune_start`` (past the warm
    start) and then every ``prune_every`` epochs, counted from the start of training, also across
    a resume. A checkpoint is written to ``checkpoint`` after every epoch.
    """
    cfg = exp.config
    if cfg.epochs - start_epoch <= 0:
        return exp.history
    callback = _checkpoint_callback(exp, checkpoint)
    prune_every = cfg.prune_every or None
    warm = cfg.warm_start_epochs if cfg.warm_start_epochs is not None else warm_start_epochs_for(cfg.epochs)
    anneal = cfg.anneal_epochs if cfg.anneal_epochs is not None else anneal_epochs_for(cfg.epochs)
    fit(exp.model, exp.guide, exp.data.train, epochs=cfg.epochs - start_epoch, batch_size=cfg.batch_size,
        lr=cfg.lr, kl_weight=cfg.kl_weight, seed=cfg.seed, callbacks=(callback,), device=str(exp.device),
        prune_every=prune_every, prune_method=cfg.method, prune_options=cfg.method_options,
        prune_start=(cfg.prune_start or warm + 1) if prune_every else None,
        progress=progress, start_epoch=start_epoch, optimizer=exp.optimizer, history=exp.history,
        warm_start_epochs=max(0, warm - start_epoch),
        anneal_epochs=min(anneal, cfg.epochs - start_epoch),  # counted from the end, also across a resume
        rng_state=exp.rng_state if start_epoch else None)  # exact resume: continue the saved stream
    return exp.history


def final_reduction(exp: Experiment):
    """Apply the configured criterion once more (respecting earlier masks); returns the result.

    Like continuous pruning, it keeps at least one structure per layer and holds a BMRS decision
    to its margin jointly on the training data (:func:`bmrs_pyro.pruner.check_jointly`), so the
    run always ends with a working network.
    """

    cfg = exp.config

    def decide():
        result = guarded_reduce(exp.model, exp.guide, cfg.method, exp.data.train, fraction=cfg.fraction,
                                **cfg.method_options)
        exp.history.events.append(prune_event(result, cfg.epochs - 1, final=True))
        return result.apply()

    # Under data parallelism rank 0 decides and every rank gets its masks.
    return decide_on_rank0(exp.model, decide, share=False)


def finetune(exp: Experiment, *, progress: bool = True) -> History:
    """Train ``config.finetune_epochs`` more epochs with the masks frozen (no pruning).

    Pruned structures keep their variational parameters (``fit`` holds them:
    :func:`bmrs_pyro.optim.freeze_pruned`); the weights go on at the learning rate training ended
    with (after the default anneal, a tenth of ``lr``); the ELBO of
    these epochs is appended to the history after the training epochs.
    """
    cfg = exp.config
    if cfg.finetune_epochs <= 0:
        return exp.history
    exp.history.events.append({"epoch": cfg.epochs, "event": "finetune"})
    fit(exp.model, exp.guide, exp.data.train, epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        kl_weight=cfg.kl_weight, seed=cfg.seed, device=str(exp.device), progress=progress,
        start_epoch=cfg.epochs, optimizer=exp.optimizer, history=exp.history)
    return exp.history


@contextlib.contextmanager
def masks_off(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily set every noise layer's mask to 1 (nothing pruned); restores them afterwards."""
    layers = noise_modules(model)
    saved = {site: layer.mask.detach().clone() for site, layer in layers.items()}
    try:
        with torch.no_grad():
            for layer in layers.values():
                layer.mask.fill_(1.0)
        yield
    finally:
        with torch.no_grad():
            for site, layer in layers.items():
                layer.mask.copy_(saved[site])


def evaluate_model(exp: Experiment, split: str = "test", *, unpruned: bool = False) -> dict:
    """``{"accuracy", "nll"}`` of the model in mean mode (E[theta] * mask) on a data split.

    ``unpruned=True`` sets every mask to 1 for the evaluation (the network before pruning).
    """
    data = getattr(exp.data, split)
    with masks_off(exp.model) if unpruned else contextlib.nullcontext():
        return evaluate(exp.model, exp.guide, data, mode="mean", device=str(exp.device))


def write_run(run_dir: Path, exp: Experiment, reduction, metrics: dict, compacted: torch.nn.Module) -> None:
    """Write ``metrics.json``, ``compacted.pt`` (+ state dict) and ``inference_data.nc`` atomically."""

    atomic_torch_save(compacted, run_dir / COMPACTED_FILE)
    atomic_torch_save(compacted.state_dict(), run_dir / COMPACTED_STATE_FILE)
    idata = to_inference_data(exp.model, exp.guide, num_samples=exp.config.posterior_samples,
                              reduction={exp.config.method: reduction}, history=exp.history, seed=exp.config.seed)
    atomic_write_with(run_dir / IDATA_FILE, idata.to_netcdf)
    atomic_write_json(run_dir / METRICS_FILE, metrics)


# ------------------------------------------------------------------------------ the whole run


def execute(
    config: RunConfig,
    *,
    run_dir: Optional[Path] = None,
    resume: bool = False,
    log: Log = _quiet,
    progress: bool = True,
    argv: Optional[Sequence[str]] = None,
    finish: Optional[Callable[[Path], Any]] = None,
) -> tuple[Path, dict, Any]:
    """Run (or resume) a whole experiment; returns ``(run_dir, metrics, reduction)``.

    A fresh run validates ``config``, prepares the run folder (before training) and writes
    ``config.json``. Training writes ``checkpoint.pt`` after every epoch: the state at the end
    of the last completed training epoch (continuous-pruning masks included, final reduction not
    yet applied). With ``resume=True`` that checkpoint is loaded and training continues from its
    epoch to ``config.epochs`` -- after a crash, or to extend a finished run with a larger
    ``epochs`` -- then the final reduction, fine-tuning and evaluation run again. The final,
    fine-tuned model is saved as ``final.pt`` (same format, with the reduction in ``extra``).

    Reliability (see ``docs/reliability.md``): every option is validated, the data are loaded and
    checked (:func:`check_experiment_data`) before a run folder is made, so a run that fails
    before training leaves no folder; the folder is locked (:class:`~bmrs_pyro.runlock.RunLock`)
    from then until this function returns, so a second writer is refused; a default name that
    exists gets a suffix (``-2``, ...). A checkpoint holds every random state, so a resumed run
    ends bit-identical to the uninterrupted one on CPU. ``finish(run_dir)``, if given, runs at
    the end with the lock still held (``bmrs run`` builds the report there).
    """
    default_name = config.name is None and run_dir is None and not resume
    config = config.resolved().validate()
    threads = torch.get_num_threads()
    if check_device(config.device).type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        opened = open_run(config, run_dir=run_dir, resume=resume, default_name=default_name, log=log, argv=argv)
        try:
            result = _execute(opened.config, run_dir=opened.run_dir, resume=resume, log=log, progress=progress,
                              argv=argv, opened=opened)
            if finish is not None:
                finish(result[0])
            return result
        finally:
            opened.lock.release()
    finally:
        torch.set_num_threads(threads)


@dataclass
class OpenedRun:
    """A run folder ready for training: locked, ``config.json`` written, experiment built."""

    config: RunConfig
    run_dir: Path
    lock: Any
    exp: "Experiment"
    start: int
    t_start: float


def check_experiment_data(exp: "Experiment") -> None:
    """Check every split of ``exp.data`` against the model (:func:`bmrs_pyro.checks.check_data`)."""

    for split in ("train", "val", "test"):
        data = getattr(exp.data, split, None)
        if data is not None:
            check_data(data, exp.model, name=f"{exp.config.data} {split} split", device=exp.device)


def open_run(config: RunConfig, *, run_dir: Optional[Path] = None, resume: bool = False, default_name: bool = False,
             log: Log = _quiet, argv: Optional[Sequence[str]] = None) -> OpenedRun:
    """Everything before training: folder checks, data, model, lock, ``config.json``.

    A new run: the folder is checked without creating anything, the data are loaded and checked,
    then the folder is made (atomically; with ``default_name`` a taken name gets ``-2``, ``-3``,
    ...), locked and given ``config.json``. A failure at any of these steps leaves no folder
    behind. A resumed run: the existing folder is locked first, then checked for writability
    (``figures/`` too when the report is on) and its checkpoint loaded.

    Raises:
        RunLockedError: another process holds the folder (its PID in the message).
        ValueError / FileNotFoundError / PermissionError: what to fix, in one line.
    """

    t_start = time.perf_counter()
    if resume:
        run_dir = Path(run_dir) if run_dir is not None else Path(config.output) / str(config.name)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist; pass a folder written by `bmrs run`")
        lock = RunLock(run_dir, "run").acquire()
        if lock.stale:
            log(f"the previous run in {run_dir} (PID {lock.stale.get('pid', '?')}) ended without releasing its "
                "lock (killed?); taking it over")
        try:
            ensure_writable(run_dir)
            figures = run_dir / "figures"
            if config.report and figures.is_dir():
                ensure_writable(figures, run_dir)
            ckpt = run_dir / CHECKPOINT_FILE
            if not ckpt.is_file():
                raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT_FILE} to resume from (no epoch finished); "
                                        "start a new run")
            log(f"loading {config.data} and building {config.model}")
            exp = build_experiment(config)
            check_experiment_data(exp)
            state = checkpoint.load_checkpoint(ckpt, exp.model, exp.guide, optimizer=exp.optimizer)
            exp.history = state["history"]
            exp.rng_state = state.get("rng_state")
            start = int(state["epoch"] or 0)
            exp.elapsed_before = float((state.get("extra") or {}).get("elapsed") or 0.0)
            exp.history.events.append({"epoch": start, "event": "resume"})
            if start > config.epochs:
                raise ValueError(f"{ckpt} has {start} training epochs already; --epochs must be at least {start}")
            log(f"resuming {run_dir} from epoch {start} of {config.epochs}")
            if exp.rng_state is None and start < config.epochs:
                log("this checkpoint holds no random state (older format): the resumed epochs draw fresh numbers")
            atomic_write_json(run_dir / CONFIG_FILE, config_record(config, argv))
        except BaseException:
            lock.release()
            raise
        return OpenedRun(config, run_dir, lock, exp, start, t_start)

    if run_dir is not None:
        config = dataclasses.replace(config, output=str(Path(run_dir).parent), name=Path(run_dir).name)
    target = _preflight_new(config, default_name)
    log(f"loading {config.data} and building {config.model}")
    exp = build_experiment(config)
    check_experiment_data(exp)
    if default_name:
        run_dir = create_unique_dir(config.output, str(config.name))
        created = True
        if run_dir.name != config.name:
            config = dataclasses.replace(config, name=run_dir.name)
            exp.config = config
    else:
        run_dir = target
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise PermissionError(f"cannot create the run folder {run_dir}: Permission denied; pick another --output") from None
        except OSError as err:
            raise ValueError(f"cannot create the run folder {run_dir}: {err.strerror or err}; pick another --output") from None
    lock = RunLock(run_dir, "run")
    try:
        lock.acquire()
        if not default_name:
            _refuse_existing_config(run_dir)
        ensure_writable(run_dir)
        atomic_write_json(run_dir / CONFIG_FILE, config_record(config, argv))
    except BaseException:
        # Nothing was trained: leave no trace of this run (only what it made itself).
        if lock.held:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    lock.path.unlink()
            lock.release()
        elif created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    return OpenedRun(config, run_dir, lock, exp, 0, t_start)


def _execute(config: RunConfig, *, run_dir: Path, resume: bool, log: Log, progress: bool,
             argv: Optional[Sequence[str]], opened: OpenedRun) -> tuple[Path, dict, Any]:

    t_start = opened.t_start
    exp, start = opened.exp, opened.start
    exp.started = t_start
    ckpt = run_dir / CHECKPOINT_FILE

    t_train = time.perf_counter()
    if start < config.epochs:
        mode = (f"continuous {config.method} pruning every {config.prune_every} epochs" if config.prune_every
                else "post-training pruning")
        warm = max(0, (config.warm_start_epochs or 0) - start)
        warm_note = f"the first {warm} deterministic (theta = 1), then SVI; " if warm else ""
        anneal = min(config.anneal_epochs or 0, config.epochs - start)
        anneal_note = f"the last {anneal} with the weights at a tenth of --lr; " if anneal else ""
        log(f"training {config.epochs - start} epochs ({warm_note}{anneal_note}{mode}, kl_weight={config.kl_weight:g})")
        train(exp, start_epoch=start, checkpoint=ckpt, progress=progress)
    # "Before": the trained network as it stands before the final reduction and fine-tuning, with
    # every mask set to 1 (structures removed by continuous pruning switched back on).
    before = evaluate_model(exp, unpruned=True)
    log(f"final reduction ({config.method})")
    reduction = final_reduction(exp)
    if config.finetune_epochs:
        log(f"fine-tuning {config.finetune_epochs} epochs with the masks frozen")
        finetune(exp, progress=progress)
    checkpoint.save_checkpoint(run_dir / FINAL_FILE, exp.model, exp.guide, optimizer=exp.optimizer, history=exp.history,
                    config=config.to_dict(), epoch=config.epochs + config.finetune_epochs,
                    extra={"stage": "final", "train_epochs": config.epochs, "reduction": reduction_to_dict(reduction)})
    train_seconds = time.perf_counter() - t_train

    log("evaluating before/after pruning and compacting")
    metrics: dict[str, Any] = {"method": config.method, "data": config.data, "model": config.model}
    after = evaluate_model(exp)
    metrics.update({"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                    "nll_before": before["nll"], "nll_after": after["nll"]})
    metrics.update(structure_summary(reduction))
    metrics["decision"] = decision_summary(reduction)
    compacted, part = compaction_summary(exp)
    metrics.update(part)
    metrics["elbo"] = list(exp.history.elbo)
    metrics["warm_start"] = list(exp.history.warm_start)  # log likelihood per warm-start epoch
    metrics["pruning_events"] = [
        {"epoch": e["epoch"], "kept": sum(e["kept"].values()), **({"final": True} if e.get("final") else {})}
        for e in exp.history.events if e.get("event") == "prune"
    ]
    metrics["epochs"] = {"train": config.epochs, "finetune": config.finetune_epochs, "resumed_from": start if resume else None}
    metrics["evaluated_on"] = "test"
    metrics["train_seconds"] = train_seconds
    log(f"writing {run_dir}")
    exp.model.cpu()
    exp.guide.cpu()
    metrics["seconds"] = time.perf_counter() - t_start
    metrics["seconds_total"] = exp.elapsed()
    write_run(run_dir, exp, reduction, metrics, compacted.cpu())
    return run_dir, metrics, reduction


# ------------------------------------------------------------------------------ summary table


def stderr_log(prefix: str = "bmrs") -> Log:
    """A stage logger writing ``[prefix] message`` lines to stderr."""

    def log(message: str) -> None:
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return log
