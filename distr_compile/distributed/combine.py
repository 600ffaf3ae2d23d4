"""The global half of Tree Attention: merge every rank's partial (out, lse) through collectives.

Three interchangeable algorithms, equal in result (see merge.py for the math):
  "three":     all-reduce MAX of lse, then SUM of w * out and SUM of w (3 collectives);
  "fused":     the same with w * out and w packed into one buffer (2 collectives);
  "allgather": one all-gather of [out, lse], then a local merge (1 collective, p x the bytes in).
Small messages are latency-bound, where fewer collectives win; large ones are bandwidth-bound,
where the all-reduce's 2 (p-1)/p beats the all-gather's p - 1. "auto" picks the all-gather while the
gathered buffer stays under ``AUTO_ALLGATHER_BYTES`` and "fused" above. With a multi-level
:class:`Topology` each level merges to a full (out, lse) that the next level merges again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import COMBINE_MODES, CommCounter, all_gather, all_reduce, no_backward
from .merge import merge_partials, normalize, safe_max
from .topology import Topology

AUTO_ALLGATHER_BYTES = 1 << 20


def choose_mode(rows: int, value_dim: int, world_size: int, itemsize: int = 4) -> str:
    """The "auto" rule for one level: all-gather while p * rows * (Dv + 1) values fit the budget."""
    return "allgather" if world_size * rows * (value_dim + 1) * itemsize <= AUTO_ALLGATHER_BYTES else "fused"


def _reduce(out: torch.Tensor, lse: torch.Tensor, group, fused: bool, counter: CommCounter | None):
    shift = lse.clone(memory_format=torch.contiguous_format)
    all_reduce(shift, dist.ReduceOp.MAX, group, counter)
    shift = safe_max(shift)
    w = torch.exp(lse - shift)
    if fused:
        buf = torch.cat([out * w.unsqueeze(-1), w.unsqueeze(-1)], dim=-1)
        all_reduce(buf, dist.ReduceOp.SUM, group, counter)
        num, den = buf[..., :-1], buf[..., -1]
    else:
        num = out * w.unsqueeze(-1)
        all_reduce(num, dist.ReduceOp.SUM, group, counter)
        den = w
        all_reduce(den, dist.ReduceOp.SUM, group, counter)
    return normalize(num, den, shift)


def _gather(out: torch.Tensor, lse: torch.Tensor, group, counter: CommCounter | None):
    packed = all_gather(torch.cat([out, lse.unsqueeze(-1)], dim=-1), group, counter)
    return merge_partials(packed[..., :-1], packed[..., -1], dim=0)


def combine(
    out: torch.Tensor,
    lse: torch.Tensor,
    group=None,
    *,
    mode: str = "auto",
    counter: CommCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge this rank's partial out (..., Dv) and lse (...) with every other rank's over ``group``
    (None, a ProcessGroup, a :class:`Topology` or a DeviceMesh); every rank gets the merged
    (out, lse). All ranks must call it with the same shapes and mode. Across more than one rank
    it has no backward (calling backward raises)."""
    if mode != "auto" and mode not in COMBINE_MODES:
        raise ValueError(f"mode must be 'auto' or one of {COMBINE_MODES}, got {mode!r}")
    if out.shape[:-1] != lse.shape or out.dtype != lse.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} and lse {tuple(lse.shape)} {lse.dtype} do not match")
    topology = Topology.of(group)
    levels = [(level, p) for level, p in zip(topology.levels, topology.sizes()) if p > 1]
    if not levels:
        return out, lse  # one rank: the identity, differentiable as is

    def merge_levels(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for level, p in levels:
            level_mode = choose_mode(lse.numel(), out.shape[-1], p, out.element_size()) if mode == "auto" else mode
            if level_mode == "allgather":
                out, lse = _gather(out, lse, level, counter)
            else:
                out, lse = _reduce(out, lse, level, level_mode == "fused", counter)
        return out, lse

    return no_backward(merge_levels, out, lse)
