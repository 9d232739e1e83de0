"""Physical compaction: a plain network with the pruned structures removed and E[theta] folded in.

In ``"mean"`` mode a noise layer multiplies structure ``c`` by ``m_c = E_q[theta_c] * mask_c``.
:func:`compact` turns the masked network into an ordinary ``torch.nn.Module`` computing the same
function with no Pyro and no noise layers:

* a structure with ``m_c = 0`` is removed: the output filter/row of the layer producing it, its
  BatchNorm entries and the matching input columns/channels of the next Linear/Conv;
* the kept ``m_c > 0`` are folded into the next layer's input weights ``W[:, c] *= m_c``. Folding
  crosses ReLU, LeakyReLU, max/avg pooling, dropout and flatten (they commute with a positive
  per-channel factor; flatten repeats the factor over the H*W columns of each channel). Where
  another op sits between the noise and the next linear map (tanh after the noise, BatchNorm, the
  end of the network, an addition in a residual graph) the factor stays as a small :class:`Scale`.

Two engines. A network that is an ``nn.Sequential`` (nested ones are flattened) of Linear, Conv,
BatchNorm, elementwise activations, pooling, dropout, flatten and noise layers is walked in order
(``method="sequential"``). Any other graph -- e.g. a ResNet whose blocks add skip connections --
goes through Torch-Pruning's ``DependencyGraph`` (``method="graph"``, needs ``example_input`` to
trace): every noise layer first becomes a :class:`Scale`, then channels are removed group by
group, where a group is the set of layers Torch-Pruning couples through additions, reshapes and
concatenations, and removing a channel removes it from every layer of its group.

**Coupled channels.** A channel of a group is removed only if it is identically zero at the input
of every Linear/Conv of the group that reads it, i.e. every path into such a layer ends in a noise
layer pruning that channel, through zero-preserving ops only (ReLU-like activations, pooling,
reshapes; for an addition, *every* summand). With an identity skip ``h0 + noise1(...)`` where
``h0 = noise0(...)``, a channel goes only if it is pruned in both noise0 and noise1; a channel
pruned in one of them stays everywhere (still exact, only less compact). Paths through
BatchNorm, sigmoid, a constant or an op the analysis does not know keep the whole group. A
graph-engine result may keep the model's own container classes (no noise layers, no sample
sites).

**Structures only their module understands.** Where a noise layer scales something no
Linear/Conv channel stands for -- e.g. attention heads, a reshaped (N, heads, T, d) tensor -- the
module that owns it can define ``compact_structures(child_name, factor) -> width``. The graph
engine calls it on its copy with ``factor = E[theta] * mask`` per structure before anything else;
the hook removes the structures with factor 0 from its own weights, folds the others' factors
and replaces the noise layer (e.g. with ``nn.Identity``). The zoo's ViT attention does this.

A layer pruned to zero width has an identically zero output. It is not an error: the compacted
network keeps **one placeholder structure** whose folded factor is 0 (so the downstream layer
adds only its bias), which reproduces the masked network exactly and keeps every shape valid;
``stats["layers"][site]`` then shows ``kept == 0`` and ``width == 1``.
"""

from .api import ENGINES, compact, compression_stats, masked_dense
from .common import CompactModel, Scale

__all__ = ["ENGINES", "CompactModel", "Scale", "compact", "compression_stats", "masked_dense"]
