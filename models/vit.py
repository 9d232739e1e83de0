"""A small vision transformer with noise on attention heads and on MLP hidden units.

Pre-norm blocks ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. Two kinds of structure:

* attention heads: each head's output (B, heads, T, head_dim) is scaled by one theta before the
  heads are concatenated and projected (``num_structures=heads``, ``channel_dim=1``), so a
  pruned head removes its slice of the query/key/value weights and of the output projection;
* MLP hidden units: after the GELU, over (B, T, mlp_dim) (``channel_dim=-1``).

Theta is drawn per example and broadcast over tokens (and head dimensions), so a structure is
switched on or off for the whole sequence. The residual stream (the ``dim`` features) carries no
noise: it is shared by every block. BMRS's own ViT experiments put noise on block-output features
instead; this layout prunes the structures that can be removed independently.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from bmrs_pyro.nn import NoisyClassifier

from ._common import NoiseFactory, as_pair, check_positive_int


class PatchEmbedding(nn.Module):
    """Split the image into non-overlapping patches and embed each linearly: (B, T, dim)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a noise layer scaling each head's output."""

    def __init__(self, dim: int, heads: int, make_noise: NoiseFactory) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head_noise = make_noise(heads, channel_dim=1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        out = self.head_noise(out)
        return self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    @torch.no_grad()
    def compact_structures(self, child: str, factor: torch.Tensor) -> int:
        """Physically remove the heads whose factor is 0 and fold the others' into ``proj``.

        The hook :func:`bmrs_pyro.compact` calls on its copy of the network, with ``child`` the
        name of the noise layer and ``factor`` = E[theta] * mask per head. A head's query, key and
        value rows leave ``qkv``, its columns leave ``proj``, and the kept heads' factors multiply
        their ``proj`` columns; the noise layer becomes an identity. With every head pruned one
        head stays with factor 0 (the block then adds only ``proj``'s bias), as for any layer
        compacted to zero width. Returns the number of heads left.
        """
        if child != "head_noise":
            raise ValueError(f"Attention owns the noise layer 'head_noise', not {child!r}")
        factor = factor.detach().reshape(-1).to(self.proj.weight)
        if factor.numel() != self.heads:
            raise ValueError(f"expected one factor per head ({self.heads}), got {factor.numel()}")
        keep = torch.nonzero(factor != 0).flatten()
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=factor.device)
        hd, width = self.head_dim, self.heads * self.head_dim
        cols = (keep[:, None] * hd + torch.arange(hd, device=keep.device)).flatten()
        rows = torch.cat([cols + part * width for part in range(3)])  # the q, k and v blocks
        qkv = nn.Linear(self.qkv.in_features, rows.numel(), bias=self.qkv.bias is not None).to(self.qkv.weight)
        qkv.weight.copy_(self.qkv.weight[rows])
        if self.qkv.bias is not None:
            qkv.bias.copy_(self.qkv.bias[rows])
        proj = nn.Linear(cols.numel(), self.proj.out_features, bias=self.proj.bias is not None).to(self.proj.weight)
        proj.weight.copy_(self.proj.weight[:, cols] * factor[keep].repeat_interleave(hd))
        if self.proj.bias is not None:
            proj.bias.copy_(self.proj.bias)
        self.qkv, self.proj, self.heads = qkv, proj, int(keep.numel())
        self.head_noise = nn.Identity()
        return self.heads


class FeedForward(nn.Module):
    """Linear -> GELU -> noise over the hidden units -> Linear."""

    def __init__(self, dim: int, mlp_dim: int, make_noise: NoiseFactory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.noise = make_noise(mlp_dim, channel_dim=-1)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.noise(self.act(self.fc1(x))))


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, make_noise: NoiseFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, make_noise)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, make_noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """The deterministic backbone: patches + class token + position embedding, blocks, head."""

    def __init__(
        self,
        image_size: tuple[int, int],
        patch_size: int,
        in_channels: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        make_noise: NoiseFactory,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        num_patches = (image_size[0] // patch_size) * (image_size[1] // patch_size)
        self.patch_embedding = PatchEmbedding(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, make_noise) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(
                f"this ViT expects images (N, {self.in_channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}), got shape {tuple(x.shape)}"
            )
        tokens = self.patch_embedding(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embedding
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0])


def vit(
    image_size: Union[int, tuple[int, int]] = 8,
    patch_size: int = 2,
    in_channels: int = 1,
    num_classes: int = 10,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 128,
    *,
    noise: str = "example",
    low: float = -20.0,
    high: float = 0.0,
) -> NoisyClassifier:
    """A small vision transformer classifier (no pretrained weights).

    Each block has two noise sites: ``blocks.<i>.attn.head_noise`` over the ``heads`` heads and
    ``blocks.<i>.mlp.noise`` over the ``mlp_dim`` hidden units. The class token's final state
    feeds the linear head.

    Args:
        image_size: H = W as an int, or (H, W); both must be multiples of ``patch_size``.
        dim: embedding width; must be a multiple of ``heads``.

    Raises:
        ValueError: sizes that do not fit together (the message says which).
    """
    size = as_pair("image_size", image_size)
    for name, value in (("patch_size", patch_size), ("in_channels", in_channels), ("num_classes", num_classes),
                        ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim)):
        check_positive_int(name, value)
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"image_size {size} must be a multiple of patch_size={patch_size} in both dimensions")
    if dim % heads:
        raise ValueError(f"dim={dim} must be a multiple of heads={heads} (each head gets dim // heads features)")
    make_noise = NoiseFactory(low=low, high=high, noise=noise)
    net = VisionTransformer(size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_dim, make_noise)
    return NoisyClassifier(net, num_classes=num_classes)

