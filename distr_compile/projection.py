"""Static per-head maps of the Q K^T inner dimension: fit them on calibration activations, apply them.

When DistrAttention's map does not depend on the query block, it is exact attention on
``q' = q A`` and ``k' = k B`` with A (d, d/G) per query head and B (d, d/G) per KV head:
``q' k'^T = q (A B^T) k^T``, a rank-d/G stand-in for the identity in ``q k^T``. The softmax scale
stays 1/sqrt(d) of the original head dim, V and the output keep their full head dim.

The closed-form fits minimise a weighted score error ``sum_ij w_ij (q_i^T (I - A B^T) k~_ij)^2``
over query i and key j; they differ in the weights (see :func:`fit_projection`):

* ``"weighted"``: pairs weighted by the exact attention probabilities P_ij, keys centred on each
  query's attention mean. That is the first-order error of the attention output: a score error
  e_ij moves output i by ``sum_j P_ij (e_ij - sum_l P_il e_il) v_j``, so the probability-weighted
  variance of each row's score error bounds it (a per-row constant is free: softmax ignores it).
* ``"scores"``: the same with uniform weights over the keys each query sees (the best rank-d/G
  approximation of the centred scores in expectation over visible pairs).
* ``"pca"``: q and k each replaced by their own rank-d/G principal reconstruction (a baseline).

The weighted problem has no closed form; it is made separable by replacing each query's key
covariance by the average: with ``Cq = sum_i q_i q_i^T`` and ``Ck = sum_i Cov_{P_i}(k)`` the error
is ``||Cq^1/2 (I - M) Ck^1/2||_F^2``, minimised over rank-d/G M by the truncated SVD of
``Cq^1/2 Ck^1/2`` (Eckart-Young after whitening).

``"kl"`` (default) starts from "weighted" and minimises what attention actually computes, without
the linearisation or the separable approximation: the KL divergence of each mapped attention row
from the exact one, by L-BFGS. Zero-shot with every layer mapped at G=2 it roughly halves
"weighted"'s per-layer output error (``benchmarks/projection.py``).

Calibrate on the positions the model will see: with RoPE, q and k rotate with position, and maps
fitted on 256-token windows lose much of their accuracy on 512-token windows (SmolLM2 at G=2:
2.4x exact perplexity instead of 1.5x). Rotating a window's q and k by a common position shift
leaves its scores unchanged, so shifted copies in the calibration batch cover later positions
without new text (``rope_shifted`` in the benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("kl", "weighted", "scores", "pca")


def mask_bias(lq: int, lk: int, *, is_causal: bool = False, attn_mask: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """The additive form (0 or -inf, or the additive mask itself) of SDPA's ``attn_mask`` (bool,
    True = attend, or additive; broadcastable) and ``is_causal`` (aligned top-left): a tensor
    broadcastable to (B, Hq, lq, lk)."""
    bias = torch.zeros(lq, lk, dtype=dtype, device=device)
    if is_causal:
        bias = bias.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=device).triu(1), -torch.inf)
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, -torch.inf) if attn_mask.dtype == torch.bool else bias + attn_mask
    return bias


def attention_logits(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention logits (B, Hq, Lq, Lk) of q (B, Hq, Lq, d), k (B, Hkv, Lk, d) (GQA), plus ``bias``."""
    return q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2) * scale + bias


def moments(q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head (Hq, d, d): ``Cq = sum_i q_i q_i^T`` and the key moment. With ``probs``
    (B, Hq, Lq, Lk) the key moment is ``sum_i Cov_{P_i}(k)``, each query's key covariance under its
    attention weights (``sum_j P_ij k_j k_j^T - kbar_i kbar_i^T``, kbar_i = sum_j P_ij k_j); without,
    it is the plain second moment ``sum_j k_j k_j^T`` of the head's keys."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    cq = torch.einsum("bhid,bhie->hde", q, q)
    if probs is None:
        return cq, torch.einsum("bhjd,bhje->hde", k, k)
    mean = probs @ k
    ck = torch.einsum("bhj,bhjd,bhje->hde", probs.sum(2), k, k) - torch.einsum("bhid,bhie->hde", mean, mean)
    return cq, ck


def sqrtm(c: torch.Tensor) -> torch.Tensor:
    """Square root of symmetric PSD matrices (..., d, d), negative rounding noise clipped."""
    values, vectors = torch.linalg.eigh(c)
    return (vectors * values.clamp(min=0).sqrt()[..., None, :]) @ vectors.transpose(-1, -2)


def top_eigenvectors(c: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of symmetric matrices (..., d, d): (..., d, rank)."""
    return torch.linalg.eigh(c)[1].flip(-1)[..., :rank]


def whitened_svd(cq: torch.Tensor, ck: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (..., d, rank), minimising ``||Cq^1/2 (I - A B^T) Ck^1/2||_F``.

    With ``Cq^1/2 Ck^1/2 = U S V^T``, the optimum is ``Cq^1/2 M Ck^1/2 = U_r S_r V_r^T``, met by
    ``A = Ck^1/2 V_r S_r^-1/2`` and ``B = Cq^1/2 U_r S_r^-1/2``: no inverse of Cq or Ck (they may be
    singular), and q A and k B come out with the same scale (``sum_i ||q_i A||^2 = tr S_r``)."""
    root_q, root_k = sqrtm(cq), sqrtm(ck)
    u, s, vh = torch.linalg.svd(root_q @ root_k)
    inv = s[..., None, :rank].clamp(min=s[..., :1, None] * 1e-12).rsqrt()
    return root_k @ vh[..., :rank, :].transpose(-1, -2) * inv, root_q @ u[..., :rank] * inv


def refine_kl(q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor, bias: torch.Tensor, scale: float,
              a: torch.Tensor, b: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) after ``steps`` L-BFGS iterations on the cross-entropy of the mapped attention rows
    against the exact ``probs``: the mean over query rows of KL(P_i || P'_i) up to a constant. ``a``
    holds one map per query head or per KV head (shared).

    The cross-entropy of row i is ``lse_i - sum_j P_ij s'_ij`` with ``s'_ij = scale q_i A B^T k_j``,
    and ``sum_j P_ij s'_ij = scale (q_i A) . (kbar_i B)`` with kbar_i = sum_j P_ij k_j (computed
    once): each step needs only the mapped rows' log-sum-exp."""
    ratio = q.shape[1] // k.shape[1]
    mass = probs.sum(-1)  # 1 per query row, 0 for a fully masked one (its bias is zeroed: no -inf row)
    kbar = probs @ k.repeat_interleave(ratio, dim=1)
    bias = bias.masked_fill(mass[..., None] == 0, 0.0)
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([a, b], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        qp, kp = project(q, k, a.repeat_interleave(q.shape[1] // a.shape[0], dim=0), b)
        lse = attention_logits(qp, kp, bias, scale).logsumexp(-1)
        attended = torch.einsum("bhld,hdr,bhlr->bhl", kbar, b.repeat_interleave(ratio, dim=0), qp) * scale
        loss = (mass * lse - attended).sum() / mass.sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return a.detach(), b.detach()


def query_maps(ck: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each query head's A (Hq, d, r) that is optimal for its KV head's B (Hq, d, r, repeated) and
    its own key moment ``Ck`` (Hq, d, d): ``A = Ck B (B^T Ck B)^-1``, the minimiser of
    ``||Cq^1/2 (I - A B^T) Ck^1/2||_F`` for any invertible Cq (a tiny ridge keeps it finite)."""
    gram = b.transpose(-1, -2) @ ck @ b
    ridge = 1e-9 * gram.diagonal(0, -2, -1).sum(-1)[..., None, None] * torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    return torch.linalg.solve(gram + ridge, (ck @ b).transpose(-1, -2)).transpose(-1, -2)


def fit_projection(q: torch.Tensor, k: torch.Tensor, group_size: int, *, method: str = "kl", steps: int = 50,
                   shared_query_map: bool = True, is_causal: bool = False, attn_mask: torch.Tensor | None = None,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Static maps (A, B) for q (B, Hq, L, d) and k (B, Hkv, Lk, d) as they reach attention (after
    RoPE), GQA with Hq a multiple of Hkv: A (Hq, d, d/G) per query head, B (Hkv, d, d/G) per KV
    head, float32, deterministic. The masks and ``scale`` (default 1/sqrt(d)) are SDPA's.

    ``method`` (module docstring): "kl" (default) refines "weighted" by ``steps`` L-BFGS iterations
    on the attention rows' KL divergence; "weighted" weighs query/key pairs by the exact attention
    probabilities, "scores" uniformly over the pairs attention sees, "pca" projects q and k on their
    own principal subspaces. The closed forms run in float64, the refinement in float32 (float64
    for float64 inputs). Each KV head's B comes from its query heads' pooled moments, and with
    ``shared_query_map`` (default) so does one A per KV head, repeated over its query heads;
    without, each query head gets its own A (:func:`query_maps`, then refined per head). On
    SmolLM2 (GQA 9/3, 256 calibration tokens) the shared map is slightly better (1.49x against
    1.50x exact perplexity at G=2, 3.17x against 3.23x at G=4): the per-head maps have 3x the
    parameters for the same data.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, L, d), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the batch and head dim, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or d % group_size or hq % hkv:
        raise ValueError(f"head dim {d} must be divisible by G={group_size!r} (a positive int), and {hq} query heads "
                         f"by {hkv} KV heads")
    q, k = q.detach(), k.detach()  # activations captured with autograd on: the fit differentiates its own leaves
    if not (q.isfinite().all() and k.isfinite().all()):
        raise ValueError("q and k must be finite")
    rank, ratio, dtype = d // group_size, hq // hkv, torch.promote_types(q.dtype, torch.float32)
    scale = d ** -0.5 if scale is None else scale
    bias = mask_bias(q.shape[2], k.shape[2], is_causal=is_causal, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    logits = bias.expand(*q.shape[:-1], k.shape[2]) if method == "scores" else attention_logits(q.double(), k.double(), bias, scale)
    probs = None if method == "pca" else logits.softmax(-1).nan_to_num(0.0)  # a fully masked row weighs nothing
    cq, ck = moments(q.double(), k.double(), probs)

    def pooled(c: torch.Tensor) -> torch.Tensor:
        return c.unflatten(0, (hkv, ratio)).sum(1)

    if method == "pca":
        b = top_eigenvectors(pooled(ck), rank)  # every query head of a group sees the same keys
        uq = top_eigenvectors(pooled(cq) if shared_query_map else cq, rank)
        a = uq @ uq.transpose(-1, -2) @ b.repeat_interleave(uq.shape[0] // hkv, dim=0)
    else:
        a, b = whitened_svd(pooled(cq), pooled(ck), rank)
        a = a if shared_query_map else query_maps(ck, b.repeat_interleave(ratio, dim=0))
    if method == "kl":
        a, b = refine_kl(*(x.to(dtype) for x in (q, k, probs, bias)), scale, a.to(dtype), b.to(dtype), steps)
    if not (a.isfinite().all() and b.isfinite().all()):
        raise ValueError("the fit is degenerate: q or k carries no signal, or the masks hide every key")
    return a.repeat_interleave(hq // a.shape[0], dim=0).float(), b.float()


def project(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q A, k B)``: q (..., Hq, L, d) through each query head's A (Hq, d, r), k (..., Hkv, L, d)
    through each KV head's B (Hkv, d, r); in q's and k's dtypes and on their device. Maps of the
    wrong shape are a ValueError naming the expected one."""
    heads = lambda t: t.shape[-3] if t.dim() >= 3 else 1  # noqa: E731
    r = a.shape[-1]
    for name, m, t in (("A", a, q), ("B", b, k)):
        want = (heads(t), t.shape[-1], r)
        if tuple(m.shape) != want:
            raise ValueError(f"projection map {name} has shape {tuple(m.shape)}, expected {want} (heads, head dim, "
                             f"rank) for q {tuple(q.shape)}, k {tuple(k.shape)}")
    return (q @ a.to(q)).reshape(*q.shape[:-1], r), (k @ b.to(k)).reshape(*k.shape[:-1], r)  # rank 2 stays 2


def projected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """Exact SDPA on ``(q A, k B, v)`` with the softmax scale of the ORIGINAL head dim (default
    1/sqrt(d) of q, not of d/G). Shapes as in :func:`project`, v (B, Hkv, Lk, dv); masks as SDPA's."""
    qp, kp = project(q, k, a, b)
    return F.scaled_dot_product_attention(qp, kp, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
