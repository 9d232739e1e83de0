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

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from .registry import lookup, register
from .reduction import bits_to_log_bound, delta_f_log_normal, delta_f_log_uniform
from .structures import (  # the weight- and activation-based criteria, registered below; re-exported
    StructureLinks, activation_score, example_input, l2_score, structure_map,
)


SCOPES = ("global", "layer")


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
    return register(CRITERIA, criterion, Criterion, "criterion", overwrite=overwrite)


def get_criterion(name: str | Criterion) -> Criterion:
    """Look up a criterion by name (a :class:`Criterion` is returned as is)."""
    return lookup(CRITERIA, name, Criterion)


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
