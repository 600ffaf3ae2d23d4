"""The registered op and the public ``distr_attention``: registration, autograd, errors, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

import distr_compile
from distr_compile import DistrConfig, distr_attention, reference

CFG = DistrConfig(block_m=16)


def op_args(q, k, v, mask=None, causal=False, scale=None, gqa=False, config=CFG):
    return (q, k, v, mask, causal, scale, gqa, config.group_size, config.block_m,
            config.num_hyperplanes, config.representative, config.grouping, config.seed)


def qkv(B=2, Hq=4, Hkv=2, Lq=19, Lk=23, D=16, dtype=torch.float64, grad=False):
    return tuple(
        torch.randn(B, h, L, D, dtype=dtype, requires_grad=grad) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk))
    )


@pytest.mark.parametrize("case", ["plain", "gqa-causal", "mask", "exact"])
def test_opcheck(case):
    q, k, v = qkv(dtype=torch.float32, grad=True)
    kw = {
        "plain": dict(k=k[:, :1].expand(2, 4, 23, 16).detach().requires_grad_(), v=v[:, :1].expand(2, 4, 23, 16).detach().requires_grad_()),
        "gqa-causal": dict(gqa=True, causal=True),
        "mask": dict(gqa=True, mask=torch.randn(19, 23)),
        "exact": dict(gqa=True, config=DistrConfig(group_size=1)),
    }[case]
    args = op_args(q, kw.pop("k", k), kw.pop("v", v), **kw)
    torch.library.opcheck(torch.ops.distr.attention.default, args)


def test_gradcheck_reference_backward():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=20, Lk=9, D=8, grad=True)
    mask = torch.randn(1, 1, 20, 9, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, m: torch.ops.distr.attention(*op_args(q, k, v, m, gqa=True))
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


def test_backward_matches_autograd_of_reference():
    q, k, v = qkv(grad=True)
    distr_attention(q, k, v, is_causal=True, enable_gqa=True, config=CFG).square().sum().backward()
    grads = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    reference.distr_attention(q2, k2, v2, is_causal=True, config=CFG)[0].square().sum().backward()
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, want)


def test_calling_convention_matches_sdpa_when_exact():
    q, k, v = qkv(dtype=torch.float32)
    mask = torch.rand(19, 23) > 0.2
    exact = DistrConfig(group_size=1)
    for kwargs in (dict(attn_mask=mask, enable_gqa=True), dict(is_causal=True, scale=0.2, enable_gqa=True)):
        torch.testing.assert_close(distr_attention(q, k, v, config=exact, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


@pytest.mark.parametrize("shape", [(7, 16), (3, 7, 16), (2, 3, 2, 7, 16)])
def test_any_rank(shape):
    q = torch.randn(*shape, dtype=torch.float64)
    out = distr_attention(q, q, q, config=CFG)
    assert out.shape == q.shape
    flat = q.reshape(-1, 1, 7, 16) if q.dim() > 2 else q[None, None]
    expected = reference.distr_attention(flat, flat, flat, config=CFG)[0].reshape(shape)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("config", [DistrConfig(group_size=1), DistrConfig(group_size=2, grouping="fixed", block_m=16),
                                    DistrConfig(group_size=2, block_m=16)], ids=["exact", "fixed", "lsh"])
def test_leading_dims_broadcast_like_sdpa(config, gqa):
    """Batch dims broadcast (and head dims without GQA), as in SDPA: the same result and gradients
    as on explicitly expanded inputs, the gradients summed back to each input's shape."""
    q = torch.randn(2, 3, 4, 9, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 3, 1 if not gqa else 2, 11, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = distr_attention(q, k, v, config=config, enable_gqa=gqa)
    expanded = [t.expand(2, 3, t.shape[2] if gqa else 4, 11, 16) for t in (k, v)]
    expected = distr_attention(q, *expanded, config=config, enable_gqa=gqa)
    torch.testing.assert_close(out, expected)
    if config.exact:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_second_derivative_is_an_error_not_a_silent_zero():
    """Under create_graph=True the first derivative is right, and differentiating it again
    raises: the op has no second derivative (SDPA's math backend has one)."""
    q, k, v = qkv(grad=True)
    fixed = DistrConfig(group_size=2, grouping="fixed", block_m=16)
    out = distr_attention(q, k, v, enable_gqa=True, config=fixed)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (once,) = torch.autograd.grad(distr_attention(q, k, v, enable_gqa=True, config=fixed).square().sum(), q)
    torch.testing.assert_close(gq, once)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gq.square().sum().backward()


def test_autocast_leaves_float64_alone_like_sdpa():
    q, k, v = qkv()
    for config in (DistrConfig(group_size=1), CFG):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = distr_attention(q, k, v, enable_gqa=True, config=config)
            op_out = torch.ops.distr.attention(*op_args(q, k, v, gqa=True, config=config))[0]
        want = distr_attention(q, k, v, enable_gqa=True, config=config)
        assert out.dtype == op_out.dtype == torch.float64
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(op_out, want)


def test_random_grouping_depends_on_the_sequence_not_its_batch():
    q, k, v = qkv()
    config = DistrConfig(group_size=2, grouping="random", block_m=16)
    whole = distr_attention(q, k, v, enable_gqa=True, config=config)
    torch.testing.assert_close(whole[1:], distr_attention(q[1:], k[1:], v[1:], enable_gqa=True, config=config))


@pytest.mark.parametrize("representative", ["mean", "lstsq", "lstsq-visible"])
def test_empty_batch(representative):
    q, k, v = qkv(B=0)
    config = DistrConfig(group_size=2, representative=representative, block_m=16)
    assert distr_attention(q, k, v, is_causal=True, enable_gqa=True, config=config).shape == q.shape


def test_projection_of_unbatched_inputs():
    q, k, v = (torch.randn(L, 16, dtype=torch.float64) for L in (5, 7, 7))
    a, b = torch.randn(1, 16, 8, dtype=torch.float64), torch.randn(1, 16, 8, dtype=torch.float64)
    out = distr_attention(q, k, v, config=DistrConfig(group_size=2, grouping="projection"), maps=(a, b))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q @ a[0], k @ b[0], v, scale=16 ** -0.5))


def test_lse_output_and_shapes():
    q, k, v = qkv()
    out, lse = torch.ops.distr.attention(*op_args(q, k, v, gqa=True))
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    ref_out, ref_lse = reference.distr_attention(q, k, v, config=CFG)
    torch.testing.assert_close(lse, ref_lse)


def test_nan_propagates_like_sdpa_math():
    q, k, v = qkv(B=1, Hq=1, Hkv=1)
    q[0, 0, 3, 5] = math.nan
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected_rows = F.scaled_dot_product_attention(q, k, v).isnan().any(-1)
    out = distr_attention(q, k, v, config=DistrConfig(group_size=2, block_m=64))
    assert torch.equal(out.isnan().any(-1), expected_rows)  # representatives are per row: row 3 only
    k[0, 0, 4, 0] = math.nan
    assert distr_attention(q, k, v, config=CFG).isnan().all()


def test_fully_masked_row_is_zero():
    q, k, v = qkv(B=1, Hq=1, Hkv=1)
    mask = torch.ones(19, 23, dtype=torch.bool)
    mask[4] = False
    out = distr_attention(q, k, v, attn_mask=mask, config=CFG)
    assert torch.equal(out[0, 0, 4], torch.zeros(16, dtype=q.dtype))
    assert out.isfinite().all()


def test_dropout_runs_reference_with_dropout():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = distr_attention(q, k, v, dropout_p=0.5, enable_gqa=True, config=CFG)
    b = distr_attention(q, k, v, enable_gqa=True, config=CFG)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_compiles_on_cpu_with_inductor():
    q, k, v = qkv(dtype=torch.float32)
    fn = torch.compile(lambda q, k, v: distr_attention(q, k, v, is_causal=True, enable_gqa=True, config=CFG), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), distr_attention(q, k, v, is_causal=True, enable_gqa=True, config=CFG))


@pytest.mark.gpu
def test_compiled_reference_on_cuda_matches_eager():
    """float32 on CUDA runs the reference; under torch.compile Inductor turns its integer hash,
    LSH codes and gathers into Triton code, which must give the eager grouping bit for bit (AOTI
    on the CPU once did not, see test_export.py)."""
    q, k, v = (t.cuda() for t in qkv(Lq=70, Lk=70, D=32, dtype=torch.float32))
    fn = lambda q, k, v: distr_attention(q, k, v, is_causal=True, enable_gqa=True, config=CFG)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)


def test_export_keeps_the_op():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return distr_attention(q, k, v, config=CFG)

    q, k, v = qkv(Hkv=4, dtype=torch.float32)
    ep = torch.export.export(Attn(), (q, k, v)).run_decompositions()
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.distr.attention.default in targets
    torch.testing.assert_close(ep.module()(q, k, v), Attn()(q, k, v))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(2, 4, 19)), "same rank"),
        (dict(k=torch.randn(2, 2, 23, 8, dtype=torch.float64)), "head dim"),
        (dict(v=torch.randn(2, 2, 22, 16, dtype=torch.float64)), "same length"),
        (dict(q=torch.randn(2, 4, 19, 16, dtype=torch.float16)), "share a dtype"),
        (dict(q=torch.randint(0, 3, (2, 4, 19, 16))), "dtype"),
        (dict(enable_gqa=False), "enable_gqa=True"),
        (dict(k=torch.randn(2, 3, 23, 16, dtype=torch.float64), v=torch.randn(2, 3, 23, 16, dtype=torch.float64)), "divisible by key/value heads"),
        (dict(attn_mask=torch.ones(5, 23, dtype=torch.bool)), "does not broadcast"),
        (dict(attn_mask=torch.ones(19, 23, dtype=torch.int32)), "bool or floating"),
        (dict(attn_mask=torch.ones(19, 23, dtype=torch.bool), is_causal=True), "not both"),
        (dict(config=DistrConfig(group_size=8, block_m=16), q=torch.randn(2, 4, 19, 12, dtype=torch.float64),
              k=torch.randn(2, 2, 23, 12, dtype=torch.float64)), "not divisible by group_size"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(q=torch.randn(2, 4, 19, 16, dtype=torch.float64, device="meta")), "one device"),
        (dict(k=torch.randn(3, 2, 23, 16, dtype=torch.float64), v=torch.randn(3, 2, 23, 16, dtype=torch.float64)),
         "batch dims do not broadcast"),
        (dict(config={"group_size": 2}), "config must be a DistrConfig"),
        (dict(config=DistrConfig(group_size=2, grouping="projection"), maps=(1, 2)), "pair of tensors"),
    ],
)
def test_bad_input_errors(change, message):
    q, k, v = qkv()
    kwargs = dict(q=q, k=k, v=v, enable_gqa=True, config=CFG) | change
    with pytest.raises((ValueError, TypeError), match=message):
        distr_attention(**kwargs)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(group_size=3), "group_size must be one of"),
        (dict(block_m=48), "block_m must be one of"),
        (dict(representative="median"), "representative"),
        (dict(grouping="pca"), "grouping"),
        (dict(num_hyperplanes=0), "num_hyperplanes"),
        (dict(seed=-1), "seed"),
        (dict(group_sizes=2), "unknown DistrConfig option"),
        (dict(group_size=2.0), "group_size must be one of"),
        (dict(block_m=64.0), "block_m must be one of"),
        (dict(group_size=[]), "empty list"),
        (dict(candidate_group_sizes=4), "candidate_group_sizes must be a list"),
        (dict(plan=""), "empty string"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        DistrConfig.from_options(options)


def test_schema_is_versioned():
    assert distr_compile.SCHEMA_VERSION == 1
    schema = str(torch.ops.distr.attention.default._schema)
    assert schema.startswith("distr::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal")


@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_casts_inputs_like_sdpa(compiled):
    """Inside an autocast region the op, like SDPA, runs in the autocast dtype even when its
    inputs disagree (rotary-embedded fp32 q/k, bf16 v), in eager and traced code alike."""
    q, k = torch.randn(1, 2, 33, 32), torch.randn(1, 2, 33, 32)
    v = torch.randn(1, 2, 33, 32).bfloat16()
    mask = torch.randn(33, 33)
    call = lambda q, k, v, mask: torch.ops.distr.attention(*op_args(q, k, v, mask))[0]
    call = torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(q.requires_grad_(), k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, call(q.bfloat16(), k.bfloat16(), v, mask.bfloat16()))
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


@pytest.mark.parametrize("config, maps", [
    (DistrConfig(group_size=1), None),
    (DistrConfig(group_size=2, grouping="fixed"), None),
    (DistrConfig(group_size=2, grouping="projection"), (torch.randn(2, 32, 16), torch.randn(2, 32, 16))),
], ids=["exact", "fixed", "projection"])
@pytest.mark.parametrize("compiled", [False, True])
def test_entry_point_autocasts_like_sdpa(config, maps, compiled):
    """``distr_attention`` takes what SDPA takes inside an autocast region (fp32 q/k after rotary
    embeddings, a bf16 v): every path, the projection's (whose maps stay fp32) included, eager and
    traced in one graph."""
    q, k = torch.randn(1, 2, 33, 32), torch.randn(1, 2, 33, 32)
    v = torch.randn(1, 2, 33, 32).bfloat16()
    call = lambda q, k, v: distr_attention(q, k, v, is_causal=True, config=config, maps=maps)
    torch._dynamo.reset()  # one compile per case: the knobs stay constants, as the backend emits them
    call = torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(q.requires_grad_(), k, v)
    assert out.dtype == torch.bfloat16
    expected = distr_attention(q.detach().bfloat16(), k.bfloat16(), v, is_causal=True, config=config,
                               maps=None if maps is None else tuple(m.bfloat16() for m in maps))
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


def test_one_compiled_caller_takes_several_configs():
    """A compiled function called with several configs: Dynamo makes the changing int knob
    symbolic on the second call; the op specialises it, so each config gets its own graph and
    eager's output, forward and backward."""
    torch._dynamo.reset()
    q = torch.randn(1, 2, 33, 32, requires_grad=True)
    call = lambda config: distr_attention(q, q, q, is_causal=True, config=config)
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for g in (1, 2, 4, 2):
        config = DistrConfig(group_size=g, grouping="fixed")
        out = compiled(config)
        (grad,) = torch.autograd.grad(out.sum(), q)
        expected = call(config)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), q)[0])
