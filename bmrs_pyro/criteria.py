"""Importance criteria for structured pruning, kept apart from the pruner that applies them.

A :class:`Criterion` scores every structure of one noise layer. It either carries its own
decision ``rule`` (BMRS_N, BMRS_U: prune where dF >= -margin, margin = 1 nat by default; SNR:
prune where SNR < 1) or only ranks structures, and then :func:`bmrs_pyro.pruner.reduce` removes a
requested fraction of the lowest-ranked ones. Criteria live in the registry :data:`CRITERIA`; add one with
:func:`register_criterion`::

    def my_score(model, guide, site, layer, *, data=None, power=2.0):
        '''|E_q[theta]|^power (cite the source here).'''
        return guide.posterior(site).mean.detach() ** power

    register_criterion(Criterion("my_score", my_score, options={"power": 2.0}))

The module also maps each noise layer to the Linear/Conv layer that produces its structures and
the one that consumes them (:func:`structure_map`); the L2 criterion and the parameter count of
:mod:`bmrs_pyro.curves` use it.
"""

from __future__ import annotations

import math

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.utils.data import DataLoader

from .nn import MultiplicativeNoise, noise_mode, noise_modules
from .reduction import bits_to_log_bound, delta_f_log_normal, delta_f_log_uniform

SCOPES = ("global", "layer")
#: Layers whose output channels can be structures (groups=1 convolutions only).
PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Criterion:
    """One importance criterion.

    Attributes:
        name: registry key (``reduce(model, guide, name)``).
        score: ``score(model, guide, site, layer, *, data=None, **options) -> Tensor (S,)``; its
            docstring says what it computes and cites the source.
        rule: ``rule(scores, **rule_options) -> BoolTensor (S,)`` of structures to **keep**, for
            criteria that decide by themselves; ``None`` for ranking-only criteria, which need a
            ``fraction``.
        higher_is_important: ranking direction. True when a larger score means a more important
            structure (SNR, E[theta], L2, activation); False for BMRS, whose score is dF and a
            larger dF means "more prunable".
        default_scope: ``"global"`` (rank all layers together; for scale-free scores) or
            ``"layer"`` (rank within each layer; for scores whose scale differs per layer).
        options: accepted keyword options of ``score`` and their defaults; anything else is an error.
        label: short name of the score for tables (``"dF"``, ``"SNR"``).
        needs_data: the score needs ``data`` (e.g. activations).
        rule_options: options of the decision (not of the score) and their defaults, e.g. the
            evidence ``margin`` of the BMRS rules; passed to ``rule``, never to ``score``.
        prepare: ``prepare(options) -> options``: checks the merged options and fills in the
            defaults that depend on other options (BMRS: the margin implied by ``reference_code``).
        describe: ``describe(options) -> str``: the rule in words, for tables and reports.
        rankable: False for a criterion that must not be used with ``fraction`` (``none``).
    """

    name: str
    score: Callable[..., torch.Tensor]
    rule: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    higher_is_important: bool = True
    default_scope: str = "global"
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = "score"
    needs_data: bool = False
    rule_options: Mapping[str, Any] = field(default_factory=dict)
    prepare: Optional[Callable[[dict], dict]] = None
    describe: Optional[Callable[[dict], str]] = None
    rankable: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a criterion needs a non-empty string name")
        if not callable(self.score):
            raise ValueError(f"criterion {self.name!r}: score must be callable")
        if self.rule is not None and not callable(self.rule):
            raise ValueError(f"criterion {self.name!r}: rule must be callable or None")
        if self.default_scope not in SCOPES:
            raise ValueError(f"criterion {self.name!r}: default_scope must be one of {SCOPES}")

    @property
    def doc(self) -> str:
        """The score function's docstring: what is computed and where it comes from."""
        return (self.score.__doc__ or "").strip()

    @property
    def has_rule(self) -> bool:
        """True if the criterion decides by itself (no fraction needed)."""
        return self.rule is not None

    def importance(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores oriented so that larger = more important (for ranking)."""
        return scores if self.higher_is_important else -scores

    def check_options(self, options: Mapping[str, Any]) -> dict:
        """The criterion's defaults (score and rule options) updated by ``options``, checked and
        completed by ``prepare``; unknown names raise ValueError."""
        known = set(self.options) | set(self.rule_options)
        unknown = sorted(set(options) - known)
        if unknown:
            accepted = ", ".join(sorted(known)) or "none"
            raise ValueError(
                f"criterion {self.name!r} got unknown option(s) {unknown}; accepted options: {accepted}"
            )
        merged = dict(self.options)
        merged.update(self.rule_options)
        merged.update(options)
        return self.prepare(merged) if self.prepare is not None else merged

    def score_options(self, options: Mapping[str, Any]) -> dict:
        """The part of checked ``options`` that the score function takes."""
        return {k: v for k, v in options.items() if k in self.options}

    def decide(self, scores: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
        """The rule's keep mask for ``scores`` under checked ``options`` (rule options only)."""
        if self.rule is None:
            raise ValueError(f"criterion {self.name!r} has no rule of its own; pass a fraction")
        return self.rule(scores, **{k: options[k] for k in self.rule_options}).bool()

    def rule_text(self, options: Mapping[str, Any]) -> str:
        """The decision rule in words (``"prune where dF >= -1 nat"``), or ``""`` without a rule."""
        if self.describe is not None:
            return self.describe(dict(options))
        return "" if self.rule is None else f"{self.name}'s own rule"


#: The registry of criteria, by name.
CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion, *, overwrite: bool = False) -> Criterion:
    """Add ``criterion`` to :data:`CRITERIA` (ValueError if the name is taken, unless ``overwrite``)."""
    if not isinstance(criterion, Criterion):
        raise ValueError(f"expected a Criterion, got {type(criterion).__name__}")
    if criterion.name in CRITERIA and not overwrite:
        raise ValueError(f"a criterion named {criterion.name!r} is already registered; pass overwrite=True")
    CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str | Criterion) -> Criterion:
    """Look up a criterion by name (a :class:`Criterion` is returned as is)."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning method {name!r}; available: {sorted(CRITERIA)}")
    return CRITERIA[name]


# ---------------------------------------------------------------- posterior-based criteria


def _loc_scale(guide, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    loc, scale = guide.loc_scale(site)
    return loc.detach(), scale.detach()


#: How much the BMRS authors' public code overstates dF_N: it omits -0.5 log(2 pi). Their rule
#: "prune where their dF >= 0" is therefore "prune where the exact dF >= -0.919".
REFERENCE_CODE_OFFSET = 0.5 * math.log(2.0 * math.pi)

#: The default evidence margin of the BMRS rules, in nats: keep a structure only when the log
#: evidence for keeping it, -dF, is at least this. 1 nat is the boundary of "positive" evidence
#: on Kass & Raftery's scale (J. Am. Stat. Assoc. 90, 1995: 2 ln B >= 2); below it the evidence is
#: "not worth more than a bare mention" and the smaller network wins. A constant of the evidence
#: scale, never tuned per task.
DEFAULT_MARGIN = 1.0


def resolve_margin(margin: Optional[float] = None, reference_code: bool = False) -> float:
    """The evidence margin a BMRS decision uses (nats): ``margin``, or its default.

    ``margin=None`` means :data:`DEFAULT_MARGIN` (1 nat), or ``0.5 log(2 pi)`` with
    ``reference_code=True`` (the decisions of the authors' public code). ``margin=0`` is the
    strict Bayes-factor rule ``dF >= 0``. Raises ValueError for a negative or non-finite margin,
    and for ``reference_code=True`` together with a different explicit margin.
    """
    if not isinstance(reference_code, bool):
        raise ValueError(f"reference_code must be True or False, got {reference_code!r}")
    if margin is None:
        return REFERENCE_CODE_OFFSET if reference_code else DEFAULT_MARGIN
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(
            f"margin must be a finite number of nats >= 0 (1 = Kass & Raftery's 'positive evidence', "
            f"0 = the strict rule dF >= 0), got {margin!r}"
        )
    if reference_code and abs(float(margin) - REFERENCE_CODE_OFFSET) > 1e-12:
        raise ValueError(
            f"reference_code=True is the margin 0.5 log(2 pi) = {REFERENCE_CODE_OFFSET:.6f}; "
            f"it cannot be combined with margin={margin!r} (pass one or the other)"
        )
    return float(margin)


def bmrs_n_score(model, guide, site, layer, *, data=None, reduced_loc=None, reduced_scale=1e-6) -> torch.Tensor:
    """BMRS_N: dF of swapping the log-uniform prior for TruncatedNormal(reduced_loc, reduced_scale^2).

    Wright, Igel & Selvan, "BMRS: Bayesian Model Reduction for Structured Pruning", NeurIPS 2024.
    ``reduced_loc`` defaults to the layer's ``low`` (a near point mass at theta = e^low), and
    ``reduced_scale`` to 1e-6 as in the paper. Exact closed form
    (:func:`bmrs_pyro.reduction.delta_f_log_normal`, float64). Rule: prune where
    dF >= -margin (see :func:`resolve_margin`; ``reference_code=True`` reproduces the authors'
    public code, whose dF lacks the -0.5 log(2 pi) term, as the margin 0.919).
    """
    loc, scale = _loc_scale(guide, site)
    return delta_f_log_normal(loc, scale, layer.low, layer.high, reduced_loc=reduced_loc, reduced_scale=reduced_scale)


def bmrs_u_score(model, guide, site, layer, *, data=None, bits=8, reduced_low=None) -> torch.Tensor:
    """BMRS_U-k: dF of shrinking the prior on log theta to Uniform(reduced_low, log 2^-bits).

    Wright, Igel & Selvan, NeurIPS 2024 (BMRS_U-8 and BMRS_U-4 in the paper). ``reduced_low``
    defaults to the layer's ``low``; the authors' code uses ``log 2^-23`` (pass
    ``reduced_low=bits_to_log_bound(23)``), with which a posterior sitting at ``low`` has dF = -inf
    and is never pruned. Exact closed form (:func:`bmrs_pyro.reduction.delta_f_log_uniform`).
    Rule: prune where dF >= -margin (1 nat by default); with ``margin=0`` that is where the
    posterior puts at least as much mass below ``log 2^-bits`` as the prior does.
    """
    loc, scale = _loc_scale(guide, site)
    low = layer.low if reduced_low is None else float(reduced_low)
    return delta_f_log_uniform(
        loc, scale, layer.low, layer.high, reduced_low=low, reduced_high=bits_to_log_bound(bits)
    )


def snr_score(model, guide, site, layer, *, data=None) -> torch.Tensor:
    """Signal-to-noise ratio E_q[theta] / sd_q[theta] of the multiplicative noise.

    Neklyudov, Molchanov, Ashukha & Vetrov, "Structured Bayesian Pruning via Log-Normal
    Multiplicative Noise", NeurIPS 2017: structures with SNR < 1 are removed (the BMRS paper's SNR
    baseline). Higher SNR = more important.
    """
    return guide.posterior(site).signal_to_noise.detach().to(torch.float64)


def e_theta_score(model, guide, site, layer, *, data=None) -> torch.Tensor:
    """Posterior mean E_q[theta] of the multiplicative noise (the BMRS paper's E[theta] baseline).

    Ranking only: the network's deterministic test-time scale of each structure. Higher = more
    important. Wright, Igel & Selvan, NeurIPS 2024, Section 5.
    """
    return guide.posterior(site).mean.detach().to(torch.float64)


def _bmrs_keep(scores: torch.Tensor, *, margin: float = DEFAULT_MARGIN, reference_code: bool = False) -> torch.Tensor:
    # prepare() has resolved the margin (reference_code included), so only dF >= -margin counts here.
    return ~(scores >= -float(margin))


def _bmrs_prepare(options: dict) -> dict:
    options = dict(options)
    options["margin"] = resolve_margin(options.get("margin"), options.get("reference_code", False))
    if "bits" in options:
        bits = options["bits"]
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not (0 < bits < math.inf):
            raise ValueError(f"bits must be a positive number (the reduced prior ends at log 2^-bits), got {bits!r}")
    return options


def _nats(x: float) -> str:
    return f"{x:g} nat" if x == 1 else f"{x:g} nats"


def _bmrs_describe(options: dict) -> str:
    margin = float(options["margin"])
    if options.get("reference_code"):
        return (f"prune where dF >= -{margin:.3f} nats (the authors' public code: their dF lacks "
                f"-0.5 log 2pi and they prune where it is >= 0)")
    if margin == 0:
        return "prune where dF >= 0 (strict Bayes-factor rule, margin 0)"
    return f"prune where dF >= -{_nats(margin)} (keep a structure only with at least {_nats(margin)} of evidence for it)"


def _snr_keep(scores: torch.Tensor) -> torch.Tensor:
    return scores >= 1


def _keep_all(scores: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(scores, dtype=torch.bool)


# ---------------------------------------------------------------- the network around a noise layer


@dataclass
class StructureLinks:
    """The layers around one noise layer in a feed-forward (Sequential-style) network.

    ``producer`` is the Linear/Conv whose output channels are the structures (its output rows /
    filters), ``norms`` the BatchNorm layers between it and the noise layer, ``consumer`` the next
    Linear/Conv reading them and ``columns_per_structure`` how many of the consumer's input columns
    each structure owns (1, or H*W after a conv -> flatten -> linear transition).
    """

    site: str
    layer: MultiplicativeNoise
    producer_name: Optional[str] = None
    producer: Optional[nn.Module] = None
    norms: list = field(default_factory=list)
    consumer_name: Optional[str] = None
    consumer: Optional[nn.Module] = None
    columns_per_structure: int = 1


def _out_channels(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return module.out_channels
    return None


def _in_channels(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return module.in_channels
    return None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, MultiplicativeNoise) or not any(True for _ in m.children())
    ]


def _rows(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    size = None
    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v) and v.dim() >= 1:
            size = v.shape[0]
            break

    def cut(v):
        return v[:n] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size else v

    return tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()}


def example_input(model: nn.Module, guide=None, data=None) -> Optional[tuple[tuple, dict]]:
    """A small input batch ``(args, kwargs)`` for tracing ``model``, or None if none is known.

    Taken from ``data`` (``(X, y)``, ``X`` or a DataLoader), else from the inputs the guide saw when
    it first ran (its prototype trace), found through ``guide`` or the noise layers' attached guide.
    """
    if data is not None:
        x = _first_input(data)
        return (x[:2],), {}
    guides = [guide] if guide is not None else []
    for layer in noise_modules(model).values():
        ref = layer._guide() if layer._guide is not None else None
        if ref is not None:
            guides.append(ref)
    for g in guides:
        trace = getattr(g, "prototype_trace", None)
        if trace is not None and "_INPUT" in trace.nodes:
            node = trace.nodes["_INPUT"]
            return _rows(tuple(node["args"]), dict(node["kwargs"]), 2)
    return None


@contextlib.contextmanager
def _quiet_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses running stats and keeps them), no grad, no Pyro side effects."""
    training = {m: m.training for m in model.modules()}
    rng = pyro.util.get_rng_state()
    model.eval()
    try:
        with torch.no_grad(), poutine.block():
            yield
    finally:
        for m, t in training.items():
            m.training = t
        pyro.util.set_rng_state(rng)


def _execution_order(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, nn.Module, tuple]]:
    calls: list = []
    seen: set = set()
    handles = []
    for name, module in _leaves(model):
        def hook(mod, inputs, output, name=name):
            if id(mod) not in seen and torch.is_tensor(output):
                seen.add(id(mod))
                calls.append((name, mod, tuple(output.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        # Sample mode draws theta from the prior, so no guide is needed just to see the order.
        with _quiet_eval(model), noise_mode(model, "sample"):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def structure_map(model: nn.Module, inputs: Optional[tuple[tuple, dict]] = None) -> dict[str, StructureLinks]:
    """For every noise site, the layer producing its structures and the layer consuming them.

    With ``inputs`` (``(args, kwargs)`` for ``model``, see :func:`example_input`) the modules are
    ordered by a traced forward pass, which is right whatever order they were registered in;
    otherwise by ``model.named_modules()``, which is right for Sequential-style backbones. The
    producer is the last Linear/Conv (groups=1) before the noise layer with as many outputs as the
    layer has structures; the consumer is the first Linear/Conv after it whose inputs are a
    multiple of them. Residual connections are not followed.
    """
    layers = noise_modules(model)
    if inputs is not None:
        order = [(name, mod) for name, mod, _ in _execution_order(model, *inputs)]
    else:
        order = _leaves(model)
    position = {id(mod): i for i, (_, mod) in enumerate(order)}
    links = {}
    for site, layer in layers.items():
        link = StructureLinks(site, layer)
        links[site] = link
        if id(layer) not in position:
            continue
        at = position[id(layer)]
        s = layer.num_structures
        for i in range(at - 1, -1, -1):
            name, mod = order[i]
            if isinstance(mod, NORM_TYPES) and mod.num_features == s:
                link.norms.append((name, mod))
            if isinstance(mod, PRODUCER_TYPES):
                # the nearest Linear/Conv upstream; it produces the structures only if it fits
                if _out_channels(mod) == s:
                    link.producer_name, link.producer = name, mod
                break
        if link.producer is None:
            link.norms = []
        for name, mod in order[at + 1 :]:
            if not isinstance(mod, PRODUCER_TYPES):
                continue
            n_in = _in_channels(mod)
            if n_in is None:  # grouped convolution: not handled
                break
            # n_in == s, or a Linear after flattening (C, H, W) maps channel-major: H*W columns each
            flattened = isinstance(mod, nn.Linear) and layer.channel_dim != -1 and n_in % s == 0
            if n_in == s or flattened:
                link.consumer_name, link.consumer = name, mod
                link.columns_per_structure = n_in // s
            break
    return links


def l2_score(model, guide, site, layer, *, data=None) -> torch.Tensor:
    """L2 norm of the weights into each structure (the BMRS paper's weight-norm baseline).

    For a Linear producer the norm of its output row, for a Conv the norm of its output filter
    over input channels and kernel; the bias is not included. The producer is the Linear/Conv
    feeding the noise layer (:func:`structure_map`). Higher = more important. Wright, Igel &
    Selvan, NeurIPS 2024; the classic magnitude criterion of Li et al., "Pruning Filters for
    Efficient ConvNets", ICLR 2017 (there with the L1 norm).
    """
    links = structure_map(model, example_input(model, guide, data))
    producer = links[site].producer
    if producer is None:
        raise ValueError(
            f"l2: found no Linear/Conv layer with {layer.num_structures} outputs feeding {site}; "
            "the L2 criterion needs the noise layer to follow one (Linear -> act -> noise)"
        )
    w = producer.weight.detach().to(torch.float64)
    return w.reshape(w.shape[0], -1).norm(dim=1)


def _first_input(data) -> torch.Tensor:
    if torch.is_tensor(data):
        return data
    if isinstance(data, DataLoader):
        batch = next(iter(data))
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(data, (tuple, list)) and data and torch.is_tensor(data[0]):
        return data[0]
    raise ValueError(f"data must be (X, y), X or a DataLoader, got {type(data).__name__}")


def _input_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, DataLoader):
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        return
    x = _first_input(data)
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def activation_score(model, guide, site, layer, *, data=None, batch_size=1024) -> torch.Tensor:
    """Mean |activation| of each structure after the noise layer, in mean mode, over ``data``.

    The activation-based criterion of Zhao, Jain & Zhao, "Iterative Activation-based Structured
    Pruning" (IAP/AIAP), 2022: average the absolute output of each unit/channel over the
    examples (and spatial positions). The network runs deterministically (theta = E_q[theta] *
    mask, BatchNorm in eval mode). Higher = more important.
    """
    if data is None:
        raise ValueError("the activation criterion needs data: pass data=(X, y) (training data)")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    total = torch.zeros(layer.num_structures, dtype=torch.float64)
    count = 0

    def hook(mod, inputs, output):
        nonlocal total, count
        dim = mod.channel_dim if mod.channel_dim > 0 else output.dim() + mod.channel_dim
        a = output.detach().abs().to(torch.float64).movedim(dim, -1).reshape(-1, mod.num_structures)
        total += a.sum(0).cpu()
        count += a.shape[0]

    handle = layer.register_forward_hook(hook)
    try:
        with _quiet_eval(model), noise_mode(model, "mean"):
            for x in _input_batches(data, batch_size):
                model(x)
    finally:
        handle.remove()
    if count == 0:
        raise ValueError(f"activation: {site} was never reached by the data (is data empty?)")
    return total / count


register_criterion(Criterion("bmrs_n", bmrs_n_score, _bmrs_keep, higher_is_important=False,
                             options={"reduced_loc": None, "reduced_scale": 1e-6},
                             rule_options={"margin": None, "reference_code": False},
                             prepare=_bmrs_prepare, describe=_bmrs_describe, label="dF"))
register_criterion(Criterion("bmrs_u", bmrs_u_score, _bmrs_keep, higher_is_important=False,
                             options={"bits": 8, "reduced_low": None}, rule_options={"margin": None},
                             prepare=_bmrs_prepare, describe=_bmrs_describe, label="dF"))
# "none": the same training and the same exact dF (BMRS_N) to look at, nothing removed; the
# baseline a pruned run is compared with.
register_criterion(Criterion("none", bmrs_n_score, _keep_all, higher_is_important=False,
                             describe=lambda options: "keep every structure (no pruning; dF is BMRS_N's, for reference)",
                             label="dF", rankable=False))
register_criterion(Criterion("snr", snr_score, _snr_keep, describe=lambda options: "prune where SNR < 1",
                             label="SNR"))
register_criterion(Criterion("e_theta", e_theta_score, label="E[theta]"))
register_criterion(Criterion("l2", l2_score, default_scope="layer", label="L2"))
register_criterion(Criterion("activation", activation_score, default_scope="layer",
                             options={"batch_size": 1024}, label="|act|", needs_data=True))

__all__ = [
    "CRITERIA",
    "Criterion",
    "DEFAULT_MARGIN",
    "REFERENCE_CODE_OFFSET",
    "StructureLinks",
    "activation_score",
    "bmrs_n_score",
    "bmrs_u_score",
    "e_theta_score",
    "example_input",
    "get_criterion",
    "l2_score",
    "register_criterion",
    "resolve_margin",
    "snr_score",
    "structure_map",
]
