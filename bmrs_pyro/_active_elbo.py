"""The registry through which a noise layer finds the one-pass ELBO that is evaluating it.

:class:`~bmrs_pyro.elbo.MeanFieldNoiseELBO` registers its messenger here for the duration of a
loss evaluation; :class:`~bmrs_pyro.nn.MultiplicativeNoise` asks :func:`active_noise_elbo`
whether it may hand theta over directly instead of issuing a sample statement. It lives below
both so that the layer does not import the loss.
"""

from __future__ import annotations

from pyro.poutine.runtime import _PYRO_STACK

#: Messengers of the one-pass ELBO currently evaluating a loss (innermost last).
ACTIVE: list = []


def active_noise_elbo(layer=None):
    """The one-pass ELBO messenger that may answer a site directly, or None.

    Only when the Pyro stack holds nothing but that messenger and handlers marked as leaving
    latent sites alone (``_bmrs_latent_neutral``; they may scale observed sites by their
    ``scale``, as ``fit``'s observation scaling does): then a sample statement, with its plates,
    scale and mask handlers, would only hand the site to the messenger, so skipping it changes
    nothing but the time spent. ``layer``: a noise layer the guide must cover.
    """
    if not ACTIVE:
        return None
    messenger = ACTIVE[-1]
    for handler in _PYRO_STACK:
        if handler is not messenger and not getattr(handler, "_bmrs_latent_neutral", False):
            return None
    if layer is not None and layer.site_name not in messenger.guide._layers:
        return None
    return messenger
