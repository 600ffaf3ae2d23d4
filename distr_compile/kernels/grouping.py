"""Triton kernel: per block of query rows, hash the d columns of Q with angular LSH and sort them.

One program per (block of BLOCK_M query rows, batch*head). The block (BLOCK_M x D) is projected on
R hyperplanes with one small fp32 dot (R x BLOCK_M) @ (BLOCK_M x D); the sign bits of each column's
R projections form its code, and sorting the packed keys ``code * D + column`` gives the column
order (ties broken by column index, exactly as ``reference.group_columns``). Rows past the end of
the sequence read as zeros, like the oracle's padding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import DistrConfig
from ..reference import hyperplanes

MIN_DOT = 16  # tl.dot needs every dim >= 16: hyperplanes are padded with zero rows (sign bit 0)


@triton.jit
def _lsh_group_kernel(
    Q, PLANES, PERM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    num_heads, seq_len, num_blocks,
    BLOCK_M: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0).to(tl.float32)
    planes = tl.load(PLANES + offs_r[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :])
    proj = tl.dot(planes, q, input_precision="ieee")  # (R, D)
    codes = tl.sum((proj > 0).to(tl.int32) << offs_r[:, None], axis=0)
    keys = tl.sort(codes * D + offs_d)
    tl.store(PERM + (pid_bh * num_blocks + pid_m) * D + offs_d, keys % D)


def lsh_group(q: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """Column order per query block for canonical q (B, H, L, D): (B, H, nb, D) int32."""
    B, H, L, D = q.shape
    nb = math.ceil(L / config.block_m)
    R = max(MIN_DOT, triton.next_power_of_2(config.num_hyperplanes))
    planes = hyperplanes(config.num_hyperplanes, config.block_m, config.seed, q.device)
    planes = torch.nn.functional.pad(planes, (0, 0, 0, R - config.num_hyperplanes))
    perm = torch.empty(B, H, nb, D, device=q.device, dtype=torch.int32)
    torch.library.wrap_triton(_lsh_group_kernel)[(nb, B * H)](
        q, planes, perm,
        *q.stride(),
        H, L, nb,
        BLOCK_M=config.block_m, D=D, R=R,
    )
    return perm
