"""Input checking and the canonical (B, H, L, E) view shared by the op, the kernels and the oracle.

The public calling convention is SDPA's: q (..., Hq, Lq, E), k (..., Hkv, Lk, E),
v (..., Hkv, Lk, Ev), a mask broadcastable to (..., Hq, Lq, Lk). Leading dims broadcast as in SDPA
(batch dims always, head dims without ``enable_gqa``) and are then flattened into one batch dim;
inputs of rank 2 or 3 get unit batch/head dims. Every bad input fails here, before any
kernel runs, with a message naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Canonical:
    """q, k, v as (B, H, L, E) and the mask as (B, Hq, Lq, Lk) (a broadcasting view), plus the
    leading shape needed to give outputs back in the caller's layout and the shapes q, k, v were
    broadcast to (their gradients sum back over the broadcast dims)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    lead_shape: torch.Size
    shapes: tuple[torch.Size, torch.Size, torch.Size]

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, L, X) or (B, H, L) back to the caller's leading dims."""
        return out.reshape(*self.lead_shape, *out.shape[2:])

    def flatten(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``restore``: a tensor in the caller's leading dims (an output, or a
        gradient on one) as (B, H, L, X) or (B, H, L)."""
        return t.reshape(*self.q.shape[:3], *t.shape[len(self.lead_shape) + 1:])

    def unbroadcast(self, grads: tuple[torch.Tensor, ...],
                    inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Canonical gradients (dq, dk, dv) in the callers' shapes: reshaped, and summed over the
        dims an input was broadcast along."""
        return tuple(g.reshape(full).sum_to_size(t.shape) for g, full, t in zip(grads, self.shapes, inputs))


def _to_4d(x: torch.Tensor) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x.flatten(0, x.dim() - 4)


def canonicalize(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    group_size: int,
) -> Canonical:
    """Validate SDPA-style arguments and return their canonical 4-d views (no copies)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., L, E) with rank >= 2, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {[str(d) for d in SUPPORTED_DTYPES]}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"q, k, v must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim E, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if k.shape[-2] == 0:
        raise ValueError("k and v have no keys (length 0)")
    q, k, v = _broadcast(q, k, v, enable_gqa)
    hq = q.shape[-3] if q.dim() >= 3 else 1
    hkv = k.shape[-3] if k.dim() >= 3 else 1
    if enable_gqa and hq % hkv:
        raise ValueError(f"enable_gqa needs query heads ({hq}) divisible by key/value heads ({hkv})")
    if q.shape[-1] % group_size:
        raise ValueError(f"head dim {q.shape[-1]} is not divisible by group_size {group_size}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")

    lead_shape = q.shape[:-2]
    mask = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as SDPA)")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        target = (*q.shape[:-1], k.shape[-2])
        try:
            mask = attn_mask.expand(target)
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., Hq, Lq, Lk) = {tuple(target)}"
            ) from None
        mask = _to_4d(mask)
    return Canonical(_to_4d(q), _to_4d(k), _to_4d(v), mask, lead_shape, (q.shape, k.shape, v.shape))


def _broadcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v expanded (views) to common leading dims, as SDPA broadcasts them: the batch dims,
    and the head dim too unless ``enable_gqa`` (then k and v share their head count)."""
    fixed = 3 if enable_gqa and q.dim() >= 3 else 2  # the trailing dims each keeps its own
    if fixed == 3 and k.shape[-3] != v.shape[-3]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[-3]} and {v.shape[-3]}")
    try:
        lead = torch.broadcast_shapes(q.shape[:-fixed], k.shape[:-fixed], v.shape[:-fixed])
    except RuntimeError:
        if fixed == 2 and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
            raise ValueError(f"q has {q.shape[-3]} heads but k/v have {k.shape[-3]}; pass enable_gqa=True for "
                             "grouped-query attention") from None
        what = "batch dims" if fixed == 3 else "batch and head dims"
        raise ValueError(f"{what} do not broadcast: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}") from None
    return tuple(t if t.shape[:-fixed] == lead else t.expand(*lead, *t.shape[-fixed:]) for t in (q, k, v))
