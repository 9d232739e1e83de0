"""A lean mean-field ELBO for multiplicative-noise models.

``TraceMeanField_ELBO`` records a trace of the guide and of the model, computes the guide's
``log_prob`` at every sample (the score parts) although the analytic KL makes it unnecessary,
and validates the two traces on every step. For a model whose only latent sites are
multiplicative-noise sites, the same loss can be computed in one pass of the model: each noise
site draws theta from the guide's posterior by ``rsample`` and contributes its analytic KL; each
observed site contributes its scaled log likelihood. Same random draws, same value, same
gradients (tested against ``TraceMeanField_ELBO``), a fraction of the overhead.

If the model has any other latent site (Bayesian weights, say) or the guide is not an
:class:`~bmrs_pyro.guides.AutoTruncatedLogNormal`, :class:`MeanFieldNoiseELBO` falls back to
``TraceMeanField_ELBO`` for that call.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.distributions.util import is_validation_enabled, scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from ._active_elbo import ACTIVE, active_noise_elbo  # noqa: F401  (re-exported)
from ._fast_paths import _exp_bound, _flipped_bounds
from ._fused_step import step_kl_and_theta
from ._low_precision import _compute_dtype, _low_precision, kl_to_own_bounds_lp, sample_sites_lp
from .distributions import TruncatedLogNormal, kl_to_own_bounds, sample_sites
from .guides import LOG_SCALE_MAX, LOG_SCALE_MIN, AutoTruncatedLogNormal


class _Unsupported(Exception):
    pass


_BOUNDS_CACHE: dict = {}


def _site_bounds(layers, sizes, like: torch.Tensor, with64: bool = True) -> tuple[torch.Tensor, ...]:
    """Per-structure (low, high) of the concatenated sites in ``like``'s dtype and in float64, and
    (e^low, e^high) rounded from float64 to ``like``'s dtype (the float64 ones None without
    ``with64``: the low-precision path makes no float64 tensor; cached: they are constants)."""
    key = (tuple((l.low, l.high) for l in layers), tuple(sizes), like.dtype, like.device, with64)
    found = _BOUNDS_CACHE.get(key)
    if found is None:
        if len(_BOUNDS_CACHE) > 64:
            _BOUNDS_CACHE.clear()
        with torch.inference_mode(False):  # ordinary tensors even if first met under inference_mode
            low = torch.cat([like.new_full((n,), l.low) for l, n in zip(layers, sizes)])
            high = torch.cat([like.new_full((n,), l.high) for l, n in zip(layers, sizes)])
            bounds64 = (low.double(), high.double()) if with64 else (None, None)
            exp_bounds = (_exp_bound(low), _exp_bound(high)) if with64 else (None, None)
        found = _BOUNDS_CACHE[key] = (low, high) + bounds64 + exp_bounds
    return found


class _StepPosteriors:
    """Every noise site's posterior for one loss evaluation, computed for all sites at once.

    The parameters of all sites are concatenated, so the analytic KL (float64 inside on the CPU,
    the model's dtype off it) and the per-structure sampling constants cost one vectorised
    evaluation instead of one per site.
    When every site draws per-example noise, theta of all sites is drawn in one go too (same
    uniforms, site by site, as separate draws would use); a site met again in the same pass,
    or with another batch size, draws afresh from its own posterior.
    """

    def __init__(self, guide, batch: int, direct: bool = False) -> None:
        self.names = list(guide._layers)
        self.layers = [guide._layers[n] for n in self.names]
        self.index = {n: i for i, n in enumerate(self.names)}
        # The guide's loc_scale for every site at once: clamp and exp on the concatenation.
        raw = [guide._raw_loc_log_scale(n, direct) for n in self.names]
        sizes = [p[0].shape[0] for p in raw]
        cat = (lambda ts: ts[0]) if len(sizes) == 1 else torch.cat
        loc = cat([p[0] for p in raw])
        scale = torch.clamp(cat([p[1] for p in raw]), LOG_SCALE_MIN, LOG_SCALE_MAX).exp()
        split = (lambda t: t.split(sizes)) if len(sizes) > 1 else (lambda t: (t,))
        self.locs, self.scales = split(loc), split(scale)
        # Each site's prior is log-uniform on its posterior's own bounds: KL with no bound terms,
        # the same value kl_divergence(q, LogUniform(low, high)) gives. On the CPU the KL and the
        # sampler's per-structure constants are float64; off it (a GPU) everything is in the
        # model's dtype (bmrs_pyro._low_precision).
        low_precision = _low_precision(loc)
        per_example = all(l.noise == "example" for l in self.layers)
        # The masks of all sites, read once per step: whether any structure is pruned (False off
        # the CPU, where asking would sync) and, if so, each site's mask.
        self.masks = [l._buffers["mask"] for l in self.layers]
        keep = self.masks[0] if len(self.masks) == 1 else torch.cat(self.masks)
        self.kept_all = keep.device.type == "cpu" and bool(keep.all())
        theta = None
        if low_precision:
            low, high, _, _, _, _ = _site_bounds(self.layers, sizes, loc, with64=False)
            cdt = _compute_dtype(loc.dtype)
            flipped = _flipped_bounds(*(t.to(cdt) for t in (loc, scale, low, high)))
            kl = kl_to_own_bounds_lp(loc, scale, low, high, flipped=flipped)
            if per_example:
                theta = sample_sites_lp(loc, scale, low, high, sizes, batch, flipped=flipped)
        elif loc.dtype != torch.float64:  # the KL and the sampler's constants formed once, float64
            _, _, low64, high64, e_low, e_high = _site_bounds(self.layers, sizes, loc)
            kl, theta = step_kl_and_theta(loc, scale, low64, high64, (e_low, e_high), sizes,
                                          batch if per_example else None, None if self.kept_all else keep.bool())
        else:
            low, high, low64, high64, _, _ = _site_bounds(self.layers, sizes, loc)
            flipped = _flipped_bounds(loc, scale, low64, high64)  # shared by the KL and the sampler
            kl = kl_to_own_bounds(loc, scale, low64, high64, flipped=flipped)
            if per_example:
                theta = sample_sites(loc, scale, low, high, sizes, batch, flipped=flipped)
        self.kl_all = kl
        self.kls = split(kl)
        self.batch = batch
        self.thetas = None
        if theta is not None:
            self.thetas = list(theta.split(sizes, dim=-1)) if len(sizes) > 1 else [theta]

    def site(self, name: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL per structure, theta of ``shape``) of site ``name``."""
        i = self.index[name]
        theta = None
        if self.thetas is not None and tuple(shape) == (self.batch, self.locs[i].shape[0]):
            theta, self.thetas[i] = self.thetas[i], None
        if theta is None:
            layer = self.layers[i]
            q = TruncatedLogNormal(self.locs[i], self.scales[i], layer.low, layer.high)
            theta = q.expand(shape).rsample()
        return self.kls[i], theta


class _NoiseELBOMessenger(Messenger):
    """Answers noise sites from the guide and accumulates the ELBO terms."""

    def __init__(self, guide, direct: bool = False) -> None:
        super().__init__()
        self.guide = guide
        self.direct = direct  # read the guide's leaf tensors, no pyro.param statements
        self.log_likelihood = 0.0
        self.kl = 0.0
        self._step: _StepPosteriors | None = None
        self._pending: list = []

    def _posteriors(self, batch: int) -> _StepPosteriors:
        if self._step is None:
            self._step = _StepPosteriors(self.guide, batch, self.direct)
        return self._step

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        fn = msg["fn"]
        if msg["is_observed"]:
            log_prob = fn.log_prob(msg["value"])
            self.log_likelihood = self.log_likelihood + scale_and_mask(log_prob, msg["scale"], msg["mask"]).sum()
            return
        infer = msg.get("infer") or {}
        name = msg["name"]
        if not infer.get("bmrs_noise") or name not in self.guide._layers:
            raise _Unsupported(name)
        batch_shape = fn.batch_shape  # (B,) per example, () global; the structures are the event
        shape = batch_shape + fn.event_shape
        kl, theta = self._posteriors(shape[0] if len(shape) > 1 else 1).site(name, shape)
        keep = self.guide._layers[name].mask.bool()
        per_copy = torch.where(keep, kl, 0.0).sum(-1)  # pruned structures are masked in the site
        # The site's KL is that of each of its B copies (one per example), scaled by the site.
        self.kl = self.kl + scale_and_mask(per_copy.expand(batch_shape), msg["scale"], msg["mask"]).sum()
        msg["value"] = theta
        msg["done"] = True

    def noise(self, layer, batch: int) -> tuple[torch.Tensor, "torch.Tensor | None"]:
        """(theta, mask) for ``layer`` without a Pyro sample statement (see
        :func:`active_noise_elbo`): ``mask`` is the layer's mask buffer when a structure of any
        site may be pruned (the layer multiplies theta by it), None when none is.

        Adds exactly what the sample site would: the KL of each of the site's copies, times
        the site's scale (``layer.kl_scale``), the pruned structures left out. The sum is
        formed in :meth:`finish`, once for all sites when it can.
        """
        shape = (batch, layer.num_structures) if layer.noise == "example" else (layer.num_structures,)
        step = self._posteriors(batch if layer.noise == "example" else 1)
        _, theta = step.site(layer.site_name, shape)
        copies = batch if layer.noise == "example" else 1
        i = step.index[layer.site_name]
        mask = None if step.kept_all else step.masks[i]
        self._pending.append((i, copies * layer.kl_scale(batch), None if mask is None else mask.bool()))
        return theta, mask

    def finish(self) -> None:
        """Add the KL of the sites answered by :meth:`noise`: one sum over all structures when
        every site was met once with the same factor and no pruned structure, else site by site."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        step = self._step
        factors = {f for _, f, _ in pending}
        whole = sorted(i for i, _, _ in pending) == list(range(len(step.names)))
        if whole and len(factors) == 1 and all(m is None for _, _, m in pending):
            self.kl = self.kl + step.kl_all.sum() * factors.pop()
            return
        for i, factor, mask in pending:
            kl = step.kls[i]
            kl = kl.sum() if mask is None else torch.where(mask, kl, 0.0).sum()
            self.kl = self.kl + kl * factor


    def observe_categorical(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """What ``pyro.sample("obs", Categorical(logits=logits), obs=y)`` in a data plate adds:
        sum_i log softmax(logits_i)[y_i], times the observed-site scales on the stack."""
        log_likelihood = -torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        # As Categorical's validation, but on the sum: non-finite logits make it NaN or -inf, and
        # one scalar read is cheaper than a pass over the logits (no sync on a GPU).
        if is_validation_enabled() and logits.device.type == "cpu" and not math.isfinite(log_likelihood.item()):
            raise ValueError("Expected parameter logits to be finite, found invalid values (nan/inf)")
        scale = 1.0
        for handler in _PYRO_STACK:
            if handler is not self:
                scale = scale * getattr(handler, "scale", 1.0)
        self.log_likelihood = self.log_likelihood + scale * log_likelihood


class ScaleLatent(Messenger):
    """Multiply the log densities of latent sample sites by ``weight`` (observed sites untouched).

    Wrapped around both model and guide it multiplies the KL part of any trace ELBO by ``weight``:
    the ``kl_weight`` of :func:`bmrs_pyro.infer.fit`. ``weight = 0`` masks the sites out (Pyro's
    scale handler refuses 0); ``weight = 1`` changes nothing.
    """

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = check_kl_weight(weight)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        if self.weight == 0:
            msg["mask"] = False
        else:
            msg["scale"] = msg["scale"] * self.weight


def check_kl_weight(kl_weight) -> float:
    """``kl_weight`` as a float; ValueError unless it is a finite number >= 0."""
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not (
            kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"kl_weight must be a finite number >= 0 (1 is the true ELBO), got {kl_weight!r}")
    return float(kl_weight)


class _KLWeighted:
    """Mixin for a Pyro trace ELBO: the latent sites' terms (the KL) times ``kl_weight``."""

    def __init__(self, *args, kl_weight: float = 1.0, **kwargs) -> None:
        self.kl_weight = check_kl_weight(kl_weight)
        super().__init__(*args, **kwargs)

    def _weighted(self, model, guide) -> tuple:
        if self.kl_weight == 1.0:
            return model, guide
        return ScaleLatent(self.kl_weight)(model), ScaleLatent(self.kl_weight)(guide)

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(*self._weighted(model, guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(*self._weighted(model, guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(*self._weighted(model, guide), *args, **kwargs)


class WeightedTraceMeanField_ELBO(_KLWeighted, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` with its KL times ``kl_weight`` (keyword; default 1)."""


class WeightedTrace_ELBO(_KLWeighted, Trace_ELBO):
    """``Trace_ELBO`` with its latent (KL) part times ``kl_weight`` (keyword; default 1)."""


class MeanFieldNoiseELBO(ELBO):
    """Negative ELBO with analytic KL for multiplicative-noise models, in one model pass.

    A :class:`pyro.infer.ELBO` (``loss``, ``loss_and_grads``, ``differentiable_loss``): pass it
    to ``pyro.infer.SVI`` with a ``pyro.optim`` optimiser like any other. Same value and
    gradients as ``TraceMeanField_ELBO``; models with latent sites other than the noise layers
    fall back to it. ``kl_weight`` multiplies the KL term (1: the true ELBO), so the loss is
    ``-sum log p (at the observed sites' scales) + kl_weight * sum KL``.
    """

    def __init__(self, num_particles: int = 1, *, kl_weight: float = 1.0) -> None:
        if num_particles != 1:
            raise ValueError("MeanFieldNoiseELBO draws one particle; use TraceMeanField_ELBO for more")
        super().__init__(num_particles=1)
        self.kl_weight = check_kl_weight(kl_weight)
        self._fallback = WeightedTraceMeanField_ELBO(kl_weight=self.kl_weight)
        self.used_fallback = False

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if isinstance(guide, AutoTruncatedLogNormal) and not self.used_fallback:
            if guide.prototype_trace is None:
                guide(*args, **kwargs)
            # With a handler on the stack (pyro.infer.SVI's parameter trace, say) the guide's
            # parameters are read through pyro.param inside its module context, as in its own
            # forward, so the handler sees (and SVI updates) them; with none (fit's steps), the
            # same leaf tensors are read directly, without the pyro.param statements.
            direct = not _PYRO_STACK
            messenger = _NoiseELBOMessenger(guide, direct)
            ACTIVE.append(messenger)
            try:
                with (contextlib.nullcontext() if direct else guide._pyro_context), messenger:
                    model(*args, **kwargs)
            except _Unsupported:
                self.used_fallback = True
            else:
                messenger.finish()
                if self.kl_weight == 0:
                    return -messenger.log_likelihood
                return self.kl_weight * messenger.kl - messenger.log_likelihood
            finally:
                ACTIVE.remove(messenger)
        self.used_fallback = True
        return self._fallback.differentiable_loss(model, guide, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        # The one-pass loss never builds model/guide trace pairs; the fallback builds its own.
        return self._fallback._get_trace(model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
