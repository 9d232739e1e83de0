"""The settings and the folder of one ``bmrs run``: :class:`RunConfig` (every option, validated),
the file names of a run folder, ``config.json`` (:func:`config_record`, :func:`read_run_config`)
and the checks on the output folder made before any training (:func:`prepare_run_dir`,
:func:`ensure_writable`)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pyro
import torch

import bmrs_pyro

from .checks import is_number, nonneg_int, positive_int, positive_number
from .infer import DEFAULT_PRUNE_WARMUP, History, anneal_epochs_for, warm_start_epochs_for
from .criteria import CRITERIA, resolve_margin
from .data import DATASETS
from .runlock import RunLockedError, lock_holder
from bmrs_pyro.models import MODELS, check_model_norm


CONFIG_FILE = "config.json"


METRICS_FILE = "metrics.json"


CHECKPOINT_FILE = "checkpoint.pt"


FINAL_FILE = "final.pt"


COMPACTED_FILE = "compacted.pt"


COMPACTED_STATE_FILE = "compacted_state.pt"


IDATA_FILE = "inference_data.nc"


#: Default number of epochs between continuous-pruning steps for threshold-free methods.
DEFAULT_PRUNE_EVERY = 5


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

    ``prune_every=None``, ``prune_start=None``, ``warm_start_epochs=None``, ``anneal_epochs=None``,
    ``margin=None`` and ``name=None`` are resolved by :meth:`resolved`: a deterministic warm start
    of :data:`bmrs_pyro.infer.WARM_START_FRACTION` of ``epochs`` and a learning-rate anneal of the
    weights over the last :data:`bmrs_pyro.infer.ANNEAL_FRACTION` (the training recipe, see
    :func:`bmrs_pyro.infer.fit`; both counted inside ``epochs``); continuous pruning every
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
    norm: str = "none"
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
    anneal_epochs: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    nproc: int = 1  # data-parallel ranks (torchrun); a resume needs the same number
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
        if cfg.anneal_epochs is None and is_number(cfg.epochs) and cfg.epochs == int(cfg.epochs) >= 1:
            cfg.anneal_epochs = anneal_epochs_for(int(cfg.epochs))
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
        check_model_norm(self.model, self.norm)
        if self.method not in CRITERIA:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(CRITERIA)}")
        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("posterior_samples", self.posterior_samples)
        positive_int("latency_repeats", self.latency_repeats)
        positive_int("threads", self.threads)
        positive_int("nproc", self.nproc)
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
        if self.anneal_epochs is not None:
            nonneg_int("anneal_epochs", self.anneal_epochs)
            if (self.warm_start_epochs or 0) + self.anneal_epochs > self.epochs:
                raise ValueError(f"anneal_epochs ({self.anneal_epochs}) are the last SVI epochs: with "
                                 f"warm_start_epochs ({self.warm_start_epochs or 0}) they cannot exceed epochs "
                                 f"({self.epochs})")
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


#: Keys written to config.json besides the options (provenance), ignored when reading it back.
_CONFIG_EXTRAS = ("bmrs_pyro_version", "torch_version", "pyro_version", "command")


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


def config_record(config: RunConfig, argv: Optional[Sequence[str]] = None) -> dict:
    """``config.json`` content: every option plus versions and the command line."""

    record = config.to_dict()
    record.update({"bmrs_pyro_version": bmrs_pyro.__version__, "torch_version": torch.__version__,
                   "pyro_version": pyro.__version__})
    if argv is not None:
        record["command"] = ["bmrs", *argv]
    return record


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


def _refuse_existing_config(run_dir: Path) -> None:
    if (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run; pick another --name, or continue it with --resume {run_dir}")


# ------------------------------------------------------------------------------ a run's state


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
