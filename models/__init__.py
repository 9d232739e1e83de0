"""The network zoo: multiplicative-noise Pyro classifiers ready for SVI and BMRS pruning.

Every model is a :class:`bmrs_pyro.nn.NoisyClassifier` whose backbone ``net`` holds
:class:`bmrs_pyro.nn.MultiplicativeNoise` layers after the nonlinearities.
"""

from .bayesianize import bayesianize
from .lenet import lenet5
from .mlp import mlp
from ._common import NORMS
from .registry import MODELS, NORM_MODELS, build, check_model_norm
from .resnet import resnet
from .vit import vit

__all__ = ["MODELS", "NORMS", "NORM_MODELS", "bayesianize", "build", "check_model_norm", "lenet5", "mlp", "resnet",
           "vit"]
