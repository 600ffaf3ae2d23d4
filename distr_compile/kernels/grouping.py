"""Triton kernel: per block of query rows, hash the d columns of Q with angular LSH and order them.

One program per (block of BLOCK_M query rows, batch*head). The program
  1. draws its hyperplanes (R x BLOCK_M Gaussians) from the same counter-based hash as
     ``reference.hyperplanes``, so nothing is read from memory or launched beforehand;
  2. projects the block (BLOCK_M x D, rows past the sequence read as zeros) with one fp32 dot;
     the sign bits of each column's R projections form its code;
  3. ranks the packed keys ``code * D + column`` by counting smaller keys (a D x D comparison,
     cheaper than a sort network for D <= 256) and scatters each column to its rank.
The result equals ``reference.group_columns`` up to sign flips of projections within rounding of
zero (the hyperplanes' log/cos and the dot's summation order differ in the last ulp).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..config import DistrConfig

MIN_DOT = 16  # tl.dot needs every dim >= 16: hyperplanes beyond R are masked to zero


@triton.jit
def _mix32(x):
    """murmur3's finaliser on int64 holding uint32 values (twin of reference._mix32)."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _hash_uniform(seed, index):
    """Uniforms in (0, 1) from int64 indices (twin of reference.hash_uniform)."""
    key = (0x9E3779B9 * (tl.cast(seed, tl.int64) + 1)) & 0x7FFFFFFF
    x = _mix32(_mix32(index ^ key) + index)
    return (x.to(tl.float32) + 0.5) * (1.0 / 4294967296.0)


@triton.jit
def _lsh_group_kernel(
    Q, PERM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    num_heads, seq_len, num_blocks, num_planes, seed,
    BLOCK_M: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R)

    index = (offs_r[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]).to(tl.int64)
    u0 = _hash_uniform(seed, index)
    u1 = _hash_uniform(seed, index + num_planes * BLOCK_M)
    planes = tl.sqrt(-2.0 * tl.log(u0)) * tl.cos(6.283185307179586 * u1)
    planes = tl.where(offs_r[:, None] < num_planes, planes, 0.0)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0).to(tl.float32)
    proj = tl.dot(planes, q, input_precision="ieee")  # (R, D)
    codes = tl.sum((proj > 0).to(tl.int32) << offs_r[:, None], axis=0)
    keys = codes * D + offs_d
    rank = tl.sum((keys[None, :] < keys[:, None]).to(tl.int32), axis=1)
    tl.store(PERM + (pid_bh * num_blocks + pid_m) * D + rank, offs_d)


def lsh_group(q: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """Column order per query block for canonical q (B, H, L, D): (B, H, nb, D) int32."""
    B, H, L, D = q.shape
    nb = (L + config.block_m - 1) // config.block_m
    perm = torch.empty(B, H, nb, D, device=q.device, dtype=torch.int32)
    torch.library.wrap_triton(_lsh_group_kernel)[(nb, B * H)](
        q, perm,
        *q.stride(),
        H, L, nb, config.num_hyperplanes, config.seed,
        BLOCK_M=config.block_m, D=D, R=max(MIN_DOT, triton.next_power_of_2(config.num_hyperplanes)),
    )
    return perm
