"""Triton kernel: split-KV decode attention partials (flash-decoding), the GPU half of Tree Attention.

A decode step has a handful of query rows (GQA ratio x Tq per KV head) against a long KV shard, so
one program per (batch, KV head) would leave most SMs idle while it streams the whole shard. The
shard is therefore cut into ``num_splits`` chunks: program (split, b * Hkv + hk)
  1. loads the r * Tq query rows that share KV head hk (GQA: each K/V tile is read once for all r
     query heads, no copies), padded to a tile of >= 16 rows for ``tl.dot``;
  2. streams its chunk of K/V in BLOCK_N tiles with the FlashAttention online softmax (base-2
     exponentials), masking keys past the shard and, when causal, keys whose global position is
     after the query's (positions are explicit, so shards need not be contiguous);
  3. writes its un-merged partial: out (fp32, normalised by its own sum) and the natural-log LSE.
The splits are merged by the caller with the same log-sum-exp rule that combines GPUs
(``distr_compile.distributed.merge.merge_partials``). Empty splits give out = 0, lse = -inf.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # read inside the kernel: must be a constexpr global
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_SPLIT = 256  # keys per split below which another split costs more (launch, merge) than it gains
MAX_ROWS = 128  # query rows (GQA ratio x Tq) per program: one register tile; longer prefills use PyTorch


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _split_kv_kernel(
    Q, K, V, QPOS, KPOS, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    num_kv_heads, gqa_ratio, len_q, len_k, split_len, num_splits, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass Python floats as fp64
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_kv_heads
    hk = pid % num_kv_heads
    rows = tl.arange(0, BLOCK_M)  # row i: query head hk * r + i // len_q, query i % len_q
    head = hk * gqa_ratio + rows // len_q
    t = rows % len_q
    row_ok = rows < gqa_ratio * len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)

    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None], other=0.0,
    )
    if CAUSAL:
        q_pos = tl.load(QPOS + t, mask=row_ok, other=0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, len_k)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = col_ok[None, :]
        if CAUSAL:
            k_pos = tl.load(KPOS + cols, mask=col_ok, other=0)
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    row = ((b * num_kv_heads * gqa_ratio + head) * len_q + t) * num_splits + split
    tl.store(OUT + row[:, None] * DV + offs_dv[None, :], out, mask=row_ok[:, None])
    tl.store(LSE + row, lse, mask=row_ok)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel handles these canonical tensors: fp16/bf16/fp32, head dims that are
    powers of two >= 16 (``tl.dot`` and ``tl.arange`` constraints) and at most ``MAX_ROWS`` query
    rows per KV head (it is a decode kernel: the rows of one KV head live in one tile)."""
    dims_ok = all(n >= 16 and n & (n - 1) == 0 for n in (q.shape[-1], v.shape[-1]))
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    return dims_ok and q.dtype in SUPPORTED_DTYPES and rows <= MAX_ROWS


def default_num_splits(batch_kv_heads: int, len_k: int, device: torch.device) -> int:
    """Enough splits for about four programs per SM, but no split shorter than ``MIN_SPLIT`` keys."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(math.ceil(target / batch_kv_heads), math.ceil(len_k / MIN_SPLIT)))


def split_kv_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split partials for canonical q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv)
    with Tk >= 1, and optional int64 positions q_pos (Tq,), k_pos (Tk,) for causal masking.

    Returns out (B, Hq, Tq, S, Dv) and lse (B, Hq, Tq, S), both fp32, S = number of splits.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    ratio = Hq // Hkv
    block_n = 16 if _interpreted() else 64
    if num_splits is None:
        num_splits = default_num_splits(B * Hkv, Tk, q.device)
    split_len = triton.cdiv(triton.cdiv(Tk, num_splits), block_n) * block_n
    num_splits = triton.cdiv(Tk, split_len)
    out = torch.empty(B, Hq, Tq, num_splits, Dv, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, Tq, num_splits, device=q.device, dtype=torch.float32)
    causal = q_pos is not None
    _split_kv_kernel[(num_splits, B * Hkv)](
        q, k, v, q_pos if causal else q, k_pos if causal else q, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        Hkv, ratio, Tq, Tk, split_len, num_splits, scale * LOG2E,
        BLOCK_M=max(16, triton.next_power_of_2(ratio * Tq)), BLOCK_N=block_n, D=D, DV=Dv,
        CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=1 if _interpreted() else 3,
    )
    return out, lse
