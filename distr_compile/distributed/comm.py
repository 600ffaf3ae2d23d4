"""Counted collectives and the byte formulas they must match.

Every collective of the combine and of the ring baseline goes through :class:`CommCounter` (when one
is given), which records per call the message bytes this rank hands to the collective and the wire
bytes it sends under the bandwidth-optimal algorithms (ring all-reduce: 2 (p-1)/p n; all-gather:
(p-1) n; point-to-point: n). The closed forms below say what one step costs; tests check that the
counted traffic equals them, so a change in the algorithm cannot silently change its cost.

Per rank and per attention call, with R = B * Hq * Tq query rows, Dv the value dim, 4-byte fp32
partials, and each level of p > 1 ranks:

    tree "three":     3 all-reduces (max lse; sum w*out; sum w)   message 4 R (Dv + 2)
    tree "fused":     2 all-reduces (max lse; sum [w*out, w])     message 4 R (Dv + 2)
    tree "allgather": 1 all-gather of [out, lse]                  message 4 R (Dv + 1), wire x (p-1)
    ring (pass-KV):   p - 1 sends, each of one shard: B Hkv Tk_j (D + Dv) itemsize (+ 8 Tk_j causal)

so the tree moves O(R Dv) bytes per step whatever the context length, the ring O(context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COMBINE_MODES = ("three", "fused", "allgather")
# all_gather_into_tensor was renamed all_gather_single in torch 2.12 (the old name warns)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Traffic of one rank: collective calls, message bytes and wire bytes."""

    calls: int = 0
    message_bytes: int = 0
    wire_bytes: float = 0.0

    def __add__(self, other: "CommStats") -> "CommStats":
        return CommStats(self.calls + other.calls, self.message_bytes + other.message_bytes, self.wire_bytes + other.wire_bytes)


def _wire(kind: str, nbytes: int, p: int) -> float:
    return {"all_reduce": 2 * (p - 1) / p * nbytes, "all_gather": (p - 1) * nbytes, "send": nbytes}[kind]


@dataclass
class CommCounter:
    """Records the traffic of the collectives it runs; ``stats`` is the running total."""

    stats: CommStats = field(default_factory=CommStats)

    def record(self, kind: str, nbytes: int, group_size: int) -> None:
        self.stats = self.stats + CommStats(1, nbytes, _wire(kind, nbytes, group_size))

    def reset(self) -> None:
        self.stats = CommStats()


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):
        return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "Tree/Ring Attention across ranks has no backward: autograd does not see through the "
            "collectives, so the gradient would miss every other rank's keys. Run it under "
            "torch.no_grad() or torch.inference_mode(), or detach its inputs."
        )


def no_backward(fn, *inputs: torch.Tensor):
    """``fn(*inputs)``, whose result raises on backward rather than give a gradient that holds only
    this rank's share; the forward and its collectives run unchanged, so inference with grad mode
    on keeps working."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _NoBackward.apply(fn, *inputs)
    return fn(*inputs)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, op: dist.ReduceOp, group, counter: CommCounter | None) -> None:
    """In-place all-reduce of ``t`` over ``group``, counted."""
    if counter is not None:
        counter.record("all_reduce", _nbytes(t), dist.get_world_size(group))
    dist.all_reduce(t, op=op, group=group)


def all_gather(t: torch.Tensor, group, counter: CommCounter | None) -> torch.Tensor:
    """All-gather of ``t`` over ``group`` into a new leading dim of size p, counted."""
    p = dist.get_world_size(group)
    if counter is not None:
        counter.record("all_gather", _nbytes(t), p)
    out = t.new_empty(p * t.numel())  # flat: gloo accepts only the concatenated layout
    _all_gather_single(out, t.reshape(-1), group=group)
    return out.view(p, *t.shape)


def count_send(tensors: list[torch.Tensor], counter: CommCounter | None) -> None:
    """Count one point-to-point send of a shard made of ``tensors`` (the ring batches its own
    isend/irecv; one record per shard forwarded)."""
    if counter is not None:
        counter.record("send", sum(_nbytes(t) for t in tensors), 2)


def tree_comm(rows: int, value_dim: int, mode: str, level_sizes: tuple[int, ...], itemsize: int = 4) -> CommStats:
    """Closed-form traffic of one tree combine (see module docstring); levels of size 1 are free."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"mode must be one of {COMBINE_MODES}, got {mode!r}")
    total = CommStats()
    for p in level_sizes:
        if p == 1:
            continue
        if mode == "allgather":
            n = rows * (value_dim + 1) * itemsize
            total = total + CommStats(1, n, _wire("all_gather", n, p))
        else:
            n = rows * (value_dim + 2) * itemsize
            total = total + CommStats(3 if mode == "three" else 2, n, _wire("all_reduce", n, p))
    return total


def ring_comm(shard_bytes: list[int], rank: int) -> CommStats:
    """Closed-form traffic of one ring pass for ``rank``: it forwards, in turn, its own shard and the
    shards of ranks rank-1, ..., rank-p+2 (every shard but its successor's); empty shards are not sent."""
    p = len(shard_bytes)
    sent = [shard_bytes[(rank - j) % p] for j in range(p - 1)]
    return CommStats(sum(1 for n in sent if n), sum(sent), float(sum(sent)))
