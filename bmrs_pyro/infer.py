"""Training by SVI and evaluation of multiplicative-noise Pyro models."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checks import InputError, check_data
from .elbo import MeanFieldNoiseELBO
from .nn import noise_mode, noise_modules, set_kl_weight
from .rng import capture_rng, restore_rng

Data = Union[tuple, DataLoader]

#: Share of the epochs of a ``fit`` call with continuous pruning that pass before the first
#: reduction: posteriors start wherever they were initialised (near the prior, possibly) and BMR
#: can only tell needed from unneeded structures once the data have moved them.
DEFAULT_PRUNE_WARMUP = 0.25


#: The training recipe's default (issue 11): the share of the epoch budget that ``bmrs run``,
#: ``bmrs compare`` and ``make results`` spend on the deterministic warm start of :func:`fit`
#: before SVI. :func:`fit` itself defaults to no warm start.
WARM_START_FRACTION = 0.5


def warm_start_epochs_for(epochs: int, fraction: float = WARM_START_FRACTION) -> int:
    """The warm-start epochs of a budget: ``round(fraction * epochs)``, at most ``epochs - 1`` so
    that at least one SVI epoch remains (0 for ``fraction`` 0). Raises ValueError unless
    ``0 <= fraction < 1``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"the warm-start fraction must be in [0, 1), got {fraction!r}")
    _check_positive("epochs", epochs, int)
    return min(int(round(fraction * epochs)), epochs - 1)


class TrainingDivergedError(ValueError):
    """Raised when the loss or a parameter becomes NaN or infinite during training."""


@dataclass
class History:
    """What :func:`fit` records.

    ``elbo``: per epoch, the mean over its minibatches of the ELBO estimate (nats, on the scale
    of the whole training set). ``loss``: the negative ELBO of every step. ``events``: pruning
    events, the end of a warm start and anything callbacks add. ``seconds``: wall time per epoch
    (warm-start epochs included). ``warm_start``: per deterministic warm-start epoch of
    :func:`fit` (theta = 1, no KL), the mean over its minibatches of the log likelihood on the
    scale of the whole training set; ``elbo`` and ``loss`` only grow in SVI epochs.
    """

    elbo: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    events: list = field(default_factory=list)
    warm_start: list = field(default_factory=list)

    def __repr__(self) -> str:
        last = f"{self.elbo[-1]:.4g}" if self.elbo else "n/a"
        return f"History(epochs={len(self.elbo)}, steps={len(self.loss)}, last_elbo={last})"

    def to_dict(self) -> dict:
        return {"elbo": list(self.elbo), "loss": list(self.loss), "seconds": list(self.seconds),
                "events": list(self.events), "warm_start": list(self.warm_start)}


class ScaleObserved(Messenger):
    """Scale observed sites only (the likelihood), leaving latent sites to their own scales."""

    _bmrs_latent_neutral = True  # lets noise layers answer the one-pass ELBO directly

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.scale


_ELBOS = {"meanfield": MeanFieldNoiseELBO, "trace": Trace_ELBO}


def make_elbo(loss: str = "meanfield", num_particles: int = 1):
    """The ELBO object for ``loss``: ``"meanfield"`` (analytic KL; our one-pass implementation,
    or Pyro's ``TraceMeanField_ELBO`` for several particles) or ``"trace"`` (``Trace_ELBO``)."""
    if loss not in _ELBOS:
        raise ValueError(f"loss must be one of {tuple(_ELBOS)}, got {loss!r}")
    if loss == "meanfield" and num_particles != 1:
        return TraceMeanField_ELBO(num_particles=num_particles)
    return _ELBOS[loss](num_particles=num_particles)


def minibatch_loss(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dataset_size: int,
    kl_weight: Optional[float] = None,
    loss: str = "meanfield",
    elbo=None,
) -> torch.Tensor:
    """Differentiable negative ELBO of one minibatch, on the scale of the whole data set.

    ``-(N/B) sum_batch log p(y_i | x_i, theta_i) + kl_weight * sum_structures KL(q || p)``;
    the KL is analytic with ``loss="meanfield"`` and a Monte Carlo estimate with ``"trace"``.
    ``kl_weight`` (if given) is stored on the model's noise layers.
    """
    if kl_weight is not None and isinstance(model, torch.nn.Module):
        set_kl_weight(model, kl_weight)
    elbo = elbo if elbo is not None else make_elbo(loss)
    scale = dataset_size / x.shape[0]

    def scaled_model(x, y):
        with ScaleObserved(scale):
            return model(x, y)

    return elbo.differentiable_loss(scaled_model, guide, x, y)


def _as_tensors(data: Data, name: str) -> tuple:
    if isinstance(data, DataLoader):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputError(f"{name} must be a tuple (X, y) of tensors or a DataLoader, got {type(data).__name__}")
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise InputError(f"{name} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{name}: X has {x.shape[0]} rows but y has {y.shape[0]}; pass one label per example")
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty (0 examples); pass at least one example")
    return x, y


def iterate_batches(data: Data, batch_size: int, *, shuffle: bool, generator=None, device="cpu", shard=None):
    """Yield (x, y) minibatches from a tensor pair or a DataLoader.

    ``shard`` (data-parallel training): a function taking the epoch's index order to this rank's
    share of it (:meth:`bmrs_pyro.distributed.DataParallel.shard`)."""
    if isinstance(data, DataLoader):
        for x, y in data:
            yield x.to(device), y.to(device)
        return
    x, y = data
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if shard is not None:  # issue 14: this rank's DistributedSampler share of the same order
        order = shard(order)
        n = len(order)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx].to(device), y[idx].to(device)


def _dataset_size(data: Data) -> int:
    if isinstance(data, DataLoader):
        return len(data.dataset)
    return data[0].shape[0]


def _check_positive(name: str, value, kind=float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if kind is int and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _trainable(model, guide, param_trace=None) -> list:
    """Module parameters of model and guide, plus any bare ``pyro.param`` sites they use."""
    candidates = []
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            candidates += list(module.parameters())
    if param_trace is not None:
        for site in param_trace.nodes.values():
            value = site["value"]
            candidates.append(value.unconstrained() if hasattr(value, "unconstrained") else value)
    seen, params = set(), []
    for p in candidates:
        if p.requires_grad and p.is_leaf and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _param_groups(params: list, guide, lr: float, guide_lr: Optional[float]) -> list:
    """One Adam group, or two when the variational parameters get their own learning rate."""
    if guide_lr is None or not isinstance(guide, torch.nn.Module):
        return [{"params": params, "lr": lr}]
    variational = {id(p) for p in guide.parameters()}
    groups = [{"params": [p for p in params if id(p) not in variational], "lr": lr},
              {"params": [p for p in params if id(p) in variational], "lr": guide_lr}]
    return [g for g in groups if g["params"]]


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error message, without the tensor dump torch.distributions appends."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(" but found invalid values")[0].rstrip(",")
    return text if len(text) <= limit else text[:limit] + "..."


def _adam(groups: list) -> torch.optim.Adam:
    """Adam with the fused update (one kernel per parameter, CPU and CUDA) where every parameter
    allows it, else the multi-tensor (``foreach``) one: the same algorithm and hyperparameters
    as ``torch.optim.Adam``'s default per-tensor loop, a few operations per step instead of ~10
    per parameter."""
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(groups, fused=True) if fusable else torch.optim.Adam(groups, foreach=True)


def _diagnose_nan(guide, step: int, loss: torch.Tensor) -> str:
    for name, p in getattr(guide, "named_parameters", lambda: [])():
        bad = ~torch.isfinite(p)
        if bad.any():
            return f"step {step}: loss {loss.item()}; guide parameter {name} has {int(bad.sum())} non-finite values (e.g. {p[bad].flatten()[0].item()})"
    return f"step {step}: the loss is {loss.item()} (check the learning rate and the data for NaN/inf)"


def fit(
    model: Callable,
    guide: Callable,
    train_data: Data,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    guide_lr: Optional[float] = None,
    kl_weight: float = 1.0,
    seed: int = 0,
    callbacks: Sequence[Callable] = (),
    device: str = "cpu",
    loss: str = "meanfield",
    num_particles: int = 1,
    prune_every: Optional[int] = None,
    prune_method: str = "bmrs_n",
    prune_options: Optional[dict] = None,
    prune_start: Optional[int] = None,
    progress: bool = True,
    start_epoch: int = 0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    history: Optional[History] = None,
    rng_state: Optional[dict] = None,
    warm_start_epochs: int = 0,
    distributed: Any = None,
) -> History:
    """Fit a multiplicative-noise Pyro model by SVI and return the ELBO history.

    The model is ordinary Pyro: layers with :class:`~bmrs_pyro.nn.MultiplicativeNoise`, then
    ``with pyro.plate("data", x.shape[0]): pyro.sample("obs", ..., obs=y)``. ``fit`` scales the
    observed sites by N/B and sets ``kl_weight`` on every noise layer, so each step minimises

        -(N/B) sum_batch log p(y_i | x_i, theta_i) + kl_weight * sum_structures KL(q || p).

    ``kl_weight=1`` is the true ELBO. The BMRS authors' loss (mean cross-entropy + mean KL per
    structure, averaged over layers) corresponds to kl_weight ~ N / (num_layers * structures per
    layer), a much heavier KL.

    Args:
        train_data: ``(X, y)`` tensors or a ``DataLoader``.
        lr, guide_lr: Adam learning rates of the network's weights and of the variational
            parameters (default: ``lr`` for both). Adam moves a parameter by about its learning
            rate per step, and log theta lives on [-20, 0]: on a small data set (digits: 12 steps
            an epoch) a posterior needs a larger rate than the weights, e.g. 0.05, to get
            anywhere near where the evidence puts it within a few hundred steps.
        loss: ``"meanfield"`` (``TraceMeanField_ELBO``, analytic KL) or ``"trace"`` (``Trace_ELBO``,
            Monte Carlo KL).
        prune_every: if set, apply :func:`bmrs_pyro.reduce` with ``prune_method`` every
            ``prune_every`` epochs (continuous pruning); pruned structures stop contributing to
            the likelihood and the KL and their variational parameters stay fixed. Every
            reduction keeps at least one structure per layer unless ``prune_options`` says
            ``min_keep=0``.
        prune_options: keyword options of the reduction (``margin``, ``bits``, ``min_keep``, ...),
            and ``joint_check`` (default True): hold each BMRS reduction to its margin jointly on
            the training data (:func:`bmrs_pyro.pruner.check_jointly`), so that structures that
            are each a near-tie but together carry the fit are not removed all at once.
        prune_start: the epoch (counted from the start of training, like ``start_epoch``) after
            which the first reduction happens, then every ``prune_every`` epochs. Default:
            ``start_epoch + ceil(DEFAULT_PRUNE_WARMUP * epochs)``, a warm-up of a quarter of the
            epochs, so that no decision is taken before the data have informed the posteriors.
        callbacks: each is called as ``callback(epoch, history, model, guide)`` after every
            epoch; returning ``True`` stops training.
        start_epoch, optimizer, history: to resume an interrupted run.
        rng_state: the random state to continue from (:func:`bmrs_pyro.rng.capture_rng`, as
            saved in a checkpoint) instead of seeding with ``seed``: with it, a run resumed at an
            epoch boundary draws the same numbers (noise samples, minibatch order) as the
            uninterrupted run, and ends bit-identical on CPU. After every epoch ``fit`` stores
            the state to continue from in ``history.rng_state`` (before the callbacks run).
        warm_start_epochs: the first ``warm_start_epochs`` of the ``epochs`` (counted inside
            them, not added) train the deterministic twin of the network: every noise layer in
            ``"off"`` mode (theta = 1), loss ``-(N/B) sum_batch log p(y_i | x_i, theta=1)``, no
            KL term, the same Adam (the weights' group at ``lr``) whose state carries on into
            the SVI epochs; the variational parameters are not touched (they start SVI at their
            initial values), and no continuous-pruning step happens in these epochs (the
            pruning warm-up counts from their end). ``History.warm_start`` records them. The
            model's only latent sites must be its noise layers. 0 (default): SVI from the start.
            ``bmrs run`` and ``bmrs compare`` use a warm start by default (see the README's
            "Training recipe").
        distributed: data-parallel SVI on ``torch.distributed`` (see :mod:`bmrs_pyro.distributed`).
            None (default): used when a process group of more than one rank is initialised
            (e.g. under ``torchrun``); False: never; or a ``ProcessGroup`` /
            :class:`~bmrs_pyro.distributed.DataParallel`. Then ``batch_size`` is the global
            minibatch (a multiple of the number of ranks), each rank takes its
            ``DistributedSampler`` share, gradients and the loss are averaged over ranks once per
            step, and reductions are decided on rank 0 and broadcast. ``train_data`` must be
            tensors.

    Raises:
        ValueError: bad arguments; :class:`~bmrs_pyro.checks.InputError` (a ValueError) for data
        that cannot be used (non-finite features, labels outside ``0..C-1``, examples the model
        cannot take, empty or mismatched X/y), before any step; :class:`TrainingDivergedError`
        (a ValueError) if the loss becomes NaN/inf, naming the step and the offending site or
        parameter.
    """
    _check_positive("epochs", epochs, int)
    _check_positive("batch_size", batch_size, int)
    _check_positive("lr", lr)
    if guide_lr is not None:
        _check_positive("guide_lr", guide_lr)
    if not (isinstance(kl_weight, (int, float)) and kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if loss not in _ELBOS:
        raise ValueError(f"loss must be one of {tuple(_ELBOS)}, got {loss!r}")
    if prune_every is not None:
        _check_positive("prune_every", prune_every, int)
    if isinstance(warm_start_epochs, bool) or not isinstance(warm_start_epochs, int) or not (
            0 <= warm_start_epochs <= epochs):
        raise ValueError(f"warm_start_epochs must be an int in [0, epochs={epochs}] (the warm start is counted "
                         f"inside epochs), got {warm_start_epochs!r}")
    if prune_every is not None:
        if prune_start is None:
            svi_epochs = epochs - warm_start_epochs
            prune_start = start_epoch + warm_start_epochs + max(1, math.ceil(DEFAULT_PRUNE_WARMUP * svi_epochs))
        if isinstance(prune_start, bool) or not isinstance(prune_start, int) or prune_start < 1:
            raise ValueError(f"prune_start must be an epoch number >= 1, got {prune_start!r}")
        _check_prune_options(prune_method, prune_options or {})
    train_data = _as_tensors(train_data, "train_data")
    # --- issue 14 hook: data parallelism (bmrs_pyro/distributed.py) ---
    from .distributed import resolve as _resolve_distributed

    dp = _resolve_distributed(distributed)
    shard = None
    if dp is not None:
        if isinstance(train_data, DataLoader):
            raise ValueError("distributed fit needs train_data as (X, y) tensors (each rank shards them with a "
                             "DistributedSampler), not a DataLoader")
        batch_size, shard = dp.local_batch(batch_size), dp.shard
    # --- end of hook ---
    if isinstance(model, torch.nn.Module):
        model.to(device)
        set_kl_weight(model, kl_weight)
    if isinstance(guide, torch.nn.Module):
        guide.to(device)
    check_data(train_data, model, name="train_data", device=device)  # before any random number is drawn

    generator = torch.Generator()
    if rng_state is None:
        pyro.set_rng_seed(seed)
        generator.manual_seed(seed + start_epoch)
    else:
        restore_rng(rng_state, generator)
    n = _dataset_size(train_data)
    elbo = make_elbo(loss, num_particles)
    history = history if history is not None else History()

    params = None
    frozen = {}
    num_batches = math.ceil((n if dp is None else len(shard(torch.arange(n)))) / batch_size) \
        if not isinstance(train_data, DataLoader) else len(train_data)
    bar = tqdm(total=epochs * num_batches, disable=not progress, desc="SVI", unit="step", leave=False)
    step = len(history.loss)
    try:
        for epoch in range(start_epoch, start_epoch + epochs):
            t0 = time.perf_counter()
            epoch_elbo = []
            in_warm_start = epoch < start_epoch + warm_start_epochs
            if dp is not None:  # issue 14: independent noise on ranks > 0, reproducible across a resume
                dp.seed_noise(seed, epoch)
            if in_warm_start:  # the deterministic twin (see _deterministic_epoch); no SVI step below
                if params is None:
                    params, optimizer, frozen = _setup_training(model, guide, train_data, batch_size, n, elbo, lr,
                                                                guide_lr, optimizer, device, rng_state is not None, dp)
                _deterministic_epoch(model, train_data, batch_size, n, optimizer, generator, device, epoch, history,
                                     dp=dp, params=params)
                bar.update(num_batches)
                if epoch + 1 == start_epoch + warm_start_epochs:
                    history.events.append({"epoch": epoch, "event": "warm_start_end",
                                           "epochs": warm_start_epochs})
            svi_batches = () if in_warm_start else iterate_batches(train_data, batch_size, shuffle=True,
                                                                   generator=generator, device=device, shard=shard)
            for x, y in svi_batches:
                if params is None:
                    params, optimizer, frozen = _setup_training(model, guide, (x, y), batch_size, n, elbo, lr,
                                                                guide_lr, optimizer, device, rng_state is not None, dp)
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss_value = minibatch_loss(model, guide, x, y, dataset_size=n, elbo=elbo)
                except ValueError as err:  # e.g. a distribution rejecting NaN logits
                    if "nan" not in str(err).lower() and "invalid values" not in str(err):
                        raise
                    raise TrainingDivergedError(f"step {step}: non-finite values in the model: {_first_line(err)}") from err
                if not torch.isfinite(loss_value):
                    raise TrainingDivergedError(_diagnose_nan(guide, step, loss_value))
                loss_value.backward()
                value = dp.average_gradients(params, loss_value) if dp is not None else loss_value.item()
                optimizer.step()
                if frozen:
                    _restore_frozen(frozen)
                history.loss.append(value)
                epoch_elbo.append(-value)
                step += 1
                bar.update(1)
            if epoch_elbo:
                history.elbo.append(sum(epoch_elbo) / len(epoch_elbo))
                bar.set_postfix(epoch=epoch + 1, elbo=f"{history.elbo[-1]:.4g}")
            history.seconds.append(time.perf_counter() - t0)
            # No continuous pruning in the deterministic warm start: the posteriors have not moved.
            if prune_every is not None and not in_warm_start and _prune_due(epoch + 1, prune_start, prune_every):
                frozen = _prune(model, guide, prune_method, prune_options or {}, epoch, history, train_data, dp)
            history.rng_state = capture_rng(generator)  # type: ignore[attr-defined]  # for checkpoints
            stop = False
            for callback in callbacks:
                stop = bool(callback(epoch, history, model, guide)) or stop
            if stop:
                break
    finally:
        bar.close()
    history.optimizer = optimizer  # type: ignore[attr-defined]
    return history


def _setup_training(model, guide, data, batch_size: int, n: int, elbo, lr: float, guide_lr, optimizer, device,
                    keep_rng: bool = False, dp=None):
    """Create the guide's parameters (one traced pass on the first batch of ``data``), the list of
    trainable parameters, the optimizer (unless given) and the frozen values of masked structures.
    With ``keep_rng`` (continuing a saved random state) the extra pass draws nothing from it."""
    x, y = next(iter(iterate_batches(data, batch_size, shuffle=False, device=device)))
    # One traced pass creates the guide's parameters and finds bare pyro.param sites.
    with _rng_untouched(keep_rng), poutine.trace(param_only=True) as param_trace:
        minibatch_loss(model, guide, x, y, dataset_size=n, elbo=elbo)
    params = _trainable(model, guide, param_trace.trace)
    if dp is not None:  # issue 14: every rank starts from rank 0's parameters and masks
        masks = [layer.mask for layer in noise_modules(model).values()] if isinstance(model, torch.nn.Module) else []
        dp.broadcast_parameters(params + masks)
    if optimizer is None:
        optimizer = _adam(_param_groups(params, guide, lr, guide_lr))
    frozen = _freeze_masked(model, guide)  # structures masked before this call stay put
    return params, optimizer, frozen


def deterministic_loss(model: Callable, x: torch.Tensor, y: torch.Tensor, *, dataset_size: int) -> torch.Tensor:
    """``-(N/B) sum_batch log p(y_i | x_i, theta = 1)``: the warm-start loss of :func:`fit`.

    Every noise layer of ``model`` is put in ``"off"`` mode (theta = 1 times its mask) for the
    pass, so no noise site is sampled and there is no KL term. Raises ValueError if the model
    has another latent sample site (e.g. Bayesian weights), which a deterministic pass cannot
    handle.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError("a deterministic warm start needs the model to be a torch.nn.Module with noise layers")
    with noise_mode(model, "off"):
        trace = poutine.trace(model).get_trace(x, y)
    latent = [name for name in trace.stochastic_nodes if not site_is_subsample(trace.nodes[name])]
    if latent:
        raise ValueError(f"a deterministic warm start needs the noise layers to be the only latent sites; "
                         f"the model also samples {latent}")
    log_lik = trace.log_prob_sum(site_filter=lambda name, site: site["is_observed"])
    return -(dataset_size / x.shape[0]) * log_lik


def _deterministic_epoch(model, train_data, batch_size: int, n: int, optimizer, generator, device, epoch: int,
                         history: History, dp=None, params=()) -> None:
    """One warm-start epoch of :func:`fit`: the network with theta = 1, no KL, the guide untouched.

    Only the model's parameters receive gradients; Adam skips the variational parameters, whose
    gradients stay None. Appends the epoch's mean log likelihood to ``history.warm_start``.
    """
    log_liks = []
    shard = dp.shard if dp is not None else None
    for x, y in iterate_batches(train_data, batch_size, shuffle=True, generator=generator, device=device, shard=shard):
        optimizer.zero_grad(set_to_none=True)
        loss_value = deterministic_loss(model, x, y, dataset_size=n)
        if not torch.isfinite(loss_value):
            raise TrainingDivergedError(f"warm-start epoch {epoch}: the loss is {loss_value.item()} "
                                        "(check the learning rate and the data for NaN/inf)")
        loss_value.backward()
        value = dp.average_gradients(params, loss_value) if dp is not None else loss_value.item()
        optimizer.step()
        log_liks.append(-value)
    history.warm_start.append(sum(log_liks) / max(len(log_liks), 1))


def _rng_untouched(active: bool):
    """Fork torch's random state (CPU and initialised CUDA devices) when ``active``."""
    import contextlib

    if not active:
        return contextlib.nullcontext()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


#: Keyword arguments of a continuous-pruning step that are not the criterion's own options.
_REDUCE_ARGUMENTS = ("fraction", "scope", "respect_mask", "min_keep", "joint_check")


def _check_prune_options(method: str, options: dict) -> None:
    """Refuse an unknown method or option before the first step, not at the first reduction."""
    from .criteria import get_criterion

    criterion = get_criterion(method)
    criterion.check_options({k: v for k, v in options.items() if k not in _REDUCE_ARGUMENTS})
    if not criterion.has_rule and options.get("fraction") is None:
        raise ValueError(f"continuous pruning with {method!r} needs prune_options={{'fraction': ...}}: "
                         "it ranks structures but has no threshold of its own")


def _prune_due(done: int, prune_start: int, prune_every: int) -> bool:
    """Whether a reduction follows the ``done``-th epoch: at prune_start, then every prune_every."""
    return done >= prune_start and (done - prune_start) % prune_every == 0


def _prune(model, guide, method: str, options: dict, epoch: int, history: History, data, dp=None) -> dict:
    from .pruner import guarded_reduce, prune_event  # late import: the reduction builds on this module

    # Continuous pruning never empties a layer unless asked to (min_keep=0) and holds each BMRS
    # reduction to its margin jointly (joint_check=False turns that off).
    def decide():
        return prune_event(guarded_reduce(model, guide, method, data, **options).apply(), epoch)

    if dp is not None:  # issue 14: decided on rank 0, masks and event broadcast to every rank
        from .distributed import decide_on_rank0

        history.events.append(decide_on_rank0(model, decide, dp))
    else:
        history.events.append(decide())
    return _freeze_masked(model, guide)


def _freeze_masked(model, guide) -> dict:
    """Current values of the variational parameters of masked structures, to hold them fixed."""
    from .guides import find_noise_guide

    frozen = {}
    noise_guide = find_noise_guide(guide)  # also inside an AutoGuideList
    if not isinstance(model, torch.nn.Module) or noise_guide is None or noise_guide.prototype_trace is None:
        return frozen
    for name, layer in noise_modules(model).items():
        dead = ~layer.mask.bool()
        if name in noise_guide.site_names and dead.any():
            for store in (noise_guide.locs, noise_guide.log_scales):
                p = _raw_param(store, name)
                frozen[id(p)] = (p, dead, p.detach()[dead].clone())
    return frozen


def _raw_param(store, name: str) -> torch.Tensor:
    from .guides import deep_getattr

    *path, leaf = name.split(".")
    module = deep_getattr(store, ".".join(path)) if path else store
    return getattr(module, leaf + "_unconstrained")


def _restore_frozen(frozen: dict) -> None:
    with torch.no_grad():
        for p, dead, values in frozen.values():
            p[dead] = values


def _logits_and_obs(model, x, obs_site: str):
    trace = poutine.trace(model).get_trace(x)
    if obs_site not in trace.nodes:
        raise ValueError(f"the model has no site {obs_site!r}; pass obs_site=<name of the observation>")
    return trace.nodes[obs_site]["fn"]


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    data: Data,
    mode: str = "mean",
    *,
    num_samples: int = 32,
    batch_size: int = 1024,
    obs_site: str = "obs",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Accuracy and negative log likelihood of a classifier on ``data``.

    ``mode="mean"``: deterministic, theta = E_q[theta] * mask (the BMRS test-time rule).
    ``mode="sample"``: the posterior predictive, p(y|x) averaged over ``num_samples`` draws of
    theta from the guide. Returns ``{"accuracy", "nll"}`` (nll in nats per example). Bad data
    raise :class:`~bmrs_pyro.checks.InputError` before the first batch (see :func:`fit`).
    """
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    _check_positive("num_samples", num_samples, int)
    data = _as_tensors(data, "data")
    check_data(data, model, name="data", obs_site=obs_site, device=device)
    pyro.set_rng_seed(seed)
    # Evaluate with running BatchNorm statistics (and no dropout); restore the caller's mode.
    was_training = model.training if isinstance(model, torch.nn.Module) else False
    if was_training:
        model.eval()
    try:
        return _evaluate(model, guide, data, mode, num_samples, batch_size, obs_site, device)
    finally:
        if was_training:
            model.train()


def _evaluate(model, guide, data, mode, num_samples, batch_size, obs_site, device) -> dict:
    correct, nll, count = 0, 0.0, 0
    for x, y in iterate_batches(data, batch_size, shuffle=False, device=device):
        if mode == "mean":
            if not isinstance(model, torch.nn.Module):
                raise ValueError("mode='mean' needs the model to be a torch.nn.Module with noise layers")
            with noise_mode(model, "mean"):
                fn = _logits_and_obs(model, x, obs_site)
            log_p = _class_log_probs(fn)
        else:
            draws = []
            for _ in range(num_samples):
                guide_trace = poutine.trace(guide).get_trace(x)
                fn = _logits_and_obs(poutine.replay(model, trace=guide_trace), x, obs_site)
                draws.append(_class_log_probs(fn))
            log_p = torch.logsumexp(torch.stack(draws), 0) - math.log(num_samples)
        nll -= log_p.gather(-1, y.long().unsqueeze(-1)).sum().item()
        correct += (log_p.argmax(-1) == y).sum().item()
        count += y.shape[0]
    return {"accuracy": correct / count, "nll": nll / count}


def _class_log_probs(fn) -> torch.Tensor:
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    if not hasattr(base, "logits"):
        raise ValueError(f"evaluate needs a categorical observation, got {type(base).__name__}")
    return torch.log_softmax(base.logits, -1)
