"""The variational family: a truncated log-normal posterior for every multiplicative-noise site."""

from __future__ import annotations

import math
import weakref
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from .distributions import TruncatedLogNormal
from .nn import NOISE_SITE_KEY, MultiplicativeNoise

LOG_SCALE_MIN = -20.0
LOG_SCALE_MAX = 5.0


def deep_getattr(obj, key: str):
    """``obj.a.b.c`` for ``key="a.b.c"`` (the counterpart of Pyro's ``deep_setattr``)."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def raw_param(store, name: str) -> torch.Tensor:
    """The unconstrained leaf tensor of the ``PyroParam`` at dotted ``name`` in ``store``."""
    *path, leaf = name.split(".")
    module = store
    # Through the modules' own dictionaries: the same objects attribute access returns, without
    # PyroModule's __getattr__ (several dictionary probes per step and per site on the hot path).
    for part in path:
        module = module._modules.get(part) or getattr(module, part)
    found = module._parameters.get(leaf + "_unconstrained")
    return found if found is not None else getattr(module, leaf + "_unconstrained")


def is_noise_site(msg: dict) -> bool:
    """True for the sample sites declared by :class:`~bmrs_pyro.nn.MultiplicativeNoise`."""
    return msg.get("type") == "sample" and bool((msg.get("infer") or {}).get(NOISE_SITE_KEY))


def hide_noise_sites(model: Callable) -> Callable:
    """The model with its noise sites hidden, for the other parts of an ``AutoGuideList``.

    Example::

        guide = AutoGuideList(model)
        guide.append(AutoTruncatedLogNormal(model))
        guide.append(AutoNormal(hide_noise_sites(model)))
    """
    return poutine.block(model, hide_fn=is_noise_site)


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in list(args) + list(kwargs.values()):
        if torch.is_tensor(value) and value.dim() >= 1:
            return value.shape[0]
    raise ValueError(
        "per-example noise needs the batch size: pass the input batch as the model's first "
        "tensor argument (forward(x, y=None))"
    )


class AutoTruncatedLogNormal(AutoGuide):
    """Mean-field truncated log-normal guide over every multiplicative-noise site of a model.

    For the site ``<layer>.theta`` with S structures it learns ``loc`` (init ``init_loc``) and
    ``log_scale`` (init ``log(init_scale)``) of shape (S,), and samples
    ``TruncatedLogNormal(loc, exp(clamp(log_scale, -20, 5)), low, high)`` with the layer's
    bounds. Other latent sites of the model (Bayesian weights) are left to other guides in an
    :class:`~pyro.infer.autoguide.AutoGuideList` (see :func:`hide_noise_sites`).

    ``guide.posterior(site_name)`` returns the posterior of one site as a distribution.
    The guide attaches itself to the model's noise layers so that their ``"mean"`` mode can
    use E_q[theta].
    """

    def __init__(
        self,
        model: Callable,
        *,
        init_loc: float = 0.0,
        init_scale: float = math.exp(-5.0),
        create_plates=None,
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if not math.isfinite(init_loc):
            raise ValueError(f"init_loc must be finite, got {init_loc}")
        self.init_loc = float(init_loc)
        self.init_scale = float(init_scale)
        super().__init__(model, create_plates=create_plates)
        self._layers: dict[str, MultiplicativeNoise] = {}

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.locs = PyroModule()
        self.log_scales = PyroModule()
        self._layers = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if not is_noise_site(site):
                continue
            layer = site["infer"].get("bmrs_layer")
            if layer is None:
                raise RuntimeError(f"noise site {name} does not name its layer")
            self._layers[name] = layer
            num = layer.num_structures
            device = layer.mask.device
            self._forget_stale(name)  # before creating: PyroParam adopts a same-named stored value
            deep_setattr(self.locs, name, PyroParam(torch.full((num,), self.init_loc, device=device)))
            deep_setattr(
                self.log_scales,
                name,
                PyroParam(torch.full((num,), math.log(self.init_scale), device=device)),
            )
            layer._guide = weakref.ref(self)
        if not self._layers:
            raise ValueError(
                "the model has no MultiplicativeNoise layer: AutoTruncatedLogNormal has nothing to fit"
            )

    def _forget_stale(self, name: str) -> None:
        # PyroModule prefers a same-named tensor already in the global param store; a guide left
        # from an earlier run would hand its values to this new one, so drop them.
        store = pyro.get_param_store()
        for key in list(store.keys()):
            if key.endswith((f"locs.{name}", f"log_scales.{name}")) and key.startswith(self._pyro_name):
                del store[key]

    @property
    def site_names(self) -> list[str]:
        """Names of the noise sites this guide covers (after it has run once)."""
        return list(self._layers)

    @property
    def layers(self) -> dict[str, MultiplicativeNoise]:
        """The noise layer behind each site."""
        return dict(self._layers)

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (loc, scale) parameters of log theta at site ``name``."""
        if name not in self._layers:
            raise KeyError(f"unknown noise site {name!r}; sites: {self.site_names}")
        loc = deep_getattr(self.locs, name)
        log_scale = torch.clamp(deep_getattr(self.log_scales, name), LOG_SCALE_MIN, LOG_SCALE_MAX)
        return loc, log_scale.exp()

    def _raw_loc_log_scale(self, name: str, direct: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, log_scale) of site ``name`` before the clamp and exp of :meth:`loc_scale`.

        ``direct``: the leaf tensors themselves, without the ``pyro.param`` statements of
        PyroModule attribute access (same tensors once the guide has run under any handler)."""
        if direct:
            return raw_param(self.locs, name), raw_param(self.log_scales, name)
        return deep_getattr(self.locs, name), deep_getattr(self.log_scales, name)

    def posterior(self, name: str) -> TruncatedLogNormal:
        """The posterior of theta at noise site ``name`` (batch shape (S,))."""
        if self.prototype_trace is None:
            raise RuntimeError("run the guide once (e.g. one SVI step) before asking for posteriors")
        loc, scale = self.loc_scale(name)
        layer = self._layers[name]
        return TruncatedLogNormal(loc, scale, layer.low, layer.high)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        batch = None
        result = {}
        for name, layer in self._layers.items():
            if layer.noise == "example":
                batch = batch or _batch_size(args, kwargs)
            else:
                batch = batch or (_batch_size(args, kwargs) if (args or kwargs) else 1)
            q = layer.site_distribution(self.posterior(name), batch)
            with layer.site_context(batch):
                result[name] = pyro.sample(name, q, infer={NOISE_SITE_KEY: True})
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median of theta per site."""
        return {name: self.posterior(name).icdf(torch.tensor(0.5)) for name in self._layers}


def find_noise_guide(guide) -> "AutoTruncatedLogNormal | None":
    """The :class:`AutoTruncatedLogNormal` that holds the noise posteriors: ``guide`` itself, or
    the first one among its parts (an ``AutoGuideList``, also nested); ``None`` when there is none."""
    if isinstance(guide, AutoTruncatedLogNormal):
        return guide
    for part in getattr(guide, "_modules", {}).values():
        found = find_noise_guide(part) if part is not None and part is not guide else None
        if found is not None:
            return found
    return None
