"""Static per-head projections: fitting (shapes, GQA, exactness where the data allows it, masks) and
attention on the mapped q, k against SDPA and a float64 hand-written reference."""

import pytest
import torch
import torch.nn.functional as F

from distr_compile.projection import METHODS, fit_projection, project, projected_attention

B, HQ, HKV, L, D = 2, 6, 2, 48, 16


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def low_rank(heads: int, expand: int, rank: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    """(B, heads * expand, L, D) rows in a rank-``rank`` subspace per group of ``expand`` heads."""
    basis = randn(heads, D, rank, dtype=dtype, seed=seed + 1).repeat_interleave(expand, dim=0)
    return randn(B, heads * expand, L, rank, dtype=dtype, seed=seed) @ basis.transpose(-1, -2)


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


def rel_err(x, y):
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_shapes_and_gqa(method, group_size, shared):
    q, k, v = randn(B, HQ, L, D), randn(B, HKV, L, D, seed=1), randn(B, HKV, L, 24, seed=2)
    a, b = fit_projection(q, k, group_size, method=method, shared_query_map=shared, is_causal=True, steps=3)
    assert a.shape == (HQ, D, D // group_size) and b.shape == (HKV, D, D // group_size)
    assert a.dtype == b.dtype == torch.float32
    qp, kp = project(q, k, a, b)
    assert qp.shape == (B, HQ, L, D // group_size) and kp.shape == (B, HKV, L, D // group_size)
    assert projected_attention(q, k, v, a, b, is_causal=True).shape == (B, HQ, L, 24)
    if shared:  # one query map per KV head
        groups = a.unflatten(0, (HKV, HQ // HKV))
        assert torch.equal(groups, groups[:, :1].expand_as(groups))


@pytest.mark.parametrize("method", ["kl", "weighted", "scores"])
@pytest.mark.parametrize("low", ["k", "q"])
def test_exact_when_scores_have_rank_d_over_g(method, low):
    """Keys in a rank-d/G subspace per KV head, or queries in one per GQA group: q k^T has rank <=
    d/G per head, and the fitted maps reproduce attention."""
    rank = D // 2
    q = low_rank(HKV, HQ // HKV, rank) if low == "q" else randn(B, HQ, L, D)
    k = low_rank(HKV, 1, rank, seed=3) if low == "k" else randn(B, HKV, L, D, seed=3)
    v = randn(B, HKV, L, D, seed=4)
    a, b = fit_projection(q, k, 2, method=method, is_causal=True)
    assert rel_err(projected_attention(q, k, v, a, b, is_causal=True), sdpa(q, k, v, is_causal=True)) < 1e-5


def test_float64():
    """In float64: attention on the mapped q, k against a hand-written softmax with the ORIGINAL head
    dim's scale, and the fitted scores against q k^T (exact up to the maps' float32 rounding)."""
    q, k = randn(B, HQ, L, D, dtype=torch.float64), low_rank(HKV, 1, D // 4, dtype=torch.float64, seed=3)
    v = randn(B, HKV, L, D, dtype=torch.float64, seed=4)
    a, b = fit_projection(q, k, 4, method="weighted")
    qp, kp = project(q, k, a, b)
    assert qp.dtype == kp.dtype == torch.float64

    def expand(x):
        return x.repeat_interleave(HQ // HKV, 1)

    expected = torch.softmax(qp @ expand(kp).transpose(-1, -2) / D**0.5, -1) @ expand(v)
    assert rel_err(projected_attention(q, k, v, a, b), expected) < 1e-12
    assert rel_err(qp @ expand(kp).transpose(-1, -2), q @ expand(k).transpose(-1, -2)) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_group_size_one_is_sdpa(method):
    """G=1: identity maps and fitted full-rank maps both give SDPA (mask, GQA)."""
    q, k, v = randn(B, HQ, L, D), randn(B, HKV, L, D, seed=1), randn(B, HKV, L, D, seed=2)
    mask = randn(B, 1, L, L, seed=5) > -1.0
    expected = sdpa(q, k, v, attn_mask=mask)
    eye_q, eye_k = torch.eye(D).expand(HQ, D, D), torch.eye(D).expand(HKV, D, D)
    assert rel_err(projected_attention(q, k, v, eye_q, eye_k, attn_mask=mask), expected) < 1e-6
    a, b = fit_projection(q, k, 1, method=method, attn_mask=mask, steps=3)
    assert rel_err(projected_attention(q, k, v, a, b, attn_mask=mask), expected) < 1e-4


@pytest.mark.parametrize("method", ["kl", "weighted", "scores"])
def test_fit_sees_only_what_attention_sees(method):
    """Causal (top-left, as SDPA): keys past the last query are never attended, so they do not move
    the maps; is_causal and the equivalent boolean mask give the same maps."""
    q, k = randn(B, HQ, L, D), randn(B, HKV, L + 16, D, seed=1)
    maps = fit_projection(q, k, 2, method=method, is_causal=True, steps=5)
    unseen = k.clone()
    unseen[:, :, L:] = randn(B, HKV, 16, D, seed=9) * 10
    for other in (fit_projection(q, unseen, 2, method=method, is_causal=True, steps=5),
                  fit_projection(q, k, 2, method=method, attn_mask=torch.ones(L, L + 16, dtype=torch.bool).tril(),
                                 steps=5)):
        torch.testing.assert_close(other, maps, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fit_projection(q, k, 2, method=method, steps=5)[1], maps[1], atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    q, k = randn(B, HQ, L, D), randn(B, HKV, L, D, seed=1)
    first, second = (fit_projection(q, k, 2, method=method, is_causal=True, steps=5) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_rejects_bad_arguments():
    q, k = randn(B, HQ, L, D), randn(B, HKV, L, D)
    with pytest.raises(ValueError, match="method"):
        fit_projection(q, k, 2, method="svd")
    with pytest.raises(ValueError, match="divisible"):
        fit_projection(q, k, 3)
