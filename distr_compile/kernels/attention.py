"""Triton kernel: DistrAttention forward, FlashAttention-2 style, with the grouped Q K^T.

One program per (query block, batch*head); the query block is the grouping block, so the whole
tile shares one column order ``perm`` (from kernels/grouping.py). The program
  1. loads its Q tile once, permutes the columns in registers (``tl.gather``) and reduces each run
     of G columns to its representative: Q_rep (BLOCK_M x D/G);
  2. streams K/V tiles: each K tile is loaded contiguously, permuted in registers by the same
     order and summed in runs of G (K_fused, BLOCK_N x D/G), then S = Q_rep K_fused^T is one
     reduced ``tl.dot``; masking and the online softmax are as in FlashAttention-2, and P V keeps
     the full head dim;
  3. writes O and the natural-log LSE (fp32) that Tree Attention and the backward need.
GQA reads the shared K/V head directly (h // ratio): no copies. Masks are read tile by tile
through their strides, so a broadcast mask (stride 0) costs no memory. G = 1 skips the grouping
and is a plain FlashAttention-2 forward (the exact baseline in benchmarks).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
LOG2E = tl.constexpr(1.4426950408889634)


def _configs() -> list[triton.Config]:
    """Autotune space: BLOCK_N, warps and pipeline depth (BLOCK_M is the grouping block, fixed by
    the config). One config under the interpreter, or with DISTR_COMPILE_AUTOTUNE=0 (tests)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    default = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3)
    if os.environ.get("DISTR_COMPILE_AUTOTUNE", "1") == "0":
        return [default]
    return [
        default,
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    ]


@triton.autotune(configs=_configs(), key=["lk_bucket", "D", "G", "BLOCK_M", "IS_CAUSAL", "MASK_KIND"])
@triton.jit
def _distr_fwd_kernel(
    Q, K, V, PERM, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, gqa_ratio, len_q, len_k, num_blocks, qk_scale, lk_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    REP_MEAN: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // gqa_ratio
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < len_q

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None], other=0.0,
    )
    if G > 1:
        perm = tl.load(PERM + (pid_bh * num_blocks + pid_m) * D + offs_d)
        q_groups = tl.reshape(
            tl.gather(q, tl.broadcast_to(perm[None, :], (BLOCK_M, D)), axis=1), (BLOCK_M, D // G, G)
        ).to(tl.float32)
        if REP_MEAN:
            q_rep = tl.sum(q_groups, axis=2) * (1.0 / G)
        else:
            first = (tl.arange(0, G) == 0)[None, None, :]
            q_rep = tl.sum(tl.where(first, q_groups, 0.0), axis=2)
        q_rep = q_rep.to(Q.dtype.element_ty)
    else:
        q_rep = q

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = len_k
    if IS_CAUSAL:
        hi = min(len_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
        if G > 1:
            k_groups = tl.reshape(
                tl.gather(k, tl.broadcast_to(perm[None, :], (BLOCK_N, D)), axis=1), (BLOCK_N, D // G, G)
            )
            k = tl.sum(k_groups.to(tl.float32), axis=2).to(K.dtype.element_ty)
        s = tl.dot(q_rep, tl.trans(k)) * qk_scale
        keep = col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        if MASK_KIND != 0:
            m_ptrs = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
            m_tile = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            if MASK_KIND == 1:
                keep = keep & (m_tile != 0)
            else:
                s += m_tile.to(tl.float32) * LOG2E
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(
        OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty), mask=row_ok[:, None],
    )
    tl.store(LSE + pid_bh * len_q + offs_m, lse, mask=row_ok)


def distr_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    group_size: int,
    block_m: int,
    representative: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on canonical tensors (q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), mask
    (B, Hq, Lq, Lk) view, perm (B, Hq, nb, D) int32 or None for G = 1): returns (out, lse)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nb = math.ceil(Lq / block_m)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32)
    if attn_mask is None:
        mask_kind, mask, mask_strides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_ADD
        mask, mask_strides = attn_mask, attn_mask.stride()
    torch.library.wrap_triton(_distr_fwd_kernel)[(nb, B * Hq)](
        q, k, v, q if perm is None else perm, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        Hq, Hq // Hkv, Lq, Lk, nb, scale * LOG2E.value, triton.next_power_of_2(Lk),
        BLOCK_M=block_m, D=D, G=group_size,
        REP_MEAN=representative == "mean", IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
    )
    return out, lse
