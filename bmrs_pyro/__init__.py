"""bmrs-pyro: Bayesian structured pruning with Pyro and exact Bayesian model reduction.

The data flow is one way: a Pyro model with :class:`~bmrs_pyro.nn.MultiplicativeNoise` layers
-> :class:`~bmrs_pyro.guides.AutoTruncatedLogNormal` -> :func:`~bmrs_pyro.infer.fit` (SVI)
-> :func:`reduce` (Bayesian model reduction or a baseline criterion) -> :func:`compact`
(a smaller plain PyTorch module) -> :mod:`bmrs_pyro.analysis` (ArviZ diagnostics, figures,
reports).
"""

from .compaction import compact
from .distributions import LogUniform, TruncatedLogNormal, TruncatedNormal
from .guides import AutoTruncatedLogNormal
from .infer import evaluate, fit
from .nn import MultiplicativeNoise, NoisyClassifier
from .pruner import ReductionResult, reduce

__version__ = "0.1.0"

__all__ = [
    "AutoTruncatedLogNormal",
    "LogUniform",
    "MultiplicativeNoise",
    "NoisyClassifier",
    "ReductionResult",
    "TruncatedLogNormal",
    "TruncatedNormal",
    "compact",
    "evaluate",
    "fit",
    "reduce",
]
