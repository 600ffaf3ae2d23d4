"""A KV cache sharded over ranks: every token's K/V lives on exactly one rank.

Each rank runs the same model on the same tokens, so each computes K/V for every new token; the
cache keeps only the tokens this rank owns, with their global positions (for causal masking). The
owner is a pure function of the position, so every rank knows every shard's length without
communicating:
  "round_robin": owner(pos) = pos mod p (shards stay balanced within one token);
  "block":       owner(pos) = (pos // block_size) mod p (runs of block_size tokens per rank,
                 contiguous shards, the layout a paged cache gives).
Storage grows by doubling, so appending a token is amortised O(1) copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POLICIES = ("round_robin", "block")


def _grow(t: torch.Tensor, length: int, capacity: int, dim: int) -> torch.Tensor:
    """A copy of ``t`` with room for ``capacity`` entries along ``dim``, the first ``length`` kept."""
    shape = list(t.shape)
    shape[dim] = capacity
    new = t.new_empty(shape)
    new.narrow(dim, 0, length).copy_(t.narrow(dim, 0, length))
    return new


def _layout(k: torch.Tensor, v: torch.Tensor) -> str:
    """All of k, v but their length: what every append to one layer must share."""
    B, H, _, D = k.shape
    return f"k (B={B}, Hkv={H}, D={D}) {k.dtype}, v Dv={v.shape[3]} {v.dtype} on {k.device}"


@dataclass
class _LayerShard:
    k: torch.Tensor | None = None  # (B, Hkv, capacity, D)
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # (capacity,) int64
    length: int = 0


@dataclass
class ShardedKVCache:
    """Per-layer KV shards of one rank.

    Attributes:
        rank, world_size: this rank and the number of shards (the tree group's size and rank).
        policy: "round_robin" or "block" (module docstring).
        block_size: tokens per block for the "block" policy.
    """

    rank: int
    world_size: int
    policy: str = "round_robin"
    block_size: int = 256
    _layers: dict[int, _LayerShard] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def owner(self, pos: torch.Tensor) -> torch.Tensor:
        """The rank that stores each global position."""
        return (pos if self.policy == "round_robin" else pos // self.block_size) % self.world_size

    def shard_lengths(self, total: int) -> list[int]:
        """Every rank's shard length once ``total`` tokens (positions 0..total-1) are cached."""
        return torch.bincount(self.owner(torch.arange(total)), minlength=self.world_size).tolist()

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Offer new tokens k (B, Hkv, T, D), v (B, Hkv, T, Dv) at global positions ``pos`` (T,);
        keep the ones this rank owns."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must be (B, Hkv, T, E) with equal B, Hkv, T, got {tuple(k.shape)}, {tuple(v.shape)}")
        if pos.shape != (k.shape[2],) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
            raise ValueError(f"pos must be an integer tensor of shape ({k.shape[2]},), got {tuple(pos.shape)} {pos.dtype}")
        mine = (self.owner(pos) == self.rank).nonzero().flatten().to(k.device)
        shard = self._layers.setdefault(layer, _LayerShard())
        if shard.k is None:
            shard.k = k.new_empty(*k.shape[:2], 0, k.shape[3])
            shard.v = v.new_empty(*v.shape[:2], 0, v.shape[3])
            shard.pos = pos.new_empty(0, dtype=torch.int64, device=k.device)
        elif _layout(k, v) != _layout(shard.k, shard.v):  # the slice assignment would broadcast or cast
            raise ValueError(f"layer {layer} caches {_layout(shard.k, shard.v)}, got {_layout(k, v)}")
        new_len = shard.length + mine.numel()
        if new_len > shard.k.shape[2]:
            capacity = max(new_len, 2 * shard.k.shape[2], 16)
            shard.k = _grow(shard.k, shard.length, capacity, 2)
            shard.v = _grow(shard.v, shard.length, capacity, 2)
            shard.pos = _grow(shard.pos, shard.length, capacity, 0)
        shard.k[:, :, shard.length : new_len] = k.index_select(2, mine)
        shard.v[:, :, shard.length : new_len] = v.index_select(2, mine)
        shard.pos[shard.length : new_len] = pos.to(k.device, torch.int64).index_select(0, mine)
        shard.length = new_len

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's shard of ``layer``: k, v (views, length Tk_local) and their positions."""
        if layer not in self._layers:
            raise KeyError(f"layer {layer} has nothing appended yet")
        shard = self._layers[layer]
        n = shard.length
        return shard.k[:, :, :n], shard.v[:, :, :n], shard.pos[:n]
