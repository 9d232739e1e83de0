"""One pruning run from start to finish, as plain functions the command line (and scripts) call.

The pieces, in the order ``bmrs run`` uses them:

- :class:`RunConfig` -- every option of a run, validated (:meth:`RunConfig.validate`);
- :func:`prepare_run_dir` -- create and test the run folder *before* any training;
- :func:`build_experiment` -- data, model, guide (already run once) and optimizer from a config;
- :func:`train` -- SVI with continuous pruning, a checkpoint after every epoch;
- :func:`final_reduction` and :func:`finetune` -- the last pruning step, then training with the
  masks frozen;
- :func:`evaluate_model`, :func:`compaction_summary`, :func:`measure_latency`;
- :func:`write_run` -- ``config.json``, ``metrics.json``, ``compacted.pt``, ``inference_data.nc``;
- :func:`execute` -- all of the above, resumable from a run folder's checkpoint.

Every file is written atomically (:func:`atomic_write_bytes`): a temporary file in the same
folder, then :func:`os.replace`, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pyro
import torch

import bmrs_pyro

from .atomic_io import atomic_torch_save, atomic_write_json, atomic_write_with
from .checks import is_number, nonneg_int, positive_int, positive_number
from .infer import DEFAULT_PRUNE_WARMUP, History, _adam, evaluate, fit, warm_start_epochs_for
from .nn import noise_modules
from . import checkpoint  # module attribute lookups: tests replace checkpoint.save_checkpoint
from .checks import check_data
from .compaction import compact, masked_dense
from .criteria import CRITERIA, resolve_margin
from . import data as datasets  # module attribute lookup: tests replace data.load
from .data import DATASETS
from .guides import AutoTruncatedLogNormal, deep_getattr
from .pruner import guarded_reduce, prune_event
from .runlock import RunLock, RunLockedError, create_unique_dir, lock_holder
from bmrs_pyro.analysis import SavedReduction, to_inference_data
from bmrs_pyro.models import MODELS, build

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"
COMPACTED_FILE = "compacted.pt"
COMPACTED_STATE_FILE = "compacted_state.pt"
IDATA_FILE = "inference_data.nc"

#: Default number of epochs between continuous-pruning steps for threshold-free methods.
DEFAULT_PRUNE_EVERY = 5

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------ configuration


def parse_hidden(text: str | Sequence[int]) -> tuple[int, ...]:
    """Hidden widths from ``"100,100"`` (or a sequence of ints); each must be a positive int."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ValueError(f"hidden widths must be comma-separated positive integers like 100,100; got {text!r}")
        try:
            widths = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"hidden widths must be comma-separated positive integers like 100,100; got {text!r}") from None
    else:
        widths = tuple(text)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) for w in widths):
            raise ValueError(f"hidden widths must be a non-empty sequence of ints, got {text!r}")
    if any(w < 1 for w in widths):
        raise ValueError(f"every hidden width must be >= 1, got {','.join(map(str, widths))}")
    return widths


@dataclass
class RunConfig:
    """Every option of a run. ``config.json`` holds :meth:`to_dict` of the resolved config.

    ``prune_every=None``, ``prune_start=None``, ``warm_start_epochs=None``, ``margin=None`` and
    ``name=None`` are resolved by :meth:`resolved`: a deterministic warm start of
    :data:`bmrs_pyro.infer.WARM_START_FRACTION` of ``epochs`` (the training recipe, see
    :func:`bmrs_pyro.infer.fit`; counted inside ``epochs``); continuous pruning every
    :data:`DEFAULT_PRUNE_EVERY` epochs for a threshold-free method without ``fraction`` (else 0,
    post-training only; ``none`` never prunes), the first reduction after a pruning warm-up of
    ``ceil(DEFAULT_PRUNE_WARMUP * SVI epochs)`` past the warm start; the BMRS margin 1 nat (0.919
    with ``reference_code``); and ``<data>-<model>-<method>-<timestamp>``.
    """

    data: str = "digits"
    root: Optional[str] = None
    model: str = "mlp"
    hidden: Optional[tuple[int, ...]] = (100, 100)
    activation: str = "tanh"
    method: str = "bmrs_n"
    fraction: Optional[float] = None
    bits: int = 8
    reference_code: bool = False
    margin: Optional[float] = None
    epochs: int = 100
    lr: float = 1e-2
    guide_lr: float = 0.05
    batch_size: int = 128
    kl_weight: float = 1.0
    prune_every: Optional[int] = None
    prune_start: Optional[int] = None
    finetune_epochs: int = 10
    warm_start_epochs: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    output: str = "runs"
    name: Optional[str] = None
    report: bool = True
    quiet: bool = False
    posterior_samples: int = 500
    latency_repeats: int = 20

    def resolved(self) -> "RunConfig":
        """A copy with ``prune_every`` and ``name`` filled in and ``hidden`` only for mlp."""
        cfg = dataclasses.replace(self)
        if cfg.prune_every is None:
            continuous = _has_rule(cfg.method) and cfg.fraction is None and cfg.method != "none"
            cfg.prune_every = DEFAULT_PRUNE_EVERY if continuous else 0
        if cfg.warm_start_epochs is None and is_number(cfg.epochs) and cfg.epochs == int(cfg.epochs) >= 1:
            cfg.warm_start_epochs = warm_start_epochs_for(int(cfg.epochs))  # bad epochs: validate() says so
        if cfg.prune_start is None and cfg.prune_every and isinstance(cfg.epochs, int):
            warm = cfg.warm_start_epochs if isinstance(cfg.warm_start_epochs, int) else 0
            cfg.prune_start = warm + max(1, math.ceil(DEFAULT_PRUNE_WARMUP * (cfg.epochs - warm)))
        if cfg.margin is None and _is_bmrs(cfg.method) and cfg.fraction is None:

            cfg.margin = resolve_margin(None, cfg.reference_code and cfg.method == "bmrs_n")
        if cfg.model != "mlp":
            cfg.hidden = None
        elif cfg.hidden is not None:
            cfg.hidden = tuple(cfg.hidden)
        if cfg.name is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.name = f"{cfg.data}-{cfg.model}-{cfg.method}-{stamp}"
        return cfg

    def validate(self) -> "RunConfig":
        """Check every option; raises ValueError with what to change. Returns ``self``."""

        if self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.method not in CRITERIA:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(CRITERIA)}")
        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("posterior_samples", self.posterior_samples)
        positive_int("latency_repeats", self.latency_repeats)
        positive_int("threads", self.threads)
        nonneg_int("finetune_epochs", self.finetune_epochs)
        nonneg_int("seed", self.seed)
        nonneg_int("bits", self.bits)
        if self.method == "bmrs_u":
            check_bits(self.bits)
        positive_number("lr", self.lr)
        positive_number("guide_lr", self.guide_lr)
        if not (is_number(self.kl_weight) and self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"kl_weight must be a finite number >= 0 (1 is the true ELBO), got {self.kl_weight!r}")
        if self.fraction is not None and not (is_number(self.fraction) and 0 <= self.fraction <= 1):
            raise ValueError(f"fraction must be in [0, 1] (the share of structures to remove), got {self.fraction!r}")
        if self.prune_every is not None:
            nonneg_int("prune_every", self.prune_every)
        if self.prune_start is not None:
            positive_int("prune_start", self.prune_start)
        if self.margin is not None or self.reference_code:

            if self.margin is not None and not _is_bmrs(self.method):
                raise ValueError(f"--margin applies to bmrs_n and bmrs_u only, not to {self.method!r}")
            if self.reference_code and self.method != "bmrs_n":
                raise ValueError(f"--reference-code applies to bmrs_n only, not to {self.method!r}")
            resolve_margin(self.margin, self.reference_code)
        if self.method == "none" and (self.fraction is not None or self.prune_every):
            raise ValueError("--method none removes nothing: drop --fraction and --prune-every")
        if self.warm_start_epochs is not None:
            nonneg_int("warm_start_epochs", self.warm_start_epochs)
            if self.warm_start_epochs > self.epochs:
                raise ValueError(f"warm_start_epochs ({self.warm_start_epochs}) is counted inside epochs "
                                 f"({self.epochs}) and cannot exceed it")
        if not _has_rule(self.method) and self.fraction is None:
            raise ValueError(
                f"method {self.method!r} ranks structures but has no threshold: pass --fraction <share to remove>, "
                "or use a threshold-free method (bmrs_n, bmrs_u, snr)"
            )
        if self.prune_every and self.fraction is not None:
            raise ValueError(
                "continuous pruning needs a threshold-free method without --fraction; with --fraction use "
                "--prune-every 0 (prune once after training)"
            )
        if self.model == "mlp":
            if self.hidden is None:
                raise ValueError("mlp needs hidden widths, e.g. --hidden 100,100")
            parse_hidden(self.hidden)
        check_device(self.device)
        if not isinstance(self.output, str) or not self.output:
            raise ValueError("output must name a folder")
        if self.name is not None:
            if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\"):
                raise ValueError(f"name must be a plain folder name (no '/'), got {self.name!r}")
        return self

    def to_dict(self) -> dict:
        """JSON-ready dict of every option."""
        out = dataclasses.asdict(self)
        if out["hidden"] is not None:
            out["hidden"] = list(out["hidden"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
        values = dict(data)
        if values.get("hidden") is not None:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)

    @property
    def method_options(self) -> dict:
        """Keyword options of the pruning criterion: ``bits`` for bmrs_u, ``reference_code`` for
        bmrs_n, the evidence ``margin`` for both (unless ranking by ``fraction``)."""
        options: dict = {}
        if self.method == "bmrs_u":
            options["bits"] = self.bits
        if self.method == "bmrs_n" and self.reference_code:
            options["reference_code"] = True
        elif _is_bmrs(self.method) and self.margin is not None and self.fraction is None:
            options["margin"] = self.margin
        return options


#: Largest ``bits`` of BMRS_U: the reduced prior's upper bound 2^-bits must stay above the prior's
#: lower bound e^-20 of log theta (20 / ln 2 = 28.9).
MAX_BITS = 28


def check_bits(bits: Any) -> None:
    """``bits`` of BMRS_U must be an integer in 1 .. :data:`MAX_BITS` (ValueError otherwise)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be >= 1 and <= {MAX_BITS} (BMRS_U's reduced prior ends at 2^-bits, inside "
                         f"the prior's range [e^-20, 1]), got {bits!r}")


def _is_bmrs(method: str) -> bool:
    return method in ("bmrs_n", "bmrs_u")


def _has_rule(method: str) -> bool:

    criterion = CRITERIA.get(method)
    return criterion is not None and criterion.has_rule


def check_device(device: str) -> torch.device:
    """``torch.device`` for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; an unavailable GPU is a ValueError."""
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was requested but no CUDA GPU is available to torch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


# ------------------------------------------------------------------------------ run folder


def prepare_run_dir(output: str | os.PathLike, name: str, *, resume: bool = False) -> Path:
    """Create ``output/name`` and prove it is writable, before any training starts.

    Raises:
        ValueError: ``output`` (or a parent) is a file, the folder cannot be created or written,
        or the run folder already holds a run and ``resume`` is False.
    """
    out = Path(output)
    run_dir = out / name
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write runs under {out}: {parent} is a file, not a folder; pick another --output")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run folder; pick another --name")
    if not resume and run_dir.is_dir() and (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run; pick another --name, or continue it with --resume {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write the run folder {run_dir}: {err.strerror or err}; pick another --output") from None
    return run_dir


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` saved in ``run_dir/config.json``.

    Raises:
        FileNotFoundError: no such folder or no config.json in it.
        ValueError: the file is not a valid run config.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass a folder written by `bmrs run`")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE}; pass a folder written by `bmrs run`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    data = {k: v for k, v in data.items() if k not in _CONFIG_EXTRAS}
    return RunConfig.from_dict(data)


#: Keys written to config.json besides the options (provenance), ignored when reading it back.
_CONFIG_EXTRAS = ("bmrs_pyro_version", "torch_version", "pyro_version", "command")


# ------------------------------------------------------------------------------ experiment


@dataclass
class Experiment:
    """What a run trains: data splits, the model, its guide and the optimizer over both."""

    config: RunConfig
    data: Any
    model: torch.nn.Module
    guide: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    history: History = field(default_factory=History)
    #: Random states to continue from (set when resuming from a checkpoint; see bmrs_pyro.rng).
    rng_state: Optional[dict] = None
    #: Wall time (s) that earlier invocations of a resumed run spent, read from its checkpoint.
    elapsed_before: float = 0.0
    #: ``time.perf_counter()`` when this invocation started, for the cumulative run time.
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Wall time of the whole run so far, earlier invocations of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.started


def trainable_parameters(model: torch.nn.Module, guide: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of model then guide (deduplicated, in a fixed order), for the optimizer.

    The order is what makes a saved optimizer state loadable into a rebuilt experiment.
    """
    seen, params = set(), []
    for module in (model, guide):
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


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


def hold_pruned(exp: Experiment) -> None:
    """Zero the Adam first moment of pruned structures' variational parameters.

    Pruned structures get exactly zero gradient (masked likelihood and KL); with a zero first
    moment Adam then leaves them where pruning found them instead of letting momentum carry them.
    ``fit`` freezes them itself after each of its own pruning steps; this covers the epochs after
    a resume and the fine-tuning stage.
    """

    guide = exp.guide
    for site, layer in noise_modules(exp.model).items():
        dead = ~layer.mask.bool()
        if site not in guide.site_names or not dead.any():
            continue
        *path, leaf = site.split(".")
        for store in (guide.locs, guide.log_scales):
            owner = deep_getattr(store, ".".join(path)) if path else store
            p = getattr(owner, leaf + "_unconstrained")
            state = exp.optimizer.state.get(p, {})
            if "exp_avg" in state:
                state["exp_avg"][dead.to(state["exp_avg"].device)] = 0.0


def train(
    exp: Experiment,
    *,
    start_epoch: int = 0,
    checkpoint: Optional[Path] = None,
    progress: bool = True,
) -> History:
    """Train ``exp`` from ``start_epoch`` to ``config.epochs`` with continuous pruning.

    The first ``warm_start_epochs`` epochs train the deterministic twin (theta = 1, no KL; see
    :func:`bmrs_pyro.infer.fit`). Reductions happen after epoch ``prune_start`` (past the warm
    start) and then every ``prune_every`` epochs, counted from the start of training, also across
    a resume. A checkpoint is written to ``checkpoint`` after every epoch.
    """
    cfg = exp.config
    if cfg.epochs - start_epoch <= 0:
        return exp.history
    if start_epoch:
        hold_pruned(exp)
    callback = _checkpoint_callback(exp, checkpoint)
    prune_every = cfg.prune_every or None
    warm = cfg.warm_start_epochs if cfg.warm_start_epochs is not None else warm_start_epochs_for(cfg.epochs)
    fit(exp.model, exp.guide, exp.data.train, epochs=cfg.epochs - start_epoch, batch_size=cfg.batch_size,
        lr=cfg.lr, kl_weight=cfg.kl_weight, seed=cfg.seed, callbacks=(callback,), device=str(exp.device),
        prune_every=prune_every, prune_method=cfg.method, prune_options=cfg.method_options,
        prune_start=(cfg.prune_start or warm + 1) if prune_every else None,
        progress=progress, start_epoch=start_epoch, optimizer=exp.optimizer, history=exp.history,
        warm_start_epochs=max(0, warm - start_epoch),
        rng_state=exp.rng_state if start_epoch else None)  # exact resume: continue the saved stream
    return exp.history


def final_reduction(exp: Experiment):
    """Apply the configured criterion once more (respecting earlier masks); returns the result.

    Like continuous pruning, it keeps at least one structure per layer and holds a BMRS decision
    to its margin jointly on the training data (:func:`bmrs_pyro.pruner.check_jointly`), so the
    run always ends with a working network.
    """

    cfg = exp.config
    result = guarded_reduce(exp.model, exp.guide, cfg.method, exp.data.train, fraction=cfg.fraction,
                            **cfg.method_options)
    exp.history.events.append(prune_event(result, cfg.epochs - 1, final=True))
    return result.apply()


def finetune(exp: Experiment, *, progress: bool = True) -> History:
    """Train ``config.finetune_epochs`` more epochs with the masks frozen (no pruning).

    Pruned structures keep their variational parameters (see :func:`hold_pruned`); the ELBO of
    these epochs is appended to the history after the training epochs.
    """
    cfg = exp.config
    if cfg.finetune_epochs <= 0:
        return exp.history
    hold_pruned(exp)
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


@torch.no_grad()
def measure_latency(module: torch.nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3,
                    threads: Optional[int] = 1) -> float:
    """Median wall time of ``module(x)`` in milliseconds over ``repeats`` runs after ``warmup``.

    On CPU it runs with ``threads`` intra-op threads (default 1, restored afterwards): on a busy
    machine several threads wait on each other and a 0.04 ms forward pass can take 90 ms, which
    would measure the machine rather than the network. ``threads=None`` keeps torch's setting.
    """
    positive_int("repeats", repeats)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    before = torch.get_num_threads()
    if threads is not None and not x.is_cuda:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            module(x)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 1000.0 * statistics.median(times)


def _removed_pct(before: Optional[float], after: Optional[float]) -> Optional[float]:
    if before in (None, 0) or after is None:
        return None
    return 100.0 * (before - after) / before


def compaction_summary(exp: Experiment, *, latency_batch: int = 256) -> tuple[torch.nn.Module, dict]:
    """Compact the masked model; returns ``(compacted module, metrics part)``.

    Parameters count the backbone before and after; FLOPs are per example (a batch of one);
    latency is the median time of a forward pass on a batch of up to ``latency_batch`` test
    examples, masked dense network (no Pyro, full width) against the compacted one.
    """

    x_test = exp.data.test[0]
    one = x_test[:1].to(exp.device)
    compacted = compact(exp.model, exp.guide, example_input=one)
    stats = compacted.stats
    dense = masked_dense(exp.model, exp.guide)
    batch = x_test[:latency_batch].to(exp.device)
    repeats = exp.config.latency_repeats
    latency = {"before": measure_latency(dense, batch, repeats), "after": measure_latency(compacted, batch, repeats),
               "batch": int(batch.shape[0]), "repeats": repeats, "device": str(exp.device),
               "threads": 1 if exp.device.type == "cpu" else None}
    part = {
        "parameters": {"before": stats["params_before"], "after": stats["params_after"],
                       "removed_pct": _removed_pct(stats["params_before"], stats["params_after"])},
        "flops": {"before": stats["flops_before"], "after": stats["flops_after"],
                  "removed_pct": _removed_pct(stats["flops_before"], stats["flops_after"]), "per": "example"},
        "latency_ms": latency,
        "compaction": {"method": stats["method"], "max_abs_diff": stats["max_abs_diff"], "notes": stats["notes"]},
    }
    return compacted, part


def structure_summary(reduction) -> dict:
    """``structures`` and ``layers`` parts of the metrics from a reduction result."""
    layers = [{"site": site, "kept": int(k), "total": int(t)} for site, (k, t) in reduction.kept_per_layer.items()]
    total = sum(r["total"] for r in layers)
    kept = sum(r["kept"] for r in layers)
    return {"structures": {"total": total, "kept": kept, "removed_pct": 100.0 * (total - kept) / total if total else 0.0},
            "layers": layers}


def decision_summary(reduction) -> dict:
    """``decision`` part of the metrics: the method, its rule in words and, for the BMRS rules,
    the evidence margin and the tie band ``[-margin, 0)``: structures the margin removes although
    the strict rule ``dF >= 0`` would keep them (posteriors close to the prior)."""
    out: dict[str, Any] = {"method": reduction.method, "rule": getattr(reduction, "rule", "") or ""}
    band = reduction.tie_band() if hasattr(reduction, "tie_band") else None
    if band is not None:
        out["margin"] = float(reduction.margin)
        out["tie_band"] = band
    return out


def reduction_to_dict(reduction) -> dict:
    """What a checkpoint keeps of a reduction (method, options, per-site scores and keep masks)."""
    return {"method": reduction.method, "options": dict(getattr(reduction, "options", {}) or {}),
            "scores": {s: torch.as_tensor(v).detach().cpu() for s, v in reduction.scores.items()},
            "keep": {s: torch.as_tensor(v).detach().cpu().bool() for s, v in reduction.keep.items()}}


def reduction_from_dict(data: dict):
    """A :class:`bmrs_pyro.analysis.SavedReduction` from :func:`reduction_to_dict` output."""

    return SavedReduction(data["method"], dict(data["scores"]), dict(data["keep"]), dict(data.get("options") or {}))


def write_run(run_dir: Path, exp: Experiment, reduction, metrics: dict, compacted: torch.nn.Module) -> None:
    """Write ``metrics.json``, ``compacted.pt`` (+ state dict) and ``inference_data.nc`` atomically."""

    atomic_torch_save(compacted, run_dir / COMPACTED_FILE)
    atomic_torch_save(compacted.state_dict(), run_dir / COMPACTED_STATE_FILE)
    idata = to_inference_data(exp.model, exp.guide, num_samples=exp.config.posterior_samples,
                              reduction={exp.config.method: reduction}, history=exp.history, seed=exp.config.seed)
    atomic_write_with(run_dir / IDATA_FILE, idata.to_netcdf)
    atomic_write_json(run_dir / METRICS_FILE, metrics)


def config_record(config: RunConfig, argv: Optional[Sequence[str]] = None) -> dict:
    """``config.json`` content: every option plus versions and the command line."""

    record = config.to_dict()
    record.update({"bmrs_pyro_version": bmrs_pyro.__version__, "torch_version": torch.__version__,
                   "pyro_version": pyro.__version__})
    if argv is not None:
        record["command"] = ["bmrs", *argv]
    return record


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


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def ensure_writable(folder: Path, run_dir: Optional[Path] = None) -> None:
    """Prove ``folder`` accepts new files (a temporary file, removed at once).

    Raises PermissionError naming the folder (and the run folder it is for), or ValueError for
    another OS error (a read-only file system, a full disk).
    """
    target = run_dir if run_dir is not None else folder
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        where = "" if folder == target else f" (writing in {folder})"
        raise PermissionError(f"cannot write the run folder {target}: Permission denied{where}; make it writable "
                              "or pick another --output") from None
    except OSError as err:
        raise ValueError(f"cannot write the run folder {target}: {err.strerror or err}; pick another --output") from None


def _preflight_new(config: RunConfig, default_name: bool) -> Path:
    """Checks of a new run's folder that create nothing (before the data are loaded)."""
    out = Path(config.output)
    run_dir = out / str(config.name)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write runs under {out}: {parent} is a file, not a folder; pick another --output")
    if not default_name:
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"{run_dir} is a file, not a run folder; pick another --name")
        _refuse_existing(run_dir)
    ensure_writable(_nearest_existing(run_dir), run_dir)
    return run_dir


def _refuse_existing(run_dir: Path) -> None:

    holder = lock_holder(run_dir) if run_dir.is_dir() else None
    if holder is not None:
        raise RunLockedError(f"{run_dir} is in use by another bmrs {holder.get('purpose', 'run')} "
                             f"(PID {holder.get('pid', '?')}); pick another --name")
    if run_dir.is_dir() and (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run; pick another --name, or continue it with --resume {run_dir}")


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


def _refuse_existing_config(run_dir: Path) -> None:
    if (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run; pick another --name, or continue it with --resume {run_dir}")


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
        log(f"training {config.epochs - start} epochs ({warm_note}{mode}, kl_weight={config.kl_weight:g})")
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


def _fmt_int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and value is not None else "n/a"


def _fmt_pct(value: Any) -> str:
    return f"{value:.1f} %" if isinstance(value, (int, float)) else "n/a"


def format_summary(metrics: dict, run_dir: Optional[Path] = None) -> str:
    """The plain-text summary table ``bmrs run`` prints: before/after metrics and kept widths."""
    lat = metrics.get("latency_ms", {})
    rows = [
        ("accuracy (test)", f"{100 * metrics['accuracy_before']:.2f} %", f"{100 * metrics['accuracy_after']:.2f} %", ""),
        ("NLL (nats/example)", f"{metrics['nll_before']:.4f}", f"{metrics['nll_after']:.4f}", ""),
        ("structures", _fmt_int(metrics["structures"]["total"]), _fmt_int(metrics["structures"]["kept"]),
         _fmt_pct(metrics["structures"]["removed_pct"])),
        ("parameters", _fmt_int(metrics["parameters"]["before"]), _fmt_int(metrics["parameters"]["after"]),
         _fmt_pct(metrics["parameters"]["removed_pct"])),
        ("FLOPs / example", _fmt_int(metrics["flops"]["before"]), _fmt_int(metrics["flops"]["after"]),
         _fmt_pct(metrics["flops"]["removed_pct"])),
        (f"latency ms (batch {lat.get('batch', '?')})", f"{lat.get('before', float('nan')):.3f}",
         f"{lat.get('after', float('nan')):.3f}", ""),
    ]
    head = ("", "before", "after", "removed")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]

    def line(r):
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()

    title = f"bmrs run: {metrics['data']} / {metrics['model']} / {metrics['method']}"
    if run_dir is not None:
        title += f"  ->  {run_dir}"
    out = [title, line(head), "-" * sum(widths) + "-" * 6]
    out += [line(r) for r in rows]
    layer_w = max([len("layer")] + [len(r["site"]) for r in metrics["layers"]])
    out += ["", f"{'layer':<{layer_w}}  {'kept':>6}  {'total':>6}  {'removed':>8}"]
    for r in metrics["layers"]:
        pct = 100.0 * (r["total"] - r["kept"]) / r["total"] if r["total"] else 0.0
        out.append(f"{r['site']:<{layer_w}}  {r['kept']:>6}  {r['total']:>6}  {pct:>6.1f} %")
    decision = metrics.get("decision") or {}
    if decision.get("rule"):
        out += ["", f"rule: {decision['rule']}"]
    band = decision.get("tie_band")
    if band and band.get("count"):
        out.append(f"tie band: {band['count']} structures have {band['band'][0]:g} <= dF < 0 (posteriors close to "
                   f"the prior: not worth keeping on the evidence); {band['removed']} of them removed")
    return "\n".join(out)


def stderr_log(prefix: str = "bmrs") -> Log:
    """A stage logger writing ``[prefix] message`` lines to stderr."""

    def log(message: str) -> None:
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return log
