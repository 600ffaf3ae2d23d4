"""The static path (a fixed grouping: q' = q A, k' = k B once, then one exact kernel whose Q/K head
dim is d/G and V head dim d) against the float64 reference, forward and backward.

On the CPU the kernels run under TRITON_INTERPRET=1 on small shapes through ``ops.kernel_forward``
and ``ops.kernel_backward`` (the functions the op calls on CUDA); the ``gpu`` tests run the public
op itself in bf16 and fp16.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from distr_compile import DistrConfig, distr_attention, ops, reference
from distr_compile.inputs import canonicalize
from distr_compile.kernels.attention import distr_forward
from distr_compile.kernels.attention_backward import distr_backward

from test_kernels import DEVICE, make_inputs, make_mask, rel_err

CASES = {
    "plain": {},
    "gqa-causal": dict(Hq=6, Hkv=2, causal=True),
    "bool": dict(mask_kind="bool"),
    "additive": dict(mask_kind="additive", Hq=4, Hkv=2),
    "causal-longer-queries": dict(Lq=40, Lk=24, causal=True),
    "causal-longer-keys": dict(Lq=24, Lk=40, causal=True),
    "odd-strided": dict(Lq=17, Lk=5, layout="bshd"),
}


def check_static(B=2, Hq=2, Hkv=2, Lq=37, Lk=45, D=64, dtype=torch.float16, group_size=2, mask_kind="none",
                 causal=False, layout="contiguous", representative="mean", tol=None):
    """Forward and gradients of the static path against autograd through the float64 reference."""
    tol = tol or (1e-4 if dtype == torch.float32 else 1e-2)
    config = DistrConfig(group_size=group_size, grouping="fixed", representative=representative, block_m=16)
    assert ops.is_static(config)
    q, k, v = make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout)
    mask = make_mask(mask_kind, B, Hq, Lq, Lk)
    c = canonicalize(q, k, v, mask, 0.0, causal, None, Hq != Hkv, group_size)
    out, lse = ops.kernel_forward(c, config, causal, None)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = ops.kernel_backward(c, config, causal, None, out, lse, grad_out, grad_lse)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.distr_attention(*leaves, c.attn_mask, causal, None, config)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref_out) < tol
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=tol, atol=tol)
    expected = torch.autograd.grad([ref_out, ref_lse[finite]], leaves, [grad_out.double(), grad_lse.double()[finite]])
    for name, got, want in zip("qkv", (dq, dk, dv), expected):
        assert got.shape == want.shape and got.isfinite().all(), name
        assert rel_err(got, want) < tol, f"d{name}: relative error {rel_err(got, want):.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_static_path_matches_reference(case):
    check_static(**CASES[case])


@pytest.mark.parametrize("group_size, D", [(2, 32), (4, 64)])
@pytest.mark.parametrize("representative", ["mean", "sample", "lstsq"])
def test_static_path_group_sizes_and_representatives(group_size, D, representative):
    check_static(D=D, group_size=group_size, representative=representative, dtype=torch.float32, causal=True)


def test_static_reduction_is_the_fixed_grouping():
    """q' k'^T == q_tilde k^T: the reduced product is the grouped product, in float64."""
    config = DistrConfig(group_size=4, grouping="fixed", representative="lstsq")
    q, k = torch.randn(2, 3, 20, 32, dtype=torch.float64), torch.randn(2, 3, 25, 32, dtype=torch.float64)
    q_reduced, k_reduced = ops.static_qk(q, k, config)
    perm = reference.group_columns(q, config)
    weights = reference.representative_weights(k, perm, config)
    q_tilde = reference.representative_query(q, perm, weights, config)
    torch.testing.assert_close(q_reduced @ k_reduced.mT, q_tilde @ k.mT)


def test_mean_maps_are_cached_for_eager_tensors_only():
    """Eager calls reuse one pair of "mean" maps (built outside inference mode, so autograd can
    save them later); traced calls (fake tensors) build theirs in the graph."""
    config = DistrConfig(group_size=2, grouping="fixed")
    q = torch.randn(1, 2, 8, 16)
    with torch.inference_mode():
        first = ops.static_maps(q, q, config)
    assert not first[0].is_inference()
    assert all(a is b for a, b in zip(first, ops.static_maps(q.clone(), q, config)))
    torch.testing.assert_close(first[0], torch.eye(8).repeat_interleave(2, dim=0) / 2)
    x = torch.randn(3, 16, requires_grad=True)
    (x @ first[0]).sum().backward()  # the cached map meets autograd
    torch.testing.assert_close(x.grad, first[0].sum(1).expand(3, 16))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
        assert ops.static_maps(fake, fake, config)[0] is not first[0]


def test_lstsq_visible_and_lsh_are_not_static():
    assert not ops.is_static(DistrConfig(grouping="fixed", representative="lstsq-visible"))
    assert not ops.is_static(DistrConfig(grouping="lsh"))
    assert not ops.is_static(DistrConfig(group_size=1, grouping="fixed"))


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_with_smaller_query_key_head_dim(causal):
    """The exact kernels with d_qk != d_v (what the static path launches) against float64."""
    dtype = torch.float32
    q, k = (torch.randn(2, 3, L, 16, device=DEVICE, dtype=dtype) for L in (33, 41))
    v = torch.randn(2, 3, 41, 64, device=DEVICE, dtype=dtype)
    scale = 1 / math.sqrt(64)
    out, lse = distr_forward(q, k, v, None, None, None, causal, scale, 1, 16)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*leaves, None, causal, scale)
    assert out.shape == (2, 3, 33, 64)
    assert rel_err(out, ref_out) < 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(out)
    got = distr_backward(q, k, v, None, None, out, lse, grad_out, None, causal, scale, 1, 16)
    want = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and rel_err(g, w) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D, group_size", [(64, 2), (64, 4), (128, 2), (128, 4), (256, 2)])
@pytest.mark.parametrize("case", ["plain", "gqa-causal", "bool", "odd-strided"])
def test_static_op_gpu(dtype, D, group_size, case):
    """The public op on CUDA: forward and gradients against float64 autograd of the reference."""
    shape = dict(B=2, Hq=4, Hkv=4, Lq=300, Lk=300) | {k: v for k, v in CASES[case].items() if k in ("Hq", "Hkv", "Lq", "Lk")}
    causal, mask_kind = CASES[case].get("causal", False), CASES[case].get("mask_kind", "none")
    config = DistrConfig(group_size=group_size, grouping="fixed")
    q, k, v = make_inputs(*shape.values(), D, dtype, CASES[case].get("layout", "contiguous"))
    mask = make_mask(mask_kind, shape["B"], shape["Hq"], shape["Lq"], shape["Lk"])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    gqa = shape["Hq"] != shape["Hkv"]
    out = distr_attention(*leaves, mask, is_causal=causal, enable_gqa=gqa, config=config)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    c = canonicalize(*ref_leaves, mask, 0.0, causal, None, gqa, group_size)
    ref_out = c.restore(reference.distr_attention(c.q, c.k, c.v, c.attn_mask, causal, None, config)[0])
    want = torch.autograd.grad(ref_out, ref_leaves, grad_out.double())
    assert rel_err(out, ref_out) < 1e-2
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) < 1e-2, f"d{name}: relative error {rel_err(g, w):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("grouping, cudnn", [("fixed", False), ("fixed", True), ("lsh", False)])
def test_backward_op_opcheck_gpu(grouping, cudnn):
    """The internal backward op's registration (schema, fake tensors, tracing) on its kernel path.
    With cuDNN on, tracing is checked with static shapes: traced with symbolic shapes the op takes
    our kernel, eager takes cuDNN, and two exact kernels agree only to bf16 rounding."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_static" if cudnn else "test_aot_dispatch_dynamic")
    q, k, v = make_inputs(2, 4, 2, 130, 130, 64, torch.bfloat16)
    knobs = (2, 64, 16, "mean", grouping, 0)
    with ops.cudnn_exact(cudnn):
        out, lse = torch.ops.distr.attention(q, k, v, None, True, None, True, *knobs)
        args = (q, k, v, None, out, lse, torch.randn_like(out), None, True, None, True, *knobs)
        torch.library.opcheck(torch.ops.distr.attention_backward.default, args, test_utils=checks)


# ---- eager calls: the static path as plain autograd ops where cuDNN takes it -------------------


@pytest.mark.parametrize("projection, representative", [(False, "mean"), (False, "lstsq"), (True, "mean")],
                         ids=["fixed-mean", "fixed-lstsq", "projection"])
def test_eager_static_path_runs_autograd_ops_not_the_op(monkeypatch, projection, representative):
    """An eager call whose mapped inputs cuDNN takes (forced here, with SDPA standing in for
    cuDNN's kernel) runs q A, k B and the attention as autograd ops: cuDNN's op gets q', k' of head
    dim d/G at the original head dim's scale, with the lse only when a gradient is needed, and
    output and gradients equal the op's (whose maps stay fixed in the backward)."""
    from distr_compile.projection import fit_projection

    q, k, v = make_inputs(2, 4, 2, 24, 24, 32, torch.float32)
    config = DistrConfig(group_size=2, grouping="projection" if projection else "fixed", representative=representative)
    maps = fit_projection(q, k, 2, method="weighted", is_causal=True) if projection else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = distr_attention(*leaves, is_causal=True, enable_gqa=True, config=config, maps=maps)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, grad)

    calls = []

    def cudnn(q, k, v, bias, with_lse, dropout_p, is_causal, debug, scale):
        calls.append((q.shape[-1], with_lse, scale))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                                enable_gqa=True)
        return out, None

    monkeypatch.setattr(ops, "uses_kernel", lambda q, v, config: True)
    monkeypatch.setattr(ops, "cudnn_applies", lambda *args: True)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", cudnn)
    monkeypatch.setattr(torch.ops.distr, "attention", None)  # the op must not run
    got = distr_attention(*leaves, is_causal=True, enable_gqa=True, config=config, maps=maps)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves, grad), want_grads):
        torch.testing.assert_close(g, w)
    with torch.no_grad():
        distr_attention(*leaves, is_causal=True, enable_gqa=True, config=config, maps=maps)
    assert calls == [(16, True, 1 / math.sqrt(32)), (16, False, 1 / math.sqrt(32))]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("projection", [False, True], ids=["fixed", "projection"])
def test_eager_static_path_gpu(causal, projection):
    """On CUDA an eager call of the static path runs cuDNN's attention under its own autograd
    (no Python op in the backward), with the output transposed and made contiguous as Hugging
    Face does (so the incoming gradient's layout is not the output's), and agrees with the op."""
    from distr_compile.projection import fit_projection

    q, k, v = make_inputs(2, 8, 2, 300, 300, 64, torch.bfloat16)
    config = DistrConfig(group_size=2, grouping="projection" if projection else "fixed")
    maps = fit_projection(q.float(), k.float(), 2, method="weighted", is_causal=causal) if projection else None
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = distr_attention(*leaves, is_causal=causal, enable_gqa=True, config=config, maps=maps)
    assert "Cudnn" in type(out.grad_fn).__name__
    grad = torch.randn(2, 300, 8, 64, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad(out.transpose(1, 2).contiguous(), leaves, grad)

    op_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if projection:
        from distr_compile.projection import project

        qp, kp = project(*op_leaves[:2], *maps)
        want = torch.ops.distr.attention(qp, kp, op_leaves[2], None, causal, 64 ** -0.5, True, 1, 64, 16, "mean",
                                         "lsh", 0)[0]
    else:
        want = torch.ops.distr.attention(*op_leaves, None, causal, None, True, 2, 64, 16, "mean", "fixed", 0)[0]
    want_grads = torch.autograd.grad(want, op_leaves, grad.transpose(1, 2))
    assert rel_err(out, want) < 1e-2
    for name, g, w in zip("qkv", got, want_grads):
        assert rel_err(g, w) < 1e-2, f"d{name}: relative error {rel_err(g, w):.2e}"


# ---- grouping="projection": calibrated maps through the public op -------------------------------


def test_projection_through_the_op_is_attention_on_the_mapped_inputs():
    """distr_attention with maps = exact attention on (q A, k B, v) at the original head dim's
    scale; gradients reach q, k, v and the maps."""
    from distr_compile.projection import fit_projection, projected_attention

    q, k, v = make_inputs(2, 6, 2, 37, 45, 32, torch.float64)
    a, b = fit_projection(q, k, 2, method="weighted", is_causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a.double(), b.double())]
    out = distr_attention(*leaves[:3], is_causal=True, enable_gqa=True,
                          config=DistrConfig(grouping="projection"), maps=tuple(leaves[3:]))
    torch.testing.assert_close(out, projected_attention(q, k, v, a.double(), b.double(), is_causal=True))
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_projection_runs_the_exact_kernel_where_kernels_run(monkeypatch):
    """Where the kernels run (CUDA, half precision; here forced, under the interpreter), the
    projected q', k' (head dim E/G, v's E) go to our exact kernel, as in a compiled graph, and not
    to SDPA, whose flash kernel refuses unequal head dims; forward and backward match the
    reference."""
    from distr_compile.projection import fit_projection, projected_attention

    monkeypatch.setattr(ops, "uses_kernel", lambda q, v, config: config.exact)
    launched = []
    launch = ops.distr_forward
    monkeypatch.setattr(ops, "distr_forward", lambda *args: launched.append(args[0].shape) or launch(*args))
    q, k, v = make_inputs(1, 4, 2, 40, 40, 32, torch.float32)
    a, b = fit_projection(q, k, 2, method="weighted", is_causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = distr_attention(*leaves, is_causal=True, enable_gqa=True, config=DistrConfig(grouping="projection"),
                          maps=(a, b))
    assert launched == [torch.Size([1, 4, 40, 16])]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = projected_attention(*ref_leaves, a, b, is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


def test_projection_needs_maps_of_the_right_shape():
    q, k, v = make_inputs(1, 4, 2, 9, 9, 32, torch.float32)
    projection = DistrConfig(grouping="projection", group_size=4)
    with pytest.raises(ValueError, match="needs them"):
        distr_attention(q, k, v, enable_gqa=True, config=projection)
    with pytest.raises(ValueError, match="go with grouping='projection'"):
        distr_attention(q, k, v, enable_gqa=True, config=DistrConfig(), maps=(torch.eye(32)[None], torch.eye(32)[None]))
    with pytest.raises(ValueError, match=r"map A has shape \(2, 32, 8\), expected \(4, 32, 8\)"):
        distr_attention(q, k, v, enable_gqa=True, config=projection, maps=(torch.randn(2, 32, 8), torch.randn(2, 32, 8)))
    with pytest.raises(ValueError, match="rank 16 do not fit head dim 32 at G=4"):
        distr_attention(q, k, v, enable_gqa=True, config=projection, maps=(torch.randn(4, 32, 16), torch.randn(2, 32, 16)))
    with pytest.raises(ValueError, match="not a column grouping"):
        torch.ops.distr.attention(q, k, v, None, False, None, True, 4, 64, 16, "mean", "projection", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_projection_kernel_path_gpu(causal):
    """On CUDA bf16 the mapped inputs run the exact kernel with a d/G Q/K head dim."""
    from distr_compile.projection import fit_projection

    q, k, v = make_inputs(2, 8, 2, 300, 300, 128, torch.bfloat16)
    a, b = fit_projection(q.float(), k.float(), 2, method="weighted", is_causal=causal)
    out = distr_attention(q, k, v, is_causal=causal, enable_gqa=True, config=DistrConfig(grouping="projection"),
                          maps=(a, b))
    ref_q, ref_k = q.double() @ a.double(), k.double() @ b.double()
    c = canonicalize(ref_q, ref_k, v.double(), None, 0.0, causal, None, True, 1)
    ref = reference.attention(c.q, c.k, c.v, None, causal, 1 / math.sqrt(128))[0]
    assert rel_err(out, ref) < 1e-2


# ---- exact attention inside the op: cuDNN where it applies, our kernel otherwise ---------------

EXACT_GPU_CASES = {
    "plain": dict(D=64, DV=64),
    "causal-gqa": dict(D=64, DV=64, Hkv=2, causal=True),
    "static-shape": dict(D=32, DV=64, causal=True),  # q', k' of the static path at G=2
    "strided": dict(D=128, DV=128, layout="bshd"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "triton"])
@pytest.mark.parametrize("case", list(EXACT_GPU_CASES))
@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["out", "out+lse"])
def test_exact_op_paths_gpu(cudnn, case, with_grad_lse):
    """The op at G = 1 on either exact path (cuDNN, our kernel): out, lse and gradients (with and
    without a gradient on the lse, which cuDNN's backward does not take) against float64 autograd;
    eager and compiled agree."""
    if cudnn and not torch.backends.cudnn.is_available():
        pytest.skip("no cuDNN")
    shape = dict(B=2, Hq=4, Hkv=4, Lq=300, Lk=300, D=64, DV=64, causal=False, layout="contiguous") | EXACT_GPU_CASES[case]
    q, k, v = make_inputs(shape["B"], shape["Hq"], shape["Hkv"], shape["Lq"], shape["Lk"], shape["D"], torch.bfloat16,
                          shape["layout"])
    if shape["DV"] != shape["D"]:
        v = torch.randn(*v.shape[:-1], shape["DV"], device="cuda", dtype=torch.bfloat16)
    causal, gqa = shape["causal"], shape["Hq"] != shape["Hkv"]
    scale = 1 / math.sqrt(shape["DV"])
    with ops.cudnn_exact(cudnn):
        c = canonicalize(q, k, v, None, 0.0, causal, scale, gqa, 1)
        assert ops.cudnn_applies(c.q, c.k, c.v, None, causal) == cudnn

        def run(q, k, v):
            return torch.ops.distr.attention(q, k, v, None, causal, scale, gqa, 1, 64, 16, "mean", "lsh", 0)

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = run(*leaves)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse) if with_grad_lse else None
        got = torch.autograd.grad([out, lse] if with_grad_lse else [out], leaves,
                                  [grad_out, grad_lse] if with_grad_lse else [grad_out])
        compiled_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        compiled_out, compiled_lse = torch.compile(run, fullgraph=True, dynamic=False)(*compiled_leaves)
        compiled_grads = torch.autograd.grad([compiled_out, compiled_lse] if with_grad_lse else [compiled_out],
                                             compiled_leaves, [grad_out, grad_lse] if with_grad_lse else [grad_out])
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rc = canonicalize(*ref_leaves, None, 0.0, causal, scale, gqa, 1)
    ref_out, ref_lse = (rc.restore(t) for t in reference.attention(rc.q, rc.k, rc.v, None, causal, scale))
    want = torch.autograd.grad([ref_out, ref_lse] if with_grad_lse else [ref_out], ref_leaves,
                               [grad_out.double(), grad_lse.double()] if with_grad_lse else [grad_out.double()])
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert rel_err(out, ref_out) < 1e-2 and rel_err(compiled_out, ref_out) < 1e-2
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(compiled_lse.double(), ref_lse, rtol=1e-2, atol=1e-2)
    for name, g, cg, w in zip("qkv", got, compiled_grads, want):
        assert g.shape == w.shape and rel_err(g, w) < 1e-2, f"d{name}: relative error {rel_err(g, w):.2e}"
        assert rel_err(cg, w) < 1e-2, f"compiled d{name}: relative error {rel_err(cg, w):.2e}"


def test_exact_path_stays_on_our_kernel_off_cuda_and_with_masks():
    """cuDNN is asked only for CUDA inputs without a mask; DISTR_COMPILE_CUDNN=0 (``cudnn_exact``)
    keeps our kernel everywhere."""
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, torch.float16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    assert not ops.cudnn_applies(q, k, v, mask, False)
    if DEVICE == "cpu":
        assert not ops.cudnn_applies(q, k, v, None, False)
    with ops.cudnn_exact(False):
        assert not ops.cudnn_applies(q, k, v, None, False)
    result = subprocess.run([sys.executable, "-c", "import distr_compile"], capture_output=True, text=True,
                            env=os.environ | {"DISTR_COMPILE_CUDNN": "yes"})
    assert result.returncode != 0 and "DISTR_COMPILE_CUDNN='yes': expected 0 or 1" in result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("config", [DistrConfig(group_size=1), DistrConfig(group_size=2, grouping="fixed"),
                                    DistrConfig(group_size=2, grouping="random")], ids=["exact", "fixed", "grouped"])
def test_broadcast_batch_on_the_kernels_gpu(config):
    """k and v of batch 1 broadcast over q's batch on the kernel paths (cuDNN or ours, and the
    grouped kernel): the kernels' backward sums dk, dv back over the broadcast batch."""
    q = torch.randn(3, 4, 200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4, 200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = torch.ops.distr.attention(q, k, v, None, True, None, False, config.group_size, config.block_m,
                                    config.num_hyperplanes, config.representative, config.grouping, config.seed)[0]
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expanded = [leaves[0], *(t.expand(3, -1, -1, -1) for t in leaves[1:])]
    c = canonicalize(*expanded, None, 0.0, True, None, False, config.group_size)
    want_out = reference.distr_attention(c.q, c.k, c.v, None, True, None, config)[0]
    wants = torch.autograd.grad(want_out.square().sum(), leaves)
    assert rel_err(out, want_out) < 1e-2
    for name, got, want in zip("qkv", grads, wants):
        assert got.shape == want.shape and rel_err(got, want) < 2e-2, f"d{name}: {rel_err(got, want):.2e}"
