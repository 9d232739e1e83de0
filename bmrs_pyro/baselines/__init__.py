"""Baseline structured-pruning methods from related work behind one interface.

Every method is a :class:`PruningMethod` with a ``name``, a ``cite`` string and
``run(model_builder, data, *, seed=0, budget=None, **options) -> MethodResult``::

    from bmrs_pyro.baselines import METHODS
    from bmrs_pyro.data import load
    from bmrs_pyro.models import mlp

    data = load("digits")
    result = METHODS["iap"].run(lambda: mlp(64, 10, hidden=(32, 32)), data, budget={"rounds": 4})
    print(result)            # the curve and the method's own stopping point

Methods (:data:`METHODS`): the multiplicative-noise criteria ``bmrs_n``, ``bmrs_u8``, ``bmrs_u4``,
``snr``, ``e_theta``, ``l2`` (:mod:`.noise_criteria`); Receding Neuron Importances ``rni``
(:mod:`.rni`); Self-Compression in Bayesian neural networks ``self_compression``
(:mod:`.self_compression`); iterative activation / L1 pruning ``iap``, ``ilp`` (:mod:`.iterative`)
and the adaptive ``aiap`` (:mod:`.aiap`). Each class docstring cites its paper and lists every
deviation from it. Add a method with :func:`register_method`.
"""

from __future__ import annotations

from ..registry import lookup, register
from .aiap import AIAP
from .common import Budget, MethodResult, PruningMethod
from .iterative import IAP, ILP
from .noise_criteria import NoiseCriterionMethod, noise_methods
from .rni import RNI
from .self_compression import SelfCompression

#: The registry of methods, by name.
METHODS: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod, *, overwrite: bool = False) -> PruningMethod:
    """Add ``method`` to :data:`METHODS` under ``method.name`` (ValueError if taken, unless ``overwrite``)."""
    return register(METHODS, method, PruningMethod, "method", overwrite=overwrite)


def get_method(name: str | PruningMethod) -> PruningMethod:
    """Look a method up by name (a :class:`PruningMethod` is returned as is)."""
    return lookup(METHODS, name, PruningMethod)


for _method in [*noise_methods().values(), RNI(), SelfCompression(), IAP(), AIAP(), ILP()]:
    register_method(_method)
del _method

__all__ = [
    "AIAP",
    "Budget",
    "IAP",
    "ILP",
    "METHODS",
    "MethodResult",
    "NoiseCriterionMethod",
    "PruningMethod",
    "RNI",
    "SelfCompression",
    "get_method",
    "register_method",
]
