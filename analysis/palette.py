"""One colour-blind-safe palette (Okabe & Ito 2008) for every figure of the package."""

from __future__ import annotations

OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

#: Decision colours: kept structures blue, pruned ones vermillion (distinct under every
#: common colour-vision deficiency).
KEPT = OKABE_ITO["blue"]
PRUNED = OKABE_ITO["vermillion"]
#: Neutral grey for "before" / totals, not part of the Okabe-Ito set but safe beside it.
NEUTRAL = "#9A9A9A"

#: Order in which methods get colours; yellow is last because it is faint on white.
METHOD_CYCLE: tuple[str, ...] = tuple(
    OKABE_ITO[k] for k in ("blue", "vermillion", "bluish_green", "orange", "reddish_purple", "sky_blue", "black", "yellow")
)


def method_colour(i: int) -> str:
    """Colour of the i-th method in a figure."""
    return METHOD_CYCLE[i % len(METHOD_CYCLE)]
