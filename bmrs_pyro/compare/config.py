"""``bmrs compare`` settings: :class:`CompareConfig`, method names, the data and network of a task,
and the constants the other parts share (file names, tolerance, Kneedle settings)."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..baselines import METHODS, get_method
from ..baselines.common import Budget
from ..checks import check_int, is_number
from ..data import DATASETS, load
from ..nn import noise_modules
from bmrs_pyro.models import MODELS, check_model_norm
from bmrs_pyro.models.registry import build


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
QUICK_BUDGET = {"epochs": 2, "finetune_epochs": 1, "rounds": 2, "round_epochs": 1, "fraction_step": 0.25,
          "subset": 400}


@dataclass
class CompareConfig:
    """Every setting of one comparison.

    ``methods``: registry names (:func:`resolve_methods`); ``seeds``: K, seeds 0..K-1;
    ``epochs`` .. ``lr``: the :class:`~bmrs_pyro.baselines.Budget` every method gets;
    ``fraction_step``: grid of the swept methods (noise criteria, RNI); ``warm_start``: share of
    ``epochs`` the noise criteria train deterministically before SVI (None: their default,
    :data:`bmrs_pyro.infer.WARM_START_FRACTION`; counted inside ``epochs``); ``anneal``: share of
    ``epochs``, at the end, in which the noise criteria train the weights at a tenth of their rate
    (None: :data:`bmrs_pyro.infer.ANNEAL_FRACTION`); ``hidden`` and
    ``activation``: the mlp's; ``norm``: ``"none"`` or ``"batch"`` (a BatchNorm before every
    activation of the mlp or lenet5, for every method); ``data_options``: passed to :func:`bmrs_pyro.data.load`
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
    finetune_lr_factor: float = Budget.finetune_lr_factor
    rounds: int = Budget.rounds
    round_epochs: int = Budget.round_epochs
    batch_size: int = Budget.batch_size
    lr: Optional[float] = Budget.lr
    fraction_step: float = 0.1
    warm_start: Optional[float] = None
    anneal: Optional[float] = None
    hidden: Optional[tuple[int, ...]] = (100, 100)
    activation: str = "tanh"
    norm: str = "none"
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
        check_model_norm(self.model, self.norm)
        if not 0 < self.fraction_step <= 1:
            raise ValueError(f"fraction_step must be in (0, 1], got {self.fraction_step!r}")
        for key in ("warm_start", "anneal"):  # shares of the epochs for the noise criteria's recipe
            value = getattr(self, key)
            if value is not None and (not is_number(value) or not 0 <= value < 1):
                raise ValueError(f"{key} must be a share of the epochs in [0, 1) or None, got {value!r}")
        self.budget()  # validates epochs, rounds, batch size and lr

    def budget(self) -> Budget:
        """The :class:`~bmrs_pyro.baselines.Budget` of every method."""
        return Budget(epochs=self.epochs, finetune_epochs=self.finetune_epochs,
                      finetune_lr_factor=self.finetune_lr_factor, rounds=self.rounds,
                      round_epochs=self.round_epochs, batch_size=self.batch_size, lr=self.lr)

    def model_kwargs(self) -> dict:
        """Keyword arguments of :func:`bmrs_pyro.models.build` beyond shape and classes."""
        kwargs = {"hidden": self.hidden, "activation": self.activation} if self.model == "mlp" else {}
        if self.norm != "none":
            kwargs["norm"] = self.norm
        return kwargs

    def method_options(self, name: str) -> dict:
        """The options this comparison passes to method ``name`` (the sweep grid, the warm start and
        the anneal where it has them)."""
        defaults = get_method(name).defaults
        options = {"fraction_step": self.fraction_step} if "fraction_step" in defaults else {}
        for key in ("warm_start", "anneal"):
            if getattr(self, key) is not None and key in defaults:
                options[key] = float(getattr(self, key))
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
    key = json.dumps([config.data, seed, config.data_options], sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) > 16:
            _DATA_CACHE.clear()
        _DATA_CACHE[key] = load(config.data, seed=seed, **config.data_options)
    return _DATA_CACHE[key]


def _builder(config: CompareConfig, data) -> Callable[[], torch.nn.Module]:
    kwargs = config.model_kwargs()
    return lambda: build(config.model, data.input_shape, data.num_classes, **kwargs)


def check_config(config: CompareConfig) -> None:
    """Load the data of seed 0 and build the model once, so bad names fail before any training."""
    if config.data not in DATASETS:
        raise ValueError(f"unknown data set {config.data!r}; valid data sets: {', '.join(DATASETS)}")
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; valid models: {', '.join(MODELS)}")
    data = _load_data(config, 0)
    model = _builder(config, data)()
    if not noise_modules(model):
        raise ValueError(f"model {config.model!r} has no noise layer: nothing to prune")
