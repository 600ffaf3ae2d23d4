"""DistrAttention in plain, vectorised PyTorch: runs on any device and is the oracle for every test.

Tensors here are canonical: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with
Hq % Hkv == 0 (GQA without copies), and an optional mask already broadcast to (B, Hq, Lq, Lk).

The approximation has a closed form that keeps this file short: replacing, inside each block of
``block_m`` query rows, every Q column by its group's representative (``q_tilde``) gives

    q_tilde @ K^T  ==  Q_rep @ K_fused^T      (Q_rep: block_m x d/G, K_fused: Lk x d/G)

because each group contributes rep_g * sum_{c in g} K[:, c]. So the reference is exact attention
on ``q_tilde``: autograd through it is the gradient of the approximate function with the grouping
held fixed, and nothing of size (query blocks x Lk x d/G) is ever materialised.
"""

from __future__ import annotations

import math

import torch

from .config import DistrConfig


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3's finaliser) on int64 tensors holding uint32 values."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The hash's 31-bit key for ``seed`` (golden-ratio multiple; twin in kernels/grouping.py)."""
    return (0x9E3779B9 * (seed + 1)) & 0x7FFFFFFF


def hash_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Deterministic uniforms in (0, 1), float32, one per int64 entry of ``index``.

    A counter-based generator built from integer ops only: identical on every device, with no RNG
    state, so it traces cleanly under torch.compile and export. The seed enters as a 31-bit key
    XORed in, not added: Inductor folds ``arange + constant`` into an int32 index expression on
    CUDA, where a constant of 2**31 or more does not compile."""
    x = _mix32(_mix32(index ^ seed_key(seed)) + index)
    return (x.to(torch.float32) + 0.5) / 2.0**32


def hyperplanes(num: int, block_m: int, seed: int, device: torch.device) -> torch.Tensor:
    """The LSH hyperplanes: (num, block_m) float32 standard Gaussians (Box-Muller on
    :func:`hash_uniform`), a pure function of the seed shared by the kernel and this oracle."""
    index = torch.arange(2 * num * block_m, device=device, dtype=torch.int64).view(2, num, block_m)
    u = hash_uniform(seed, index)
    return torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])


def _row_blocks(L: int, block_m: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """Number of query blocks and each row's block index. Rows map to blocks by index instead of
    a reshape of the sequence dim into (blocks, block_m), so a symbolic L (dynamic shapes,
    export) raises no ``L % block_m`` guards."""
    return (L + block_m - 1) // block_m, torch.arange(L, device=device) // block_m


def group_columns(q: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """Per block of query rows, the order of the d columns whose consecutive runs of G form the
    groups: (B, H, nb, D) int64, a permutation of range(D) in each block.

    "lsh": each column (a block_m-long vector) gets an integer code from the signs of its
    projections on ``num_hyperplanes`` Gaussian hyperplanes; columns sort by (code, index).
    "random": a seeded random permutation per block.
    "fixed": the identity in every block (groups of G consecutive columns).
    """
    B, H, L, D = q.shape
    nb, block = _row_blocks(L, config.block_m, q.device)
    if config.grouping == "projection":
        raise ValueError("grouping='projection' is a map of q and k, not a column grouping: call "
                         "distr_attention(..., maps=(A, B))")
    if config.grouping == "fixed":
        return torch.arange(D, device=q.device).expand(B, H, nb, D).contiguous()
    if config.grouping == "random":  # a function of (head, block, column): not of the batch or the length
        head = _mix32(torch.arange(H, device=q.device, dtype=torch.int64)).view(H, 1, 1)
        index = head ^ torch.arange(nb * D, device=q.device, dtype=torch.int64).view(1, nb, D)
        return hash_uniform(config.seed, index).argsort(-1).expand(B, H, nb, D).contiguous()
    planes = hyperplanes(config.num_hyperplanes, config.block_m, config.seed, q.device)
    weights = planes[:, torch.arange(L, device=q.device) % config.block_m]  # (R, L): each row's plane entries
    rows = torch.einsum("rm,bhmd->bhmrd", weights, q.detach().float())  # R x q in fp32: fine for the oracle
    proj = rows.new_zeros(B, H, nb, config.num_hyperplanes, D).index_add_(2, block, rows)
    # Shift, not 2 ** arange: AOTInductor (torch 2.13, CPU) types an int pow as float32 and the
    # codes come out as garbage.
    bits = torch.arange(config.num_hyperplanes, device=q.device)
    codes = ((proj > 0).long() << bits[:, None]).sum(-2)
    return (codes * D + torch.arange(D, device=q.device)).argsort(-1)


def representative_weights(k: torch.Tensor, perm: torch.Tensor, config: DistrConfig, is_causal: bool = False,
                           query_length: int | None = None) -> torch.Tensor:
    """Each column's weight in its group's representative, in ``perm``'s order: (B, Hq, nb, D)
    float32 (float64 for float64 keys), contiguous; the weights of a group sum to 1. Held fixed
    like the grouping (no gradient flows through them).

    "mean": 1/G. "sample": 1 for the group's first column. "lstsq": the least-squares
    representative of a group g for its fused key column K_g = sum_c k_c over all keys: with C the
    head's centered Gram of the keys (a key component shared by every key only shifts each score
    row, which softmax ignores), w_c = sum_{c' in g} C[c, c'] / sum_{c, c' in g} C[c, c'], so
    r_g = sum_c w_c q_c makes r_g K_g^T closest to sum_c q_c k_c^T. "lstsq-visible": the same
    fit, with ``is_causal`` (SDPA's top-left alignment; needs ``query_length``) on the keys up to
    the block's last row. A group whose fused keys hardly vary (centered norm under 1e-6 of the
    columns' squared norms; e.g. a single key) falls back to 1/G. SmolLM2-135M, every layer at
    G=2, block 32: perplexity 172 (mean) -> 56 (lstsq) -> 50 (lstsq-visible); exact 9.05
    (CPU, 2026-11-22). The visible fit costs a prefix sum of per-key-block Grams:
    causal f+b 4.76 ms against 3.54 at d=128, L=4096 on an H100 (BENCHMARKS.md, 2026-11-22), and
    adaptation ends at the same perplexity with either fit."""
    B, H, nb, D = perm.shape
    G = config.group_size
    dtype = torch.promote_types(k.dtype, torch.float32)
    if config.representative == "mean":
        return torch.full(perm.shape, 1.0 / G, device=perm.device, dtype=dtype)
    if config.representative == "sample":
        first = (torch.arange(D, device=perm.device) % G == 0).to(dtype)
        return first.expand(B, H, nb, D).contiguous()
    visible = is_causal and config.representative == "lstsq-visible"
    if visible and query_length is None:
        raise ValueError("representative_weights: lstsq-visible under is_causal needs query_length")
    gram, norms = visible_key_gram(k, config.block_m, nb, query_length if visible else None)
    Hkv = k.shape[1]
    r = H // Hkv  # query heads per key head
    groups = perm.long().reshape(B, Hkv, r, nb, D // G, G)  # query heads sharing a key head side by side
    pairs = (groups[..., :, None] * D + groups[..., None, :]).flatten(-3)  # indices into each D x D Gram
    numerator = gram.flatten(-2)[:, :, None].expand(-1, -1, r, nb, -1).gather(-1, pairs)
    numerator = numerator.view(groups.shape + (G,)).sum(-1)  # (B, Hkv, r, nb, D/G, G)
    denominator = numerator.sum(-1, keepdim=True)  # ||fused centered key column||^2
    squared = norms[:, :, None].expand(-1, -1, r, nb, -1).gather(-1, groups.flatten(-2)).view(groups.shape)
    varies = denominator > 1e-6 * squared.sum(-1, keepdim=True)
    weights = torch.where(varies, numerator / torch.where(varies, denominator, 1.0), 1.0 / G)
    return weights.view(B, H, nb, D)


def visible_key_gram(k: torch.Tensor, block_m: int, nb: int,
                     query_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key head, the centered Gram of the keys each of ``nb`` query blocks sees, and their
    uncentered squared column norms: ((B, Hkv, n, D, D), (B, Hkv, n, D)) float32 (float64 for
    float64 keys), n = 1 for all keys, n = nb for causal attention (``query_length`` given: block b
    sees keys before min((b + 1) block_m, query_length)). Half-precision CUDA keys go through
    tensor cores (fp32 accumulation); keys are centered by their mean first, so a large shared
    component does not cancel the centered Gram away."""
    B, Hkv, length, D = k.shape
    dtype = torch.promote_types(k.dtype, torch.float32)
    keys = k.detach()
    mean = keys.mean(-2, keepdim=True, dtype=dtype)
    centered = keys - mean
    if query_length is None:
        chunk, counts = length, torch.full((1,), length, device=k.device)
    else:  # causal: block b sees the keys before min((b + 1) block_m, query_length, length)
        seen, chunk = min(query_length, length), block_m
        counts = (torch.arange(1, nb + 1, device=k.device) * block_m).clamp(max=seen)
        centered = torch.nn.functional.pad(centered[..., :seen, :], (0, 0, 0, (-seen) % block_m))
    half = keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16)
    chunks = centered.to(keys.dtype if half else dtype).unflatten(-2, (-1, chunk))  # (B, Hkv, nc, chunk, D)
    flat = chunks.flatten(0, 2)
    gram = (torch.bmm(flat.transpose(1, 2), flat, out_dtype=dtype) if half else flat.transpose(1, 2) @ flat)
    sums = chunks.sum(-2, dtype=dtype)  # (B, Hkv, nc, D)
    gram = gram.view(B, Hkv, chunks.shape[2], D, D)
    if query_length is not None:  # prefix sums over the key blocks: query block b sees key blocks 0..b
        gram, sums = gram.cumsum_(2), sums.cumsum_(2)
        if gram.shape[2] < nb:  # query blocks past the last key see every key
            last = torch.arange(nb, device=k.device).clamp(max=gram.shape[2] - 1)
            gram, sums = gram[:, :, last], sums[:, :, last]
    n = counts.to(dtype).clamp(min=1)[:, None]
    norms = gram.diagonal(0, -2, -1) + 2 * mean * sums + n * mean.square()
    gram = gram - sums[..., :, None] * sums[..., None, :] / n[..., None]
    return gram, norms


def representative_query(q: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """q with every column replaced by its group's representative inside each block (q_tilde):
    the ``weights``-weighted sum of the group's columns. Differentiable in q; ``perm`` (from
    :func:`group_columns`) and ``weights`` (from :func:`representative_weights`) are held fixed."""
    B, H, L, D = q.shape
    G = config.group_size
    _, block = _row_blocks(L, config.block_m, q.device)
    index = perm.long().index_select(2, block)  # (B, H, L, D): each row's block's column order
    grouped = q.gather(-1, index).unflatten(-1, (D // G, G))
    rep = (grouped * weights.index_select(2, block).to(q.dtype).unflatten(-1, (D // G, G))).sum(-1)
    return torch.empty_like(q).scatter(-1, index, rep.repeat_interleave(G, dim=-1))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention with native GQA, computed in float32 (float64 stays float64).

    Returns (out in q's dtype, lse float32/64 of shape (B, Hq, Lq)). Fully masked rows give zeros
    and lse = -inf (as SDPA gives zeros); NaN in the inputs propagates to the rows it touches.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.to(acc).unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, r, Lq, D)
    s = (qg @ k.to(acc)[:, :, None].transpose(-1, -2)).flatten(1, 2) * scale
    if is_causal:
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.to(acc)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (m + denom.log()).squeeze(-1)
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = (p.unflatten(1, (Hkv, Hq // Hkv)) @ v.to(acc)[:, :, None]).flatten(1, 2)
    return out.to(q.dtype), lse


def distr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    config: DistrConfig = DistrConfig(),
    dropout_p: float = 0.0,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DistrAttention on canonical tensors: (out, lse). ``perm`` overrides the grouping (tests
    use it to share one grouping between the kernel and this oracle)."""
    dtype = q.dtype
    if not config.exact:
        if perm is None:
            perm = group_columns(q, config)
        weights = representative_weights(k, perm, config, is_causal, q.shape[-2])
        q = representative_query(q.to(torch.promote_types(dtype, torch.float32)), perm, weights, config)
    out, lse = attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
    return out.to(dtype), lse
