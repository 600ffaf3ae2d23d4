"""Backward kernels against autograd through the reference, with one grouping shared by both.

The oracle is ``reference.distr_attention`` in float64 given the kernel's own grouping: its
autograd is the gradient of the approximate function with the grouping held fixed, which is what
``distr_backward`` computes. On the CPU the kernels run under TRITON_INTERPRET=1 on small shapes
(fp16/fp32; bf16 dots are wrong in Triton 3.6's interpreter); the ``gpu`` tests cover every shape
class natively in bf16 and fp16 with relative error < 1e-2.

Both ways the kernels compute S (grouped d/G products on K_fused, or dense products on q_tilde)
are autotune choices; the ``path`` fixture pins one so that both are checked.
"""

import pytest
import torch
import triton

from distr_compile import DistrConfig, distr_attention, ops, reference
from distr_compile.inputs import canonicalize
from distr_compile.kernels import attention_backward as bwd
from distr_compile.kernels.attention import distr_forward
from distr_compile.kernels.grouping import lsh_group

from test_kernels import CPU_DTYPES, DEVICE, GPU_CASES, gpu_case, make_inputs, make_mask, rel_err


@pytest.fixture(params=["grouped", "dense"])
def path(request, monkeypatch):
    """Pin both main kernels to one S path (a single config, so the autotuner is bypassed)."""
    grouped = request.param == "grouped"
    dq = triton.Config({"BLOCK_N": 32, "GROUPED": grouped}, num_warps=4, num_stages=2)
    dkdv = triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "GROUPED": grouped}, num_warps=4, num_stages=2)
    for kernel, config in ((bwd._bwd_dq_kernel, dq), (bwd._bwd_dkdv_kernel, dkdv)):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    return request.param


def check_backward(B, Hq, Hkv, Lq, Lk, D, dtype, group_size, block_m, mask_kind="none", causal=False,
                   representative="mean", layout="contiguous", with_grad_lse=False, tol=None, mask=None):
    tol = tol or (1e-4 if dtype == torch.float32 else 1e-2)
    config = DistrConfig(group_size=group_size, block_m=block_m, representative=representative)
    q, k, v = make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout)
    mask = make_mask(mask_kind, B, Hq, Lq, Lk) if mask is None else mask
    perm = lsh_group(q, config) if group_size > 1 else None
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(B, Hq, Lq, device=DEVICE) if with_grad_lse else None

    weights = None if perm is None else reference.representative_weights(k, perm, config, causal, q.shape[-2])
    out, lse = distr_forward(q, k, v, perm, weights, mask, causal, None, group_size, block_m)
    dq, dk, dv = bwd.distr_backward(
        q, k, v, perm, weights, out, lse, grad_out, mask, causal, None, group_size, block_m, grad_lse=grad_lse
    )

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.distr_attention(*leaves, mask, causal, None, config, perm=perm)
    outputs, grads = [ref_out], [grad_out.double()]
    if with_grad_lse:
        finite = ref_lse.isfinite()
        outputs.append(ref_lse[finite])
        grads.append(grad_lse.double()[finite])
    expected = torch.autograd.grad(outputs, leaves, grads)
    for name, got, want, like in zip("qkv", (dq, dk, dv), expected, (q, k, v)):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert got.isfinite().all(), f"d{name}: unwritten or non-finite"
        assert rel_err(got, want) < tol, f"d{name}: relative error {rel_err(got, want):.2e}"



@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_small(dtype, group_size, causal):
    check_backward(1, 2, 2, 37, 45, 64, dtype, group_size, 16, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_both_paths(path, causal):
    check_backward(1, 2, 1, 45, 37, 32, torch.float16, 2, 32, causal=causal)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_backward_masks(path, mask_kind):
    check_backward(1, 2, 2, 21, 40, 32, torch.float16, 2, 16, mask_kind=mask_kind)


def test_backward_fully_masked_rows_get_zero_gradient():
    mask = torch.rand(1, 1, 20, 24, device=DEVICE) > 0.3
    mask[..., 3, :] = False
    mask[..., 17, :] = False
    check_backward(1, 2, 2, 20, 24, 32, torch.float32, 2, 16, mask=mask.expand(1, 2, 20, 24))


@pytest.mark.parametrize("ratio", [2, 3])
def test_backward_gqa_sums_query_heads(ratio):
    check_backward(1, 2 * ratio, 2, 20, 33, 32, torch.float16, 2, 16, causal=True)


def test_backward_non_contiguous_and_odd_lengths(path):
    check_backward(1, 3, 3, 17, 5, 32, torch.float32, 2, 32, layout="bshd")


@pytest.mark.parametrize("representative", ["sample", "lstsq"])
def test_backward_weighted_representatives_and_group_of_8(path, representative):
    check_backward(1, 2, 1, 33, 33, 128, torch.float16, 8, 16, representative=representative)


@pytest.mark.parametrize("representative", ["lstsq", "lstsq-visible"])
def test_backward_lstsq_gqa_causal(path, representative):
    check_backward(2, 4, 2, 40, 40, 32, torch.float32, 2, 16, causal=True, representative=representative)


@pytest.mark.parametrize("Lq, Lk", [(40, 24), (24, 40)])
def test_backward_causal_unequal_lengths(Lq, Lk):
    check_backward(1, 1, 1, Lq, Lk, 32, torch.float32, 2, 16, causal=True)


def test_backward_gradient_on_lse():
    check_backward(1, 2, 2, 19, 30, 32, torch.float32, 2, 16, causal=True, with_grad_lse=True)


# ---- the op's autograd: Triton backward wired into torch.ops.distr.attention ------------------


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Let the op take its kernel path on CPU fp16 (under the interpreter), as it does on CUDA."""
    if DEVICE == "cpu":
        monkeypatch.setattr(ops, "uses_kernel", lambda q, v, config: q.dtype == torch.float16 and q.shape[-1] // config.group_size >= 16)
    calls = []
    monkeypatch.setattr(ops, "distr_backward", lambda *a, **kw: calls.append(1) or bwd.distr_backward(*a, **kw))
    return calls


def op_gradients(dtype, mask_grad, grouping="lsh"):
    """Gradients of a 5-d GQA call with a broadcast additive mask, through the op and through
    float64 autograd of the reference given the op's own grouping."""
    config = DistrConfig(group_size=2, block_m=16, grouping=grouping)
    q = torch.randn(2, 1, 4, 21, 32, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(2, 1, 2, 30, 32, device=DEVICE, dtype=dtype) for _ in range(2))
    mask = torch.randn(21, 30, device=DEVICE, dtype=dtype)
    weight = torch.randn(2, 1, 4, 21, 32, device=DEVICE, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [mask.clone().requires_grad_(mask_grad)]
    (distr_attention(*leaves[:3], leaves[3], enable_gqa=True, config=config) * weight).sum().backward()
    got = [t.grad for t in leaves if t.requires_grad]

    c = canonicalize(q, k, v, mask, 0.0, False, None, True, 2)
    perm = ops.group_columns(c.q, c.v, config)
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    c = canonicalize(*ref[:3], ref[3], 0.0, False, None, True, 2)
    out, _ = reference.distr_attention(c.q, c.k, c.v, c.attn_mask, False, None, config, perm=perm)
    (c.restore(out) * weight.double()).sum().backward()
    return got, [t.grad for t in ref if t.requires_grad]


@pytest.mark.parametrize("grouping", ["lsh", "fixed"])
def test_op_backward_runs_the_kernels(kernels_on_cpu, grouping):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    got, want = op_gradients(dtype, mask_grad=False, grouping=grouping)
    assert kernels_on_cpu, "the op's backward did not call the Triton kernels"
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert rel_err(g, w) < 1e-2, f"d{name}: relative error {rel_err(g, w):.2e}"


def test_op_backward_with_mask_gradient_uses_the_reference(kernels_on_cpu):
    got, want = op_gradients(torch.float16 if DEVICE == "cpu" else torch.bfloat16, mask_grad=True)
    assert not kernels_on_cpu, "a mask that needs a gradient must take the reference backward"
    assert len(got) == 4
    for name, g, w in zip(["q", "k", "v", "mask"], got, want):
        assert rel_err(g, w) < 1e-2, f"d{name}: relative error {rel_err(g, w):.2e}"


# ---- GPU: every shape class in bf16 and fp16, relative error < 1e-2 -------------------------

BACKWARD_GPU_CASES = GPU_CASES | {"lse": dict(with_grad_lse=True, causal=True)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("case", list(BACKWARD_GPU_CASES))
def test_backward_gpu(dtype, D, group_size, case):
    check_backward(**gpu_case(BACKWARD_GPU_CASES[case], D, dtype, group_size))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "gqa", "odd"])
def test_backward_gpu_both_paths(path, case):
    case = {"causal": GPU_CASES["causal"], "gqa": dict(Hkv=2), "odd": GPU_CASES["odd"]}[case]
    check_backward(**gpu_case(case, 128, torch.bfloat16, 2))
