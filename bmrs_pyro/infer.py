"""Training of multiplicative-noise Pyro models: ``fit``, a thin loop over a Pyro ELBO.

Each step is what ``pyro.infer.SVI.step`` does (loss, backward, one optimiser step), with the
minibatch likelihood scaled by N/B (:class:`ScaleObserved`), a progress bar, a divergence check
and callbacks between epochs (:mod:`bmrs_pyro.callbacks`; continuous pruning is one). The loop
itself, :func:`run_epoch`, is also the deterministic baselines' trainer. Evaluation lives in
:mod:`bmrs_pyro.evaluation`, the optimiser and the freezing of pruned structures in
:mod:`bmrs_pyro.optim`, batching in :mod:`bmrs_pyro.batching`; their public names are
re-exported here.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from .batching import Data, as_tensors, check_positive, dataset_size, iterate_batches, num_batches
from .callbacks import DEFAULT_PRUNE_WARMUP, PruneEvery
from .checks import check_data, is_number
from .distributed import resolve as resolve_distributed
from .elbo import MeanFieldNoiseELBO, WeightedTrace_ELBO, WeightedTraceMeanField_ELBO, check_kl_weight
from .evaluation import _evaluate, evaluate  # noqa: F401  (re-exported)
from .nn import noise_mode, noise_modules
from .optim import adam, freeze_pruned, param_groups, trainable_parameters
from .rng import capture_rng, restore_rng

_adam = adam  # the name runs.py imports

__all__ = ["fit", "evaluate", "History", "TrainingDivergedError", "ScaleObserved", "iterate_batches",
           "minibatch_loss", "make_elbo", "deterministic_loss", "run_epoch", "warm_start_epochs_for",
           "WARM_START_FRACTION", "ANNEAL_FRACTION", "ANNEAL_FACTOR", "anneal_epochs_for", "DEFAULT_PRUNE_WARMUP",
           "PruneEvery"]

#: The training recipe's default (issue 11): the share of the epoch budget that ``bmrs run``,
#: ``bmrs compare`` and ``make results`` spend on the deterministic warm start of :func:`fit`
#: before SVI. :func:`fit` itself defaults to no warm start.
WARM_START_FRACTION = 0.25


def warm_start_epochs_for(epochs: int, fraction: float = WARM_START_FRACTION) -> int:
    """The warm-start epochs of a budget: ``round(fraction * epochs)``, at most ``epochs - 1`` so
    that at least one SVI epoch remains (0 for ``fraction`` 0). Raises ValueError unless
    ``0 <= fraction < 1``."""
    _check_fraction("warm-start", fraction)
    check_positive("epochs", epochs, int)
    return min(int(round(fraction * epochs)), epochs - 1)


def _check_fraction(what: str, fraction) -> None:
    """ValueError unless ``fraction`` is a share of an epoch budget in [0, 1)."""
    if not is_number(fraction) or not 0 <= fraction < 1:
        raise ValueError(f"the {what} fraction must be in [0, 1), got {fraction!r}")


#: The training recipe's learning-rate anneal (issue 11): ``bmrs run``, ``bmrs compare`` and
#: ``make results`` train the network's weights for the last ``ANNEAL_FRACTION`` of the epoch budget
#: at ``ANNEAL_FACTOR`` times their learning rate (:func:`fit`'s ``anneal_epochs``). At a constant
#: rate the weights end wherever the last minibatches left them; one epoch at a tenth of the rate
#: added about 2 points of test accuracy on MNIST-1D. :func:`fit` itself defaults to no anneal.
ANNEAL_FRACTION = 0.1
ANNEAL_FACTOR = 0.1


def anneal_epochs_for(epochs: int, fraction: float = ANNEAL_FRACTION) -> int:
    """The anneal epochs of a budget: ``round(fraction * epochs)`` (0 for ``fraction`` 0).
    Raises ValueError unless ``0 <= fraction < 1``."""
    _check_fraction("anneal", fraction)
    check_positive("epochs", epochs, int)
    return int(round(fraction * epochs))


def _set_weight_lr(optimizer: torch.optim.Optimizer, guide, rate: float) -> None:
    """Set the learning rate of every Adam group that holds network weights (the groups holding
    only the guide's variational parameters keep theirs)."""
    variational = {id(p) for p in guide.parameters()} if isinstance(guide, torch.nn.Module) else set()
    for group in optimizer.param_groups:
        if any(id(p) not in variational for p in group["params"]):
            group["lr"] = rate


def _check_epoch_share(name: str, value, most: int, most_text: str, why: str) -> None:
    """ValueError unless ``value`` is an int in [0, ``most``] (a part of ``fit``'s epochs)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ValueError(f"{name} must be an int in [0, {most_text}] ({why}), got {value!r}")


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


LOSSES = ("meanfield", "trace")


def make_elbo(loss: str = "meanfield", num_particles: int = 1, *, kl_weight: float = 1.0) -> ELBO:
    """The ELBO object for ``loss``: ``"meanfield"`` (analytic KL; our one-pass
    :class:`~bmrs_pyro.elbo.MeanFieldNoiseELBO`, or Pyro's ``TraceMeanField_ELBO`` for several
    particles) or ``"trace"`` (``Trace_ELBO``), with the KL term times ``kl_weight``."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a pyro.infer.ELBO, got {loss!r}")
    if loss == "trace":
        return WeightedTrace_ELBO(num_particles=num_particles, kl_weight=kl_weight)
    if num_particles != 1:
        return WeightedTraceMeanField_ELBO(num_particles=num_particles, kl_weight=kl_weight)
    return MeanFieldNoiseELBO(kl_weight=kl_weight)


def minibatch_loss(model: Callable, guide: Callable, x: torch.Tensor, y: torch.Tensor, *, dataset_size: int,
                   kl_weight: Optional[float] = None, loss: str = "meanfield", elbo: Optional[ELBO] = None
                   ) -> torch.Tensor:
    """Differentiable negative ELBO of one minibatch, on the scale of the whole data set.

    ``-(N/B) sum_batch log p(y_i | x_i, theta_i) + kl_weight * sum_structures KL(q || p)``;
    the KL is analytic with ``loss="meanfield"`` and a Monte Carlo estimate with ``"trace"``.
    ``elbo``: a ready ELBO object (then ``loss`` and ``kl_weight`` must not be given: the ELBO
    carries its own ``kl_weight``).
    """
    if elbo is None:
        elbo = make_elbo(loss, kl_weight=1.0 if kl_weight is None else kl_weight)
    elif kl_weight is not None:
        raise ValueError("pass kl_weight to the ELBO (e.g. MeanFieldNoiseELBO(kl_weight=...)), not with elbo=")
    scale = dataset_size / x.shape[0]

    def scaled_model(x, y):
        with ScaleObserved(scale):
            return model(x, y)

    return elbo.differentiable_loss(scaled_model, guide, x, y)


def run_epoch(step_loss: Callable, optimizer: torch.optim.Optimizer, batches: Iterable, *, bar=None,
              after_step: Optional[Callable] = None, name: Callable = "step {}".format,
              diagnose: Optional[Callable] = None, sync_gradients: Optional[Callable] = None) -> list:
    """One epoch of minibatch training, the loop every trainer shares (SVI, the warm start, the
    deterministic baselines).

    Per ``(x, y)`` of ``batches``: zero the gradients, ``loss = step_loss(x, y)``, stop with
    :class:`TrainingDivergedError` if it is NaN/inf or a distribution rejects NaN parameters
    (the message starts with ``name(i)`` for the epoch's ``i``-th step and goes on with
    ``diagnose(loss)`` when given), backward, ``sync_gradients(loss)`` (data parallelism: averages
    the gradients and returns the loss averaged over ranks), ``optimizer.step()``,
    ``after_step()``, advance ``bar``. Returns the loss values.
    """
    values = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        try:
            loss_value = step_loss(x, y)
        except ValueError as err:  # e.g. a distribution rejecting NaN logits
            if isinstance(err, TrainingDivergedError) or ("nan" not in str(err).lower()
                                                          and "invalid values" not in str(err)):
                raise
            raise TrainingDivergedError(f"{name(len(values))}: non-finite values in the model: "
                                        f"{_first_line(err)}") from err
        value = loss_value.item()  # one read of the scalar serves the check and the history
        if not math.isfinite(value):
            detail = diagnose(loss_value) if diagnose is not None else (
                f"the loss is {value} (check the learning rate and the data for NaN/inf)")
            raise TrainingDivergedError(f"{name(len(values))}: {detail}")
        loss_value.backward()
        if sync_gradients is not None:
            value = sync_gradients(loss_value)
        optimizer.step()
        if after_step is not None:
            after_step()
        values.append(value)
        if bar is not None:
            bar.update(1)
    return values


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error message, without the tensor dump torch.distributions appends."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(" but found invalid values")[0].rstrip(",")
    return text if len(text) <= limit else text[:limit] + "..."


def _diagnose_nan(guide, loss: torch.Tensor) -> str:
    for name, p in getattr(guide, "named_parameters", lambda: [])():
        bad = ~torch.isfinite(p)
        if bad.any():
            return (f"loss {loss.item()}; guide parameter {name} has {int(bad.sum())} non-finite values "
                    f"(e.g. {p[bad].flatten()[0].item()})")
    return f"the loss is {loss.item()} (check the learning rate and the data for NaN/inf)"


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
    loss="meanfield",
    warm_start_epochs: int = 0,
    anneal_epochs: int = 0,
    anneal_factor: float = ANNEAL_FACTOR,
    progress: bool = True,
    prune_every: Optional[int] = None,
    prune_method: str = "bmrs_n",
    prune_options: Optional[dict] = None,
    prune_start: Optional[int] = None,
    start_epoch: int = 0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    history: Optional[History] = None,
    rng_state: Optional[dict] = None,
    distributed: Any = None,
) -> History:
    """Fit a multiplicative-noise Pyro model by SVI and return the ELBO history.

    The model is ordinary Pyro: layers with :class:`~bmrs_pyro.nn.MultiplicativeNoise`, then
    ``with pyro.plate("data", x.shape[0]): pyro.sample("obs", ..., obs=y)``. Each step is an
    ``SVI.step`` of the loss (``MeanFieldNoiseELBO(kl_weight=kl_weight)`` by default) on the model
    with its observed sites scaled by N/B, so it minimises

        -(N/B) sum_batch log p(y_i | x_i, theta_i) + kl_weight * sum_structures KL(q || p).

    ``kl_weight=1`` is the true ELBO. The BMRS authors' loss (mean cross-entropy + mean KL per
    structure, averaged over layers) corresponds to kl_weight ~ N / (num_layers * structures per
    layer), a much heavier KL. Structures masked at any time (before the call, by a callback)
    keep their variational parameters (:func:`bmrs_pyro.optim.freeze_pruned`).

    Args:
        train_data: ``(X, y)`` tensors (minibatches sliced from them) or a ``DataLoader``.
        lr, guide_lr: Adam learning rates of the network's weights and of the variational
            parameters (default: ``lr`` for both). Adam moves a parameter by about its learning
            rate per step, and log theta lives on [-20, 0]: on a small data set (digits: 12 steps
            an epoch) a posterior needs a larger rate than the weights, e.g. 0.05.
        loss: ``"meanfield"`` (analytic KL), ``"trace"`` (``Trace_ELBO``, Monte Carlo KL), or a
            ``pyro.infer.ELBO`` object (then ``kl_weight`` must be 1: the object has its own).
        callbacks: called as ``callback(epoch, history, model, guide)`` after every epoch;
            returning ``True`` stops training; an optional ``begin(**context)`` method is called
            first (see :mod:`bmrs_pyro.callbacks`). ``history.rng_state`` holds the random state
            to continue from when each callback runs (for checkpoints).
        warm_start_epochs: the first ``warm_start_epochs`` of the ``epochs`` (counted inside
            them) train the deterministic twin of the network: every noise layer in ``"off"``
            mode (theta = 1), loss ``-(N/B) sum_batch log p(y_i | x_i, theta=1)``, no KL, the
            same Adam (the weights' group at ``lr``); the variational parameters are not touched,
            and no continuous pruning happens then. ``History.warm_start`` records them. The
            model's only latent sites must be its noise layers. 0 (default): SVI from the start.
        anneal_epochs, anneal_factor: the last ``anneal_epochs`` of the ``epochs`` (counted from
            the end of this call, so a resumed run anneals the same epochs) train the network's
            weights at ``anneal_factor * lr`` (default 0.1); the variational parameters keep
            ``guide_lr`` (with ``guide_lr=None`` one Adam group holds both, and both anneal). The
            other epochs set the weights' rate back to ``lr``. ``History.events`` records the
            start. 0 (default): the learning rates are never touched.
        prune_every, prune_method, prune_options, prune_start: shorthand for
            ``callbacks=[PruneEvery(prune_every, prune_method, prune_options, start=prune_start),
            *callbacks]`` (:class:`~bmrs_pyro.callbacks.PruneEvery`: continuous pruning, guarded;
            default start: a quarter of the SVI epochs after the warm start).
        start_epoch, optimizer, history: to resume an interrupted run.
        rng_state: the random state to continue from (:func:`bmrs_pyro.rng.capture_rng`, as
            saved in a checkpoint) instead of seeding with ``seed``: a run resumed at an epoch
            boundary draws the same numbers as the uninterrupted run and ends bit-identical on CPU.
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
    check_positive("epochs", epochs, int)
    check_positive("batch_size", batch_size, int)
    check_positive("lr", lr)
    if guide_lr is not None:
        check_positive("guide_lr", guide_lr)
    kl_weight = check_kl_weight(kl_weight)
    if isinstance(loss, ELBO):
        if kl_weight != 1.0:
            raise ValueError("with an ELBO object as loss, give kl_weight to the ELBO, not to fit")
        elbo = loss
    else:
        elbo = make_elbo(loss, kl_weight=kl_weight)
    _check_epoch_share("warm_start_epochs", warm_start_epochs, epochs, f"epochs={epochs}",
                       "the warm start is counted inside epochs")
    _check_epoch_share("anneal_epochs", anneal_epochs, epochs - warm_start_epochs,
                       f"epochs - warm_start_epochs = {epochs - warm_start_epochs}", "the anneal is the end of the SVI epochs")
    check_positive("anneal_factor", anneal_factor)
    if prune_every is not None:
        callbacks = [PruneEvery(prune_every, prune_method, prune_options, start=prune_start), *callbacks]
    train_data = as_tensors(train_data, "train_data")
    dp = resolve_distributed(distributed)
    shard = None
    if dp is not None:
        if not isinstance(train_data, tuple):
            raise ValueError("distributed fit needs train_data as (X, y) tensors (each rank shards them with a "
                             "DistributedSampler), not a DataLoader")
        batch_size, shard = dp.local_batch(batch_size), dp.shard
    if isinstance(model, torch.nn.Module):
        model.to(device)
    if isinstance(guide, torch.nn.Module):
        guide.to(device)
    check_data(train_data, model, name="train_data", device=device)  # before any random number is drawn

    generator = torch.Generator()
    if rng_state is None:
        pyro.set_rng_seed(seed)
        generator.manual_seed(seed + start_epoch)
    else:
        restore_rng(rng_state, generator)
    n = dataset_size(train_data)
    history = history if history is not None else History()
    for callback in callbacks:
        if hasattr(callback, "begin"):
            callback.begin(train_data=train_data, start_epoch=start_epoch, epochs=epochs,
                           warm_start_epochs=warm_start_epochs, distributed=dp)
    optimizer, params = _setup_training(model, guide, train_data, batch_size, n, elbo, lr, guide_lr, optimizer,
                                        device, rng_state is not None, dp)
    sync = (lambda loss_value: dp.average_gradients(params, loss_value)) if dp is not None else None
    frozen = freeze_pruned(model, guide, optimizer)  # structures masked before this call stay put

    def svi_loss(x, y):
        return minibatch_loss(model, guide, x, y, dataset_size=n, elbo=elbo)

    def warm_loss(x, y):
        return deterministic_loss(model, x, y, dataset_size=n)

    bar = tqdm(total=epochs * num_batches(train_data, batch_size, shard), disable=not progress, desc="SVI", unit="step",
               leave=False)
    try:
        for epoch in range(start_epoch, start_epoch + epochs):
            t0 = time.perf_counter()
            if dp is not None:  # independent noise on ranks > 0, reproducible across a resume
                dp.seed_noise(seed, epoch)
            batches = iterate_batches(train_data, batch_size, shuffle=True, generator=generator, device=device,
                                      shard=shard)
            if anneal_epochs:  # set every epoch, from the arguments: a resumed optimizer carries no schedule
                annealing = epoch >= start_epoch + epochs - anneal_epochs
                _set_weight_lr(optimizer, guide, lr * anneal_factor if annealing else lr)
                if annealing and not any(e.get("event") == "anneal_start" for e in history.events):
                    history.events.append({"epoch": epoch, "event": "anneal_start", "epochs": anneal_epochs,
                                           "factor": float(anneal_factor)})
            if epoch < start_epoch + warm_start_epochs:  # the deterministic twin: theta = 1, no KL
                values = run_epoch(warm_loss, optimizer, batches, bar=bar, sync_gradients=sync,
                                   name=lambda i, e=epoch: f"warm-start epoch {e}")
                history.warm_start.append(-sum(values) / max(len(values), 1))
                if epoch + 1 == start_epoch + warm_start_epochs:
                    history.events.append({"epoch": epoch, "event": "warm_start_end", "epochs": warm_start_epochs})
            else:
                done = len(history.loss)
                values = run_epoch(svi_loss, optimizer, batches, bar=bar, sync_gradients=sync,
                                   after_step=frozen.restore if frozen else None,
                                   name=lambda i: f"step {done + i}", diagnose=lambda v: _diagnose_nan(guide, v))
                history.loss.extend(values)
                if values:
                    history.elbo.append(-sum(values) / len(values))
                    bar.set_postfix(epoch=epoch + 1, elbo=f"{history.elbo[-1]:.4g}", refresh=False)
            history.seconds.append(time.perf_counter() - t0)
            stop = False
            history.rng_state = capture_rng(generator)  # type: ignore[attr-defined]  # for checkpoints
            for i, callback in enumerate(callbacks):
                if i:  # the state after the callbacks before this one (a reduction may draw numbers)
                    history.rng_state = capture_rng(generator)  # type: ignore[attr-defined]
                stop = bool(callback(epoch, history, model, guide)) or stop
            if callbacks:
                frozen = freeze_pruned(model, guide, optimizer)  # a callback may have pruned
            if stop:
                break
    finally:
        bar.close()
    history.optimizer = optimizer  # type: ignore[attr-defined]
    return history


def _setup_training(model, guide, data, batch_size: int, n: int, elbo, lr: float, guide_lr, optimizer, device,
                    keep_rng: bool = False, dp=None) -> tuple:
    """Create the guide's parameters (one traced pass on the first batch of ``data``) and the
    optimizer over every trainable parameter (unless given); return both. With ``keep_rng``
    (continuing a saved random state) the extra pass draws nothing from it. With data parallelism
    ``dp`` every rank starts from rank 0's parameters and masks."""
    x, y = next(iter(iterate_batches(data, batch_size, shuffle=False, device=device)))
    # One traced pass creates the guide's parameters and finds bare pyro.param sites.
    with _rng_untouched(keep_rng), poutine.trace(param_only=True) as param_trace:
        minibatch_loss(model, guide, x, y, dataset_size=n, elbo=elbo)
    params = trainable_parameters(model, guide, param_trace.trace)
    if dp is not None:
        masks = [layer.mask for layer in noise_modules(model).values()] if isinstance(model, torch.nn.Module) else []
        dp.broadcast_parameters(params + masks)
    if optimizer is None:
        optimizer = adam(param_groups(params, guide, lr, guide_lr))
    return optimizer, params


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


def _rng_untouched(active: bool):
    """Fork torch's random state (CPU and initialised CUDA devices) when ``active``."""
    if not active:
        return contextlib.nullcontext()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)
