"""The multiplicative-noise layer that turns every structure of a network into a latent theta.

A structure (hidden unit, convolution filter, attention head) is scaled by theta > 0 with a
log-uniform prior on [e^low, e^high]. The layer declares the Pyro sample site
``<module name>.theta``; :class:`bmrs_pyro.guides.AutoTruncatedLogNormal` supplies its
truncated log-normal posterior.

Loss bookkeeping. The negative ELBO we want for a data set of N examples seen in batches of B is

    -(N/B) sum_batch log p(y_i | x_i, theta_i) + kl_weight * sum_structures KL(q || p).

The observation is scaled by N/B by :func:`bmrs_pyro.infer.fit` (or by a subsampled
``pyro.plate`` in a hand-written SVI loop); ``kl_weight`` is the loss's
(``MeanFieldNoiseELBO(kl_weight=...)``), never state of a layer. The noise site must contribute
its KL exactly once whatever N and B are, so it carries its own scale: with per-example noise
each of the B examples has its own draw of theta (lower-variance gradients), and the site is
scaled by 1 / B; with ``noise="global"`` there is one draw per batch, scale 1.

Shapes. The structures are the site's event dimension (``.to_event(1)``), so the site adds at
most one plate dimension (the examples, at dim -1, like a data plate) and ``Predictive`` returns
``(num_samples, batch)`` for an observation in a data plate. Pruned structures are masked inside
the distribution (``.mask(keep)`` before ``.to_event(1)``), so they drop out of log densities and
KL alike. The same context (plate, scale) and distribution shape are used by the model and by
the guide, so Pyro sees identical sites in both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from pyro.poutine.indep_messenger import IndepMessenger

from ._active_elbo import ACTIVE, active_noise_elbo
from .distributions import LogUniform

NOISE_MODES = ("example", "global")
PREDICT_MODES = ("sample", "mean")
#: Every mode a noise layer accepts: the prediction modes and ``"off"`` (theta = 1, the
#: deterministic twin, used by the warm start of :func:`bmrs_pyro.infer.fit`).
LAYER_MODES = PREDICT_MODES + ("off",)
#: ``infer`` key that marks a sample site as a multiplicative-noise latent.
NOISE_SITE_KEY = "bmrs_noise"


class MultiplicativeNoise(PyroModule):
    """Scale each of ``num_structures`` structures of the input by a positive latent theta.

    Args:
        num_structures: number of structures S (units, channels, heads).
        channel_dim: the input dimension that indexes structures: -1 for (N, D) features,
            1 for (N, C, H, W) feature maps. The first dimension is always the batch.
        low, high: bounds of log theta; the prior is Uniform(low, high) on log theta.
        noise: ``"example"`` (default) draws theta independently for every example of the batch;
            ``"global"`` draws one theta per batch.

    Buffers: ``mask`` (1 keep, 0 pruned) zeroes pruned structures in every mode.

    Modes (``self.mode``): ``"sample"`` declares the sample site (training, Predictive);
    ``"mean"`` multiplies by E_q[theta] * mask, the deterministic test-time rule, which needs a
    guide attached (the guide attaches itself when it first runs) or :meth:`set_posterior_mean`;
    ``"off"`` multiplies by the mask alone (theta = 1): the deterministic twin of the network,
    with no sample site, so no KL term and no use of the guide.
    """

    def __init__(
        self,
        num_structures: int,
        channel_dim: int = -1,
        low: float = -20.0,
        high: float = 0.0,
        noise: str = "example",
    ) -> None:
        super().__init__()
        if not isinstance(num_structures, int) or num_structures < 1:
            raise ValueError(f"num_structures must be a positive int, got {num_structures!r}")
        low, high = float(low), float(high)
        if not low < high:
            raise ValueError(f"low ({low}) must be < high ({high}): they bound log theta")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if channel_dim == 0:
            raise ValueError("channel_dim cannot be 0: the first dimension is the batch")
        self.num_structures = num_structures
        self.channel_dim = int(channel_dim)
        self.low = low
        self.high = high
        self.noise = noise
        self.mode = "sample"
        self.register_buffer("mask", torch.ones(num_structures))
        self._guide = None  # set by the guide: a weak reference to it

    def extra_repr(self) -> str:
        kept = int(self.mask.sum().item())
        return (
            f"num_structures={self.num_structures}, channel_dim={self.channel_dim}, "
            f"low={self.low}, high={self.high}, noise={self.noise!r}, kept={kept}"
        )

    @property
    def site_name(self) -> str:
        """Name of the Pyro sample site, ``<module name>.theta``."""
        name = self.__dict__.get("_pyro_name", "")
        return f"{name}.theta" if name else "theta"

    def prior(self, batch_size: Optional[int] = None):
        """The LogUniform prior of the site: (S,) structures as the event, per example or global."""
        low = self.mask.new_tensor(self.low)
        return self.site_distribution(LogUniform(low, self.mask.new_tensor(self.high)), batch_size)

    def site_distribution(self, dist, batch_size: Optional[int] = None):
        """``dist`` (per structure or scalar) shaped as this layer's site: expanded to (B, S) or
        (S,), pruned structures masked, the structures made the event dimension."""
        dist = dist.expand(self._site_shape(batch_size))
        if self.mask.device.type != "cpu" or not bool(self.mask.all()):  # no sync on a GPU
            dist = dist.mask(self.mask.bool())
        return dist.to_event(1)

    def _site_shape(self, batch_size: Optional[int]) -> tuple:
        if self.noise == "example":
            if batch_size is None:
                raise ValueError("per-example noise needs the batch size")
            return (batch_size, self.num_structures)
        return (self.num_structures,)

    def kl_scale(self, batch_size: int) -> float:
        """Scale of the site so that its KL enters the loss once per step: 1/B per example, 1
        for global noise (the loss's ``kl_weight`` multiplies it)."""
        if self.noise == "example":
            return 1.0 / batch_size
        return 1.0

    @contextlib.contextmanager
    def site_context(self, batch_size: int) -> Iterator[None]:
        """Plate and scale of the noise site; shared by the model and the guide."""
        # A bare independence frame rather than pyro.plate: a plate records a subsample site, and an
        # AutoGuideList master re-creates every plate it saw at its prototype batch size, which
        # would clash with ours (and with smaller last batches).
        with contextlib.ExitStack() as stack:
            if self.noise == "example":
                stack.enter_context(IndepMessenger(f"{self.site_name}.examples", batch_size, dim=-1))
                stack.enter_context(poutine.scale(scale=self.kl_scale(batch_size)))
            yield

    def _check_input(self, x: torch.Tensor) -> int:
        if x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects a batch (N, ...) with at least 2 dims, got shape {tuple(x.shape)}"
            )
        dim = self.channel_dim if self.channel_dim > 0 else x.dim() + self.channel_dim
        if not 0 < dim < x.dim():
            raise ValueError(
                f"channel_dim={self.channel_dim} does not fit an input of shape {tuple(x.shape)}; "
                "use -1 for (N, D) features or 1 for (N, C, H, W) feature maps"
            )
        if x.shape[dim] != self.num_structures:
            raise ValueError(
                f"input has {x.shape[dim]} entries along channel_dim={self.channel_dim} "
                f"(shape {tuple(x.shape)}) but the layer has num_structures={self.num_structures}"
            )
        return dim

    def _broadcast(self, theta: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
        # theta is (S,) or (N, S); put S at `dim` and ones elsewhere.
        shape = [1] * x.dim()
        shape[dim] = self.num_structures
        if theta.dim() == 2:
            shape[0] = theta.shape[0]
        return theta.reshape(shape)

    def posterior_mean(self) -> torch.Tensor:
        """E_q[theta] per structure from the attached guide (or the value set by hand)."""
        guide = self._guide() if self._guide is not None else None
        if guide is not None:
            return guide.posterior(self.site_name).mean
        fixed = self.__dict__.get("_fixed_mean")
        if fixed is None:
            raise RuntimeError(
                f"{self.site_name}: mean mode needs a posterior; run the guide once "
                "(AutoTruncatedLogNormal attaches itself) or call set_posterior_mean()"
            )
        return fixed

    def set_posterior_mean(self, value: torch.Tensor) -> None:
        """Fix E_q[theta] for mean mode when no guide is attached."""
        self.__dict__["_fixed_mean"] = torch.as_tensor(value, dtype=self.mask.dtype)

    def __call__(self, *args, **kwargs):
        # With the one-pass ELBO alone listening, forward issues no Pyro statement, so the
        # parameter context PyroModule enters around every call has nothing to do (it reads
        # Pyro settings and names each time): call the plain nn.Module machinery instead.
        if ACTIVE and self.mode == "sample" and active_noise_elbo(self) is not None:
            return torch.nn.Module.__call__(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self._check_input(x)
        if self.mode == "off":
            return x * self._broadcast(self.mask.to(x.dtype), x, dim)
        if self.mode == "mean":
            theta = self.posterior_mean().to(x.dtype) * self.mask
            return x * self._broadcast(theta, x, dim)
        batch = x.shape[0]
        elbo = active_noise_elbo(self)
        if elbo is not None:  # the one-pass ELBO alone is listening: skip the sample statement
            theta, mask = elbo.noise(self, batch)
            theta = theta.to(x.dtype)
            if mask is not None:  # some structure of some site is pruned
                theta = theta * mask
            return x * self._broadcast(theta, x, dim)
        if pyro.poutine.runtime.am_i_wrapped() and pyro.poutine.runtime.get_plates():
            names = [f.name for f in pyro.poutine.runtime.get_plates()]
            raise ValueError(
                f"{self.site_name}: noise layers must be called outside pyro.plate (found {names}); "
                "compute the network first, then open the data plate around the observation only"
            )
        with self.site_context(batch):
            theta = pyro.sample(
                self.site_name, self.prior(batch), infer={NOISE_SITE_KEY: True, "bmrs_layer": self}
            )
        theta = theta.to(x.dtype) * self.mask
        return x * self._broadcast(theta, x, dim)


def noise_modules(model: torch.nn.Module) -> dict[str, MultiplicativeNoise]:
    """All noise layers of a model, keyed by their sample site name, in module order."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiplicativeNoise):
            if not module.__dict__.get("_pyro_name"):
                module._pyro_name = name  # a noise layer inside a plain nn.Module tree
            found[module.site_name] = module
    return found


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """Put every noise layer of ``model`` in ``"sample"``, ``"mean"`` or ``"off"`` (theta = 1) mode."""
    if mode not in LAYER_MODES:
        raise ValueError(f"mode must be one of {LAYER_MODES}, got {mode!r}")
    for module in noise_modules(model).values():
        module.mode = mode


@contextlib.contextmanager
def noise_mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Temporarily set every noise layer's mode (``"mean"`` for deterministic prediction,
    ``"off"`` for the network with theta = 1)."""
    modules = noise_modules(model)
    before = {name: m.mode for name, m in modules.items()}
    set_mode(model, mode)
    try:
        yield
    finally:
        for name, m in modules.items():
            m.mode = before[name]


def name_noise_layers(model: torch.nn.Module) -> dict[str, MultiplicativeNoise]:
    """Name every noise layer after its place in ``model`` (``net.2`` -> site ``net.2.theta``).

    PyroModule names its PyroModule children itself; a noise layer inside a plain container
    (``nn.Sequential``) has no name until this is called. Returns :func:`noise_modules`.
    """
    for name, module in model.named_modules():
        if isinstance(module, MultiplicativeNoise) and name:
            module._pyro_name = name
    return noise_modules(model)


class NoisyClassifier(PyroModule):
    """A Pyro classification model around a deterministic backbone ``net`` (x -> logits).

    ``net`` is any ``nn.Module`` holding :class:`MultiplicativeNoise` layers (an ``nn.Sequential``
    of Linear/Conv/BatchNorm/activation/noise layers, a ResNet, ...). ``forward(x, y=None)``
    adds the likelihood ``obs ~ Categorical(logits=net(x))`` inside the ``data`` plate, so the
    model is ordinary Pyro, while :func:`bmrs_pyro.compact` can work on ``net`` alone.
    """

    def __init__(self, net: torch.nn.Module, num_classes: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net
        self.num_classes = num_classes
        name_noise_layers(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output (in the noise layers' current mode)."""
        return self.net(x)

    def __call__(self, *args, **kwargs):
        # As MultiplicativeNoise.__call__: with a label and the one-pass ELBO alone listening,
        # forward issues no Pyro statement and needs no PyroModule parameter context.
        labelled = (len(args) > 1 and args[1] is not None) or kwargs.get("y") is not None
        if ACTIVE and labelled and active_noise_elbo() is not None:
            return torch.nn.Module.__call__(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        elbo = active_noise_elbo() if y is not None else None
        if elbo is not None:
            # The one-pass ELBO alone is listening: skip the sample statement, and the pyro.module
            # statement that reading self.net would issue (one pyro.param per weight, answered by
            # no handler; the guide's set-up pass has registered the weights already).
            logits = self._modules["net"](x)
            elbo.observe_categorical(logits, y)
            return logits
        logits = self.net(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits
