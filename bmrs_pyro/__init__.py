"""bmrs-pyro: Bayesian structured pruning with Pyro and exact Bayesian model reduction."""

__version__ = "0.1.0"
