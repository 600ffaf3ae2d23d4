"""The PyTorch reference against a literal float64 transcription of the algorithm and against SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from distr_compile import DistrConfig, reference


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def literal_distr_attention(q, k, v, config, perm, scale=None, causal=False):
    """DistrAttention written out step by step (docs/how-it-works.md), loops over blocks and groups:
    Q_rep (block x d/G) times the group sums of K (Lk x d/G), scale from the original d."""
    B, H, Lq, D = q.shape
    G, bm = config.group_size, config.block_m
    scale = 1 / math.sqrt(D) if scale is None else scale
    visible = causal and config.representative == "lstsq-visible"
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h * k.shape[1] // H], v[b, h * k.shape[1] // H]
            for blk in range(math.ceil(Lq / bm)):
                rows = slice(blk * bm, min(Lq, (blk + 1) * bm))
                groups = perm[b, h, blk].view(D // G, G)
                qb = q[b, h, rows]
                seen = kh[:rows.stop] if visible else kh  # the keys the block's representatives are fitted on
                q_rep = torch.stack([literal_representative(qb, seen, g, config) for g in groups], -1)
                k_fused = torch.stack([kh[:, g].sum(-1) for g in groups], -1)
                s = q_rep @ k_fused.T * scale
                if causal:
                    idx = torch.arange(rows.start, rows.stop)[:, None]
                    s = s.masked_fill(torch.arange(kh.shape[0])[None, :] > idx, -math.inf)
                out[b, h, rows] = s.softmax(-1) @ vh
    return out


def literal_representative(qb, kh, g, config):
    """One group's representative column: the mean, the first column, or ("lstsq*") the column r
    minimising || sum_c q_c kc_c^T - r (sum_c kc_c)^T || over ``kh``'s centered keys kc, solved by
    least squares rather than by the reference's closed form."""
    if config.representative == "mean":
        return qb[:, g].mean(-1)
    if config.representative == "sample":
        return qb[:, g[0]]
    kc = kh - kh.mean(0)
    target = qb[:, g] @ kc[:, g].T  # (rows, Lk): the group's exact scores on centered keys
    fused = kc[:, g].sum(-1, keepdim=True)  # (Lk, 1)
    return torch.linalg.lstsq(fused, target.T).solution[0]


def literal_lsh_codes(q, config):
    """Each column's LSH code, bit j = sign of its projection on hyperplane j: (B, H, nb, D)."""
    planes = reference.hyperplanes(config.num_hyperplanes, config.block_m, config.seed, q.device)
    B, H, L, D = q.shape
    nb = math.ceil(L / config.block_m)
    qp = F.pad(q.float(), (0, 0, 0, nb * config.block_m - L)).view(B, H, nb, config.block_m, D)
    codes = torch.zeros(B, H, nb, D, dtype=torch.int64)
    for j in range(config.num_hyperplanes):
        bit = (torch.einsum("m,bhnmd->bhnd", planes[j], qp) > 0).long()
        codes += bit << j
    return codes


@pytest.mark.parametrize("representative", ["mean", "sample", "lstsq", "lstsq-visible"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(37, 29), (21, 40)], ids=["lq>lk", "lq<lk"])
def test_matches_literal_formula(representative, group_size, causal, lengths):
    """Causal lstsq fits on every key, causal lstsq-visible on the keys each block sees, including
    a last block cut short by the query length while more keys follow."""
    config = DistrConfig(group_size=group_size, block_m=16, representative=representative)
    lq, lk = lengths
    q, k, v = rand(2, 2, lq, 32), rand(2, 2, lk, 32), rand(2, 2, lk, 32)
    perm = reference.group_columns(q, config)
    out, _ = reference.distr_attention(q, k, v, is_causal=causal, config=config)
    expected = literal_distr_attention(q, k, v, config, perm, causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grouping", ["lsh", "random", "fixed"])
def test_grouping_is_a_permutation_sorted_by_code(grouping):
    config = DistrConfig(block_m=16, grouping=grouping, seed=3)
    q = rand(2, 3, 40, 64)
    perm = reference.group_columns(q, config)
    assert perm.shape == (2, 3, 3, 64)
    assert torch.equal(perm.sort(-1).values, torch.arange(64).expand_as(perm))
    if grouping == "lsh":
        codes = literal_lsh_codes(q, config).gather(-1, perm)
        assert (codes.diff(dim=-1) >= 0).all(), "columns are not sorted by their LSH code"


@pytest.mark.parametrize("G", [2, 4])
def test_fixed_grouping_is_exact_attention_on_averaged_query_columns(G):
    """grouping="fixed" with mean representatives: every block and head averages the same runs of
    G consecutive columns of q, a fixed linear map (what fine-tuning adapts to)."""
    config = DistrConfig(group_size=G, block_m=16, grouping="fixed", representative="mean")
    q, k, v = rand(2, 4, 37, 32), rand(2, 2, 41, 32), rand(2, 2, 41, 32)
    averaged = q.unflatten(-1, (-1, G)).mean(-1, keepdim=True).expand(-1, -1, -1, -1, G).flatten(-2)
    out, _ = reference.distr_attention(q, k, v, is_causal=True, config=config)
    expected = F.scaled_dot_product_attention(averaged, k, v, is_causal=True, scale=32 ** -0.5, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_lsh_groups_equal_columns_together():
    """Columns that are copies of each other hash alike and, with G = 2, an exact duplicate pairing
    makes the approximation exact."""
    config = DistrConfig(group_size=2, block_m=16, representative="mean")
    base = rand(1, 1, 16, 16)
    q = base.repeat_interleave(2, dim=-1)  # columns 2i and 2i+1 are equal
    k, v = rand(1, 1, 24, 32), rand(1, 1, 24, 32)
    out, _ = reference.distr_attention(q, k, v, config=config)
    exact, _ = reference.attention(q, k, v)
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("representative", ["mean", "sample", "lstsq", "lstsq-visible"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_representative_weights_sum_to_one_per_group(representative, group_size):
    """lstsq-visible runs causal here: per-block fits, and blocks past the last key see every key."""
    config = DistrConfig(group_size=group_size, block_m=16, representative=representative)
    q, k = rand(2, 4, 40, 32), rand(2, 2, 24, 32)  # GQA: 2 query heads per key head
    perm = reference.group_columns(q, config)
    fit = dict(is_causal=representative == "lstsq-visible", query_length=40)
    weights = reference.representative_weights(k, perm, config, **fit)
    assert weights.shape == perm.shape and weights.dtype == torch.float64 and weights.is_contiguous()
    torch.testing.assert_close(weights.unflatten(-1, (32 // group_size, group_size)).sum(-1),
                               torch.ones(2, 4, 3, 32 // group_size, dtype=torch.float64))
    if representative.startswith("lstsq"):  # query heads 0 and 1 share key head 0: same weights, same grouping
        shared = reference.representative_weights(k, perm[:, :1].expand(-1, 4, -1, -1), config, **fit)
        torch.testing.assert_close(shared[:, 1], weights[:, 0])
        assert not torch.allclose(shared[:, 2], weights[:, 0])


def test_lstsq_falls_back_to_the_mean_where_the_fused_keys_do_not_vary():
    """Keys equal at every position (one key, or a constant sequence) leave a zero centered Gram: the
    weights fall back to 1/G instead of dividing by zero."""
    config = DistrConfig(group_size=2, block_m=16, representative="lstsq")
    q, v = rand(1, 2, 20, 16), rand(1, 2, 7, 16)
    k = rand(1, 2, 1, 16).expand(1, 2, 7, 16)
    perm = reference.group_columns(q, config)
    torch.testing.assert_close(reference.representative_weights(k, perm, config), torch.full(perm.shape, 0.5, dtype=torch.float64))
    out, _ = reference.distr_attention(q, k, v, config=config)
    expected, _ = reference.distr_attention(q, k, v, config=config.replace(representative="mean"))
    torch.testing.assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lstsq_weights_from_half_keys_match_float32_ones_despite_a_large_key_mean(dtype, causal):
    """On CUDA, half-precision keys get their Gram on tensor cores (lstsq-visible: per key block
    under causal attention). The keys are centered before the product, so a key mean 20x the
    keys' spread (trained models have such offsets) does not cancel the Gram away: the weights
    agree with float32 keys'."""
    torch.manual_seed(0)
    config = DistrConfig(group_size=2, block_m=64, representative="lstsq-visible")
    q = torch.randn(2, 4, 256, 64, device="cuda")
    k = (20 + torch.randn(2, 2, 1024, 64, device="cuda") * torch.logspace(-1, 0, 64, device="cuda")).to(dtype)
    perm = reference.group_columns(q, config)
    half = reference.representative_weights(k, perm, config, causal, q.shape[-2])
    assert half.dtype == torch.float32
    full = reference.representative_weights(k.float(), perm, config, causal, q.shape[-2])
    torch.testing.assert_close(half, full, rtol=0, atol=2e-2)


def test_lstsq_beats_the_mean_on_uneven_key_columns():
    """Where key columns differ in scale (as in trained models), the least-squares representative
    errs less than the mean."""
    torch.manual_seed(0)
    q, v = rand(1, 2, 64, 32), rand(1, 2, 64, 32)
    k = rand(1, 2, 64, 32) * torch.logspace(-1, 1, 32, dtype=torch.float64)
    exact, _ = reference.attention(q, k, v)
    errors = {rep: (reference.distr_attention(q, k, v, config=DistrConfig(block_m=16, representative=rep))[0] - exact).norm()
              for rep in ("mean", "lstsq")}
    assert errors["lstsq"] < 0.8 * errors["mean"], errors


def test_seed_determinism():
    q, k, v = rand(1, 2, 50, 32), rand(1, 2, 50, 32), rand(1, 2, 50, 32)
    a = reference.distr_attention(q, k, v, config=DistrConfig(seed=1))[0]
    b = reference.distr_attention(q, k, v, config=DistrConfig(seed=1))[0]
    c = reference.distr_attention(q, k, v, config=DistrConfig(seed=2))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "bool", "additive", "bool-broadcast"],
)
@pytest.mark.parametrize("gqa", [1, 3])
def test_exact_config_equals_sdpa(mask_kind, gqa):
    q, k, v = rand(2, 6, 19, 16), rand(2, 6 // gqa, 23, 16), rand(2, 6 // gqa, 23, 16)
    mask = {
        "bool": torch.rand(2, 6, 19, 23) > 0.3,
        "additive": rand(2, 1, 19, 23),
        "bool-broadcast": torch.rand(19, 23) > 0.3,
    }.get(mask_kind)
    causal = mask_kind == "causal"
    out, lse = reference.distr_attention(
        q, k, v, attn_mask=None if mask is None else mask.expand(2, 6, 19, 23), is_causal=causal,
        config=DistrConfig(group_size=1),
    )
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa > 1)
    torch.testing.assert_close(out, expected)
    assert lse.shape == (2, 6, 19)


def test_lse_is_log_sum_exp_of_scores():
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 11, 8), rand(1, 2, 11, 8)
    _, lse = reference.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1))


def test_fully_masked_row_gives_zeros_and_finite_gradients():
    q, k, v = (rand(1, 1, 4, 8).requires_grad_() for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out, lse = reference.distr_attention(q, k, v, attn_mask=mask.expand(1, 1, 4, 4), config=DistrConfig(block_m=16))
    assert torch.equal(out[0, 0, 2], torch.zeros(8, dtype=torch.float64))
    assert lse[0, 0, 2] == -math.inf
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
