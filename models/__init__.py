"""The network zoo: multiplicative-noise Pyro classifiers ready for SVI and BMRS pruning.

Every model is a :class:`bmrs_pyro.nn.NoisyClassifier` whose backbone ``net`` holds
:class:`bmrs_pyro.nn.MultiplicativeNoise` layers after the nonlinearities.
"""

from .bayesianize import bayesianize
from .lenet import lenet5
from .mlp import mlp
from .registry import MODELS, build
from .resnet import resnet
from .vit import vit

__all__ = ["MODELS", "bayesianize", "build", "lenet5", "mlp", "resnet", "vit"]
