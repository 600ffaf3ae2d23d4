"""The local half of Tree Attention: attend the queries to this rank's KV shard, return (out, lse).

Shapes are canonical: q (B, Hq, Tq, D) with Tq >= 1 (decode, speculative decoding, chunked prefill),
k (B, Hkv, Tk, D) and v (B, Hkv, Tk, Dv) with Hq % Hkv == 0 (GQA without copying K/V) and any
Tk >= 0 (shards may be uneven or empty). The result is fp32 (fp64 for fp64 inputs) because it is
only an intermediate of the combine, where precision matters more than bytes.

Causal masking works on global token positions, not on local indices, because a shard holds an
arbitrary subset of the sequence (round-robin caches are not contiguous): key j is visible to query
i iff k_pos[j] <= q_pos[i]. A position argument is either an int (the first position of a
contiguous run) or a 1-d integer tensor with one entry per token.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from ..kernels import decode
from .merge import merge_partials

Positions = int | torch.Tensor
BACKENDS = ("auto", "triton", "torch")


def positions(pos: Positions, length: int, device: torch.device, name: str) -> torch.Tensor:
    """An int64 tensor of ``length`` global positions from an int start or a 1-d tensor."""
    if isinstance(pos, int):
        return torch.arange(pos, pos + length, device=device, dtype=torch.int64)
    if not isinstance(pos, torch.Tensor) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an int or an integer tensor, got {pos!r:.80}")
    if pos.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(pos.shape)}")
    return pos.to(device=device, dtype=torch.int64)


def require_k_pos(q_pos: Positions | None, k_pos: Positions | None) -> None:
    """Across ranks a causal mask needs each shard's own positions: defaulting them to 0 would
    place every shard at the start of the sequence and mask silently wrong."""
    if q_pos is not None and k_pos is None:
        raise ValueError("q_pos needs k_pos: the global positions of this rank's keys (an int start or a 1-d tensor)")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error unless q, k, v are canonical decode tensors (see module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d (B, H, T, E), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] == 0:
        raise ValueError("q has no query rows (Tq = 0)")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/heads/length differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def local_partial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    q_pos: Positions | None = None,
    k_pos: Positions = 0,
    backend: str = "auto",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to one KV shard: (out (B, Hq, Tq, Dv), lse (B, Hq, Tq)), fp32 (fp64 for fp64).

    ``q_pos`` None means no causal mask; otherwise it and ``k_pos`` give global positions.
    ``backend``: "triton" (the split-KV kernel, ``num_splits`` chunks then a local merge), "torch"
    (``reference.attention``), or "auto" (Triton on CUDA when the shapes allow it)."""
    check_qkv(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qp = kp = None
    if q_pos is not None:
        qp = positions(q_pos, Tq, q.device, "q_pos")
        kp = positions(k_pos, Tk, q.device, "k_pos")
    if Tk == 0:
        out = torch.zeros(B, Hq, Tq, v.shape[-1], device=q.device, dtype=acc)
        return out, torch.full((B, Hq, Tq), -math.inf, device=q.device, dtype=acc)
    if backend == "auto":
        backend = "triton" if q.is_cuda and decode.supports(q, k, v) else "torch"
    if backend == "triton":
        if not decode.supports(q, k, v):
            raise ValueError(
                f"the Triton decode kernel needs fp16/bf16/fp32, power-of-two head dims >= 16 and at most "
                f"{decode.MAX_ROWS} query rows per KV head (GQA ratio x Tq), got {q.dtype}, D={D}, "
                f"Dv={v.shape[-1]}, rows={Hq // k.shape[1] * Tq}"
            )
        return merge_partials(*decode.split_kv_partials(q, k, v, qp, kp, scale, num_splits), dim=-1)
    mask = None if qp is None else kp[None, :] <= qp[:, None]
    return reference.attention(q.to(acc), k, v, mask, scale=scale)
