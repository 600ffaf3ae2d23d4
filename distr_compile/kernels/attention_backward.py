"""Triton kernels: DistrAttention backward, FlashAttention-2 style, with the grouping held fixed.

The approximation is exact attention on ``q_tilde`` (q with every column replaced, per query
block, by its group's representative; see reference.py), so with S = Q_rep K_fused^T * scale
== q_tilde K^T * scale, P = softmax(S), dP = dO V^T, delta = rowsum(dO * O) and
dS = P * (dP - delta):

    dV = P^T dO,   dK = dS^T q_tilde * scale,   dQ_rep = dS K_fused * scale,

and dq spreads dQ_rep back over each group's columns, column c of group g getting dQ_rep[:, g] times
c's weight in the representative ("mean": 1/G; "sample": 1 for the group's first column, 0 for the
others; "lstsq": least-squares weights, held fixed like the grouping). dK needs no scatter
because q_tilde already carries each block's own grouping: that is why the preprocess writes it.

Three launches, as in FlashAttention-2 (P is recomputed from the forward's log-sum-exp):
  1. ``_bwd_preprocess_kernel`` (query block x batch*head): delta, the base-2 lse (+inf for fully
     masked or padded rows so that P = 0 there), and for G > 1 Q_rep (B, Hq, Lq, D/G) and q_tilde
     (B, Hq, Lq, D) from one contiguous load of each block, permuted in registers (``tl.gather``;
     q_tilde through the inverse permutation, so its stores stay row-contiguous), once;
  2. ``_bwd_dkdv_kernel`` (key tile x batch*kv_head): holds a K/V tile and loops over the query
     heads sharing it (GQA sums in registers, no atomics) and their query chunks, accumulating
     dK and dV; mask-free interior chunks, masked chunks only on the causal diagonal and the
     ragged end;
  3. ``_bwd_dq_kernel`` (query block x batch*head): the forward's loop over key tiles, producing
     dQ_rep, then dq gathered from it through the inverse permutation (row-contiguous stores).

Both main kernels compute S (and dQ) either with the reduced d/G inner dimension (Q_rep against
K_fused, built by the forward's G contiguous row gathers of K^T) or dense (q_tilde against K, full
d, K streamed straight into shared memory). The grouped path does (1 - 1/G) fewer FLOPs on the
Q K^T side but its gathered tiles pass through registers; which wins depends on G, d and the GPU,
so ``GROUPED`` is an autotune knob (the forward's numbers on an H200 show gathers costing more
than they save at G = 2). In the dense dq path dQ_rep comes from dq_tilde by one D x D/G one-hot
product per program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import (
    LOG2E, MASK_ADD, MASK_BOOL, MASK_NONE, QUICK, SHARED_MEMORY_BUDGET, _keys_t, _load, _query_representatives,
    keys_contiguous,
)



def _dq_configs() -> list[triton.Config]:
    """dq kernel: key tile, grouped or dense Q K^T, warps, pipeline depth (one config when QUICK)."""
    if QUICK:
        return [triton.Config({"BLOCK_N": 32, "GROUPED": True}, num_warps=4, num_stages=2)]
    shapes = [(64, 4, 3), (128, 8, 3), (32, 4, 4)]
    return [
        triton.Config({"BLOCK_N": n, "GROUPED": grouped}, num_warps=w, num_stages=s)
        for grouped in (False, True) for n, w, s in shapes
    ]


def _dkdv_configs() -> list[triton.Config]:
    """dK/dV kernel: key tile (held), query chunk (streamed), grouped or dense, warps, depth."""
    if QUICK:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "GROUPED": True}, num_warps=4, num_stages=2)]
    shapes = [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_M": m, "GROUPED": grouped}, num_warps=w, num_stages=s)
        for grouped in (False, True) for n, m, w, s in shapes
    ]


def _arg(name, named_args, kwargs):
    return named_args[name] if name in named_args else kwargs[name]


def _prune_dq(configs, named_args, **kwargs):
    """Grouped configs only for G > 1; K/V pipeline within shared memory (as the forward)."""
    g = _arg("G", named_args, kwargs)
    width = _arg("D", named_args, kwargs) + _arg("DV", named_args, kwargs)
    kept = [
        c for c in configs
        if (g > 1 or not c.kwargs["GROUPED"]) and 2 * c.kwargs["BLOCK_N"] * width * c.num_stages <= SHARED_MEMORY_BUDGET
    ]
    return kept or [triton.Config({"BLOCK_N": 32, "GROUPED": False}, num_warps=4, num_stages=2)]


def _prune_dkdv(configs, named_args, **kwargs):
    """Grouped configs only for G > 1 and query chunks inside one grouping block (one ``perm``
    per chunk); q_tilde/dO pipeline within shared memory; the held dK/dV/K/V tiles at most
    128 x 128 elements each (register budget)."""
    g, block_group = _arg("G", named_args, kwargs), _arg("BLOCK_GROUP", named_args, kwargs)
    d, dv = _arg("D", named_args, kwargs), _arg("DV", named_args, kwargs)
    kept = [
        c for c in configs
        if (not c.kwargs["GROUPED"] or (g > 1 and c.kwargs["BLOCK_M"] <= block_group))
        and 2 * c.kwargs["BLOCK_M"] * (d + dv) * c.num_stages <= SHARED_MEMORY_BUDGET
        and c.kwargs["BLOCK_N"] * max(d, dv) <= 128 * 128
    ]
    return kept or [triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "GROUPED": False}, num_warps=4, num_stages=1)]


@triton.jit
def _scores(s, mask_base, offs_m, offs_n, row_ok, col_ok, stride_mm, stride_mn,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDARY: tl.constexpr):
    """Mask a tile of base-2 scores s[m, n] (offs_m, offs_n broadcast to s's orientation). Only
    the causal cut needs applying: padded rows have P = 0 through their +inf lse, and padded keys
    contribute nothing because their K and V rows load as zeros."""
    if MASK_KIND != 0:
        m_tile = tl.load(mask_base + offs_m * stride_mm + offs_n * stride_mn, mask=row_ok & col_ok, other=0)
        if MASK_KIND == 1:
            s = tl.where(m_tile != 0, s, float("-inf"))
        else:
            s += m_tile.to(tl.float32) * LOG2E
    if BOUNDARY and IS_CAUSAL:
        s = tl.where(offs_n <= offs_m, s, float("-inf"))
    return s


@triton.jit
def _bwd_preprocess_kernel(
    Q, OUT, DO, LSE, DLSE, PERM, PERM_INV, WEIGHTS, DELTA, LSE2, Q_REP, Q_TILDE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    num_heads, len_q, num_blocks,
    BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse (a gradient on lse adds P * dlse to dS), the base-2 lse
    (+inf where the row is fully masked or padded), and for G > 1 Q_rep and q_tilde."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    row_ok = offs_m < len_q
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * len_q + offs_m, mask=row_ok, other=0.0)
    tl.store(DELTA + pid_bh * len_q + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + pid_bh * len_q + offs_m, mask=row_ok, other=float("-inf"))
    tl.store(LSE2 + pid_bh * len_q + offs_m, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=row_ok)

    if G > 1:
        block = (pid_bh * num_blocks + pid_m) * D
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        q_rep = _query_representatives(q, PERM + block, WEIGHTS + block, D, G)
        rows = pid_bh * len_q + offs_m[:, None]
        tl.store(Q_REP + rows * (D // G) + tl.arange(0, D // G)[None, :], q_rep, mask=row_ok[:, None])
        # q_tilde[:, c] = q_rep[:, group of c], gathered through the inverse permutation so that
        # the store is row-contiguous (scattering q_rep's columns was ~10x slower on an H100)
        group = tl.load(PERM_INV + block + offs_d) // G
        q_tilde = tl.gather(q_rep, tl.broadcast_to(group[None, :], (BLOCK_M, D)), axis=1)
        tl.store(Q_TILDE + rows * D + offs_d[None, :], q_tilde, mask=row_ok[:, None])


@triton.jit
def _dkdv_chunks(
    dk, dv, k, v, k_base, q_rep_base, q_tilde_base, do_base, lse_base, delta_base, mask_base, perm_base,
    start, end, offs_n, col_ok, len_q, qk_scale,
    stride_kn, stride_kd, stride_tm, stride_td, stride_gm, stride_gd, stride_mm, stride_mn,
    BLOCK_M: tl.constexpr, BLOCK_GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
    GROUPED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDARY: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query chunks [start, end) of one query head, in the
    transposed orientation (rows = keys). BOUNDARY=False: every row in range and (causal) at or
    below every key of the tile, so no loads are masked and no causal cut is applied."""
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_g = tl.arange(0, D // G)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < len_q
        q_tilde_t = _load(q_tilde_base + offs_m[None, :] * stride_tm + offs_d[:, None] * stride_td, row_ok[None, :], BOUNDARY)
        if GROUPED:
            k_fused_t = _keys_t(k_base, perm_base + (start_m // BLOCK_GROUP) * D, offs_n, col_ok,
                                stride_kn, stride_kd, D, G, True)
            q_rep = _load(q_rep_base + offs_m[:, None] * (D // G) + offs_g[None, :], row_ok[:, None], BOUNDARY)
            s_t = tl.dot(tl.trans(k_fused_t), tl.trans(q_rep))
        else:
            s_t = tl.dot(k, q_tilde_t)
        s_t = _scores(s_t * qk_scale, mask_base, offs_m[None, :], offs_n[:, None], row_ok[None, :], col_ok[:, None],
                      stride_mm, stride_mn, IS_CAUSAL, MASK_KIND, BOUNDARY)
        if BOUNDARY:
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        p_t = tl.math.exp2(s_t - lse[None, :])
        do = _load(do_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd, row_ok[:, None], BOUNDARY)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_tilde_t.dtype), tl.trans(q_tilde_t))
    return dk, dv


@triton.autotune(
    configs=_dkdv_configs(),
    key=["lq_bucket", "D", "DV", "G", "BLOCK_GROUP", "IS_CAUSAL", "MASK_KIND"],
    prune_configs_by={"early_config_prune": _prune_dkdv},
)
@triton.jit
def _bwd_dkdv_kernel(
    K, V, Q_REP, Q_TILDE, DO, LSE2, DELTA, PERM, MASK, GRAD_K, GRAD_V,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_th, stride_tm, stride_td,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_kv_heads, gqa_ratio, len_q, len_k, num_blocks, qk_scale, scale, lq_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    G: tl.constexpr, GROUPED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
):
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # Inductor may pass fp64
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // num_kv_heads
    hk = pid_bhk % num_kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    col_ok = offs_n < len_k
    k_base = K + b * stride_kb + hk * stride_kh
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)

    # Query chunks: [lo, mid) straddle the causal diagonal (masked), [mid, full) are interior,
    # [max(mid, full), padded) hold the ragged end (masked). Causal rows above the tile are skipped.
    padded = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    full = (len_q // BLOCK_M) * BLOCK_M
    lo = 0
    mid = 0
    if IS_CAUSAL:
        lo = min((start_n // BLOCK_M) * BLOCK_M, padded)
        mid = min(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, padded)
    for i in range(gqa_ratio):
        h = hk * gqa_ratio + i
        bh = b * num_kv_heads * gqa_ratio + h
        q_rep_base = Q_REP + bh * len_q * (D // G)
        q_tilde_base = Q_TILDE + b * stride_tb + h * stride_th
        do_base = DO + b * stride_gb + h * stride_gh
        mask_base = MASK + b * stride_mb + h * stride_mh
        perm_base = PERM + bh * num_blocks * D
        for c in tl.static_range(3):
            if c == 0:
                first, last = lo, mid
            elif c == 1:
                first, last = mid, full
            else:
                first, last = max(mid, full), padded
            dk, dv = _dkdv_chunks(
                dk, dv, k, v, k_base, q_rep_base, q_tilde_base, do_base, LSE2 + bh * len_q, DELTA + bh * len_q,
                mask_base, perm_base, first, last, offs_n, col_ok, len_q, qk_scale,
                stride_kn, stride_kd, stride_tm, stride_td, stride_gm, stride_gd, stride_mm, stride_mn,
                BLOCK_M, BLOCK_GROUP, D, DV, G, GROUPED and G > 1, IS_CAUSAL, MASK_KIND, c != 1,
            )
    tl.store(GRAD_K + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(GRAD_K.dtype.element_ty), mask=col_ok[:, None])
    tl.store(GRAD_V + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(GRAD_V.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(
    acc, q_op, do, lse, delta, k_base, v_base, mask_base, perm_base, start, end, offs_m, row_ok, len_k, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDARY: tl.constexpr,
):
    """Accumulate dS K (G = 1: dense, full d) or dS K_fused (d/G) over key tiles [start, end)."""
    offs_dv = tl.arange(0, DV)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        k_t = _keys_t(k_base, perm_base, cols, col_ok, stride_kn, stride_kd, D, G, BOUNDARY)
        s = _scores(tl.dot(q_op, k_t) * qk_scale, mask_base, offs_m[:, None], cols[None, :], row_ok[:, None],
                    col_ok[None, :], stride_mm, stride_mn, IS_CAUSAL, MASK_KIND, BOUNDARY)
        p = tl.math.exp2(s - lse[:, None])
        v_t = _load(v_base + offs_dv[:, None] * stride_vd + cols[None, :] * stride_vn, col_ok[None, :], BOUNDARY)
        ds = p * (tl.dot(do, v_t) - delta[:, None])
        acc += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    return acc


@triton.autotune(
    configs=_dq_configs(),
    key=["lk_bucket", "D", "DV", "G", "BLOCK_M", "IS_CAUSAL", "MASK_KIND"],
    prune_configs_by={"early_config_prune": _prune_dq},
)
@triton.jit
def _bwd_dq_kernel(
    K, V, Q_REP, Q_TILDE, DO, LSE2, DELTA, PERM, MASK, PERM_INV, WEIGHTS, DQ,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_th, stride_tm, stride_td,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_qb, stride_qh, stride_qm, stride_qd,
    num_heads, gqa_ratio, len_q, len_k, num_blocks, qk_scale, scale, lk_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
    GROUPED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
):
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # Inductor may pass fp64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // gqa_ratio
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, D // G)
    row_ok = offs_m < len_q
    block = (pid_bh * num_blocks + pid_m) * D  # this query block's grouping and weights
    perm_base = PERM + block
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + tl.arange(0, DV)[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE2 + pid_bh * len_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * len_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh

    interior = (len_k // BLOCK_N) * BLOCK_N
    end = len_k
    if IS_CAUSAL:
        interior = min(interior, ((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
        end = min(len_k, (pid_m + 1) * BLOCK_M)
    if GROUPED and G > 1:
        q_op = tl.load(Q_REP + (pid_bh * len_q + offs_m[:, None]) * (D // G) + offs_g[None, :], mask=row_ok[:, None], other=0.0)
        acc = tl.zeros([BLOCK_M, D // G], dtype=tl.float32)
        G_DOT: tl.constexpr = G
    else:
        q_op = tl.load(Q_TILDE + b * stride_tb + h * stride_th + offs_m[:, None] * stride_tm + offs_d[None, :] * stride_td,
                       mask=row_ok[:, None], other=0.0)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        G_DOT: tl.constexpr = 1
    for c in tl.static_range(2):
        acc = _dq_tiles(
            acc, q_op, do, lse, delta, k_base, v_base, mask_base, perm_base,
            0 if c == 0 else interior, interior if c == 0 else end, offs_m, row_ok, len_k, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            BLOCK_N, D, DV, G_DOT, IS_CAUSAL, MASK_KIND, c == 1,
        )
    acc = acc * scale

    dq_rows = DQ + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    if G > 1:
        if not GROUPED:
            # dQ_rep[:, g] = sum of dq_tilde over group g's columns: one product with the one-hot
            # D x D/G membership matrix, in fp32.
            member = tl.zeros([D, D // G], dtype=tl.float32)
            for j in tl.static_range(G):
                cols_j = tl.load(perm_base + offs_g * G + j)
                member += (offs_d[:, None] == cols_j[None, :]).to(tl.float32)
            acc = tl.dot(acc, member, input_precision="ieee")
        # dq[:, c] = dQ_rep[:, group of c] * (c's weight), gathered through the inverse
        # permutation: row-contiguous stores
        position = tl.load(PERM_INV + block + offs_d)
        acc = tl.gather(acc, tl.broadcast_to((position // G)[None, :], (BLOCK_M, D)), axis=1)
        acc = acc * tl.load(WEIGHTS + block + position)[None, :]
    tl.store(dq_rows + offs_d[None, :] * stride_qd, acc.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def distr_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor | None,
    weights: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    group_size: int,
    block_m: int,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``distr_forward`` on canonical tensors, the grouping ``perm`` and
    the representatives' ``weights`` held fixed: q (B, Hq, Lq, D), out/grad_out (B, Hq, Lq, DV),
    k (B, Hkv, Lk, D), v (B, Hkv, Lk, DV) (DV != D only for G = 1), the forward's ``lse``
    (B, Hq, Lq) natural-log fp32, mask (B, Hq, Lq, Lk) view, perm and weights as for
    ``distr_forward`` (None for G = 1). ``grad_lse`` (B, Hq, Lq), if given, is the incoming
    gradient on lse. Any strides."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[-1]
    nb = triton.cdiv(Lq, block_m)
    G = group_size
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if G > 1:
        k = keys_contiguous(k)  # vectorised row gathers of K^T
    lse = lse.contiguous()
    delta = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    if G > 1:
        q_rep = torch.empty(B, Hq, Lq, D // G, device=q.device, dtype=q.dtype)
        q_tilde = torch.empty(B, Hq, Lq, D, device=q.device, dtype=q.dtype)
    else:
        q_rep = q_tilde = q
    if perm is None:
        perm = perm_inv = q
    else:  # the inverse permutation: position of each column in its block's order
        positions = torch.arange(D, device=perm.device, dtype=perm.dtype).expand_as(perm)
        perm_inv = torch.empty_like(perm).scatter_(-1, perm.long(), positions)
    dlse = delta if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    if attn_mask is None:
        mask_kind, mask, mask_strides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_ADD
        mask, mask_strides = attn_mask, attn_mask.stride()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = scale * LOG2E.value

    torch.library.wrap_triton(_bwd_preprocess_kernel)[(nb, B * Hq)](
        q, out, grad_out, lse, dlse, perm, perm_inv, q if weights is None else weights, delta, lse2, q_rep, q_tilde,
        *q.stride(), *out.stride(), *grad_out.stride(),
        Hq, Lq, nb,
        BLOCK_M=block_m, D=D, DV=DV, G=G, HAS_DLSE=grad_lse is not None,
    )
    common = (k, v, q_rep, q_tilde, grad_out, lse2, delta, perm, mask)
    strides = (*k.stride(), *v.stride(), *q_tilde.stride(), *grad_out.stride(), *mask_strides)
    dkdv_grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)
    torch.library.wrap_triton(_bwd_dkdv_kernel)[dkdv_grid](
        *common, dk, dv, *strides, *dk.stride(), *dv.stride(),
        Hkv, Hq // Hkv, Lq, Lk, nb, qk_scale, scale, triton.next_power_of_2(Lq),
        BLOCK_GROUP=block_m, D=D, DV=DV, G=G, IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
    )
    torch.library.wrap_triton(_bwd_dq_kernel)[(nb, B * Hq)](
        *common, perm_inv, q if weights is None else weights, dq, *strides, *dq.stride(),
        Hq, Hq // Hkv, Lq, Lk, nb, qk_scale, scale, triton.next_power_of_2(Lk),
        BLOCK_M=block_m, D=D, DV=DV, G=G, IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
    )
    return dq, dk, dv
