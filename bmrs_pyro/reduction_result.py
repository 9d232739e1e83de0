"""What :func:`bmrs_pyro.reduce` returns: :class:`ReductionResult` (scores, keep masks, the rule, margin
and tie band, a per-layer table; ``apply()`` sets the masks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .atomic_io import jsonable


@dataclass
class ReductionResult:
    """What :func:`reduce` decided.

    Attributes:
        method: the criterion's name.
        options: the criterion's options and ``fraction``, ``scope``, ``respect_mask``, ``min_keep``.
        scores: per site, the criterion's score of each structure (dF for BMRS, float64).
        keep: per site, a bool tensor, True for structures that stay.
        kept_per_layer: per site, ``(kept, total)``.
        fraction_removed: structures removed over all structures of all layers.
        label: the score's short name (``"dF"``, ``"SNR"``).
        rule: the decision in words (``"prune where dF >= -1 nats ..."``, or the ranked fraction).
    """

    method: str
    options: dict
    scores: dict
    keep: dict
    kept_per_layer: dict
    fraction_removed: float
    label: str = "score"
    layers: dict = field(default_factory=dict, repr=False)
    rule: str = ""

    @property
    def margin(self) -> Optional[float]:
        """The evidence margin (nats) of a BMRS decision made by its rule; None otherwise."""
        margin = self.options.get("margin")
        return None if margin is None or self.options.get("fraction") is not None else float(margin)

    def tie_band(self) -> Optional[dict]:
        """Structures whose dF lies in the tie band ``[-margin, 0)``: removed by the margin, kept by
        the strict rule. ``{"band": [-margin, 0], "count": n, "removed": n_removed}``, or None when
        the decision has no margin (not a BMRS rule)."""
        margin = self.margin
        if margin is None:
            return None
        count = removed = 0
        for site, keep in self.keep.items():
            df = torch.as_tensor(self.scores[site]).double()
            band = (df >= -margin) & (df < 0)
            count += int(band.sum())
            removed += int((band & ~torch.as_tensor(keep).bool()).sum())
        return {"band": [-margin, 0.0], "count": count, "removed": removed}

    def apply(self) -> "ReductionResult":
        """Set each noise layer's ``mask`` to ``keep`` (1 keep, 0 pruned); returns ``self``."""
        for site, keep in self.keep.items():
            layer = self.layers[site]
            with torch.no_grad():
                layer.mask.copy_(keep.to(layer.mask.dtype).to(layer.mask.device))
        return self

    def to_dict(self) -> dict:
        """A JSON-friendly summary: method, options, per-layer keep masks and scores."""
        return {
            "method": self.method,
            "rule": self.rule,
            "options": jsonable(dict(self.options)),
            "fraction_removed": float(self.fraction_removed),
            "layers": {
                site: {
                    "kept": int(self.kept_per_layer[site][0]),
                    "total": int(self.kept_per_layer[site][1]),
                    "keep": [bool(v) for v in self.keep[site].tolist()],
                    "scores": [float(v) for v in self.scores[site].tolist()],
                }
                for site in self.keep
            },
        }

    def __str__(self) -> str:
        width = max([len("site")] + [len(s) for s in self.keep])
        head = (
            f"{'site':<{width}}  {'kept/total':>11}  {'removed %':>9}  "
            f"{'min ' + self.label:>12}  {'max ' + self.label:>12}"
        )
        lines = [f"reduce(method={self.method!r}): removed {self.fraction_removed * 100:.1f} % of structures"]
        if self.rule:
            lines.append(f"rule: {self.rule}")
        band = self.tie_band()
        if band is not None and band["count"]:
            lines.append(f"tie band [-{self.margin:g}, 0): {band['count']} structures ({band['removed']} removed)")
        lines += [head, "-" * len(head)]
        for site, (kept, total) in self.kept_per_layer.items():
            s = self.scores[site]
            removed = 100.0 * (total - kept) / total
            lines.append(
                f"{site:<{width}}  {f'{kept}/{total}':>11}  {removed:>9.1f}  "
                f"{float(s.min()):>12.4g}  {float(s.max()):>12.4g}"
            )
        kept = sum(k for k, _ in self.kept_per_layer.values())
        total = sum(t for _, t in self.kept_per_layer.values())
        lines.append(f"{'total':<{width}}  {f'{kept}/{total}':>11}  {100.0 * (total - kept) / total:>9.1f}")
        return "\n".join(lines)

    __repr__ = __str__


