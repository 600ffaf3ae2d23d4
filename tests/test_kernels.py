"""Triton kernels against the reference: under TRITON_INTERPRET=1 on the CPU (small shapes), and
natively on a GPU (``gpu`` marker, bf16/fp16 on every shape class).

The attention kernel is checked with the reference given the kernel's own grouping, so the two
compute the same function; the grouping kernel is checked separately against the reference's.
bf16 is GPU-only: Triton 3.6's interpreter multiplies bf16 dot operands as raw uint16 bits.
"""


import pytest
import torch

from distr_compile import DistrConfig, reference
from distr_compile.kernels import attention
from distr_compile.kernels.attention import distr_forward
from distr_compile.kernels.grouping import lsh_group

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout="contiguous"):
    shape_q, shape_k = (B, Hq, Lq, D), (B, Hkv, Lk, D)
    if layout == "bshd":  # (B, L, H, D) storage seen through a transpose: non-contiguous strides
        make = lambda s: torch.randn(s[0], s[2], s[1], s[3], device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        make = lambda s: torch.randn(s, device=DEVICE, dtype=dtype)
    return make(shape_q), make(shape_k), make(shape_k)


def make_mask(kind, B, Hq, Lq, Lk):
    if kind == "bool":
        m = torch.rand(B, 1, Lq, Lk, device=DEVICE) > 0.3
    elif kind == "additive":
        m = torch.randn(1, Hq, Lq, Lk, device=DEVICE)
    else:
        return None
    return m.expand(B, Hq, Lq, Lk)


def check_forward(B, Hq, Hkv, Lq, Lk, D, dtype, group_size, block_m, mask_kind="none",
                  causal=False, representative="mean", layout="contiguous", tol=2e-3):
    config = DistrConfig(group_size=group_size, block_m=block_m, representative=representative)
    q, k, v = make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout)
    mask = make_mask(mask_kind, B, Hq, Lq, Lk)
    perm = lsh_group(q, config) if group_size > 1 else None
    weights = None if perm is None else reference.representative_weights(k, perm, config, causal, q.shape[-2])
    out, lse = distr_forward(q, k, v, perm, weights, mask, causal, None, group_size, block_m)
    ref_out, ref_lse = reference.distr_attention(
        q.double(), k.double(), v.double(), mask, causal, None, config, perm=perm
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert out.isfinite().all(), "unwritten or non-finite output"
    assert rel_err(out, ref_out) < tol
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
@pytest.mark.parametrize("L, D", [(37, 16), (64, 64), (130, 32)])
def test_keys_contiguous(L, D, layout):
    """The grouped path's K layout: same values, keys contiguous (stride 1 along L), any input strides."""
    k = make_inputs(2, 3, 3, L, L, D, torch.float16, layout)[1]
    kt = attention.keys_contiguous(k)
    assert kt.stride(2) == 1 and kt.shape == k.shape
    assert torch.equal(kt, k)


CPU_DTYPES = [torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_small(dtype, group_size, causal):
    check_forward(2, 2, 2, 37, 45, 64, dtype, group_size, 16, causal=causal)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_forward_masks(mask_kind):
    check_forward(2, 2, 2, 21, 40, 32, torch.float16, 2, 16, mask_kind=mask_kind)


@pytest.mark.parametrize("ratio", [2, 3])
def test_forward_gqa(ratio):
    check_forward(1, 2 * ratio, 2, 20, 33, 32, torch.float16, 2, 16, causal=True)


def test_forward_non_contiguous_and_odd_lengths():
    check_forward(1, 3, 3, 17, 5, 32, torch.float32, 2, 32, layout="bshd")


@pytest.mark.parametrize("representative", ["sample", "lstsq"])
def test_forward_weighted_representatives_and_group_of_8(representative):
    check_forward(1, 2, 1, 33, 33, 128, torch.float16, 8, 16, representative=representative)


@pytest.mark.parametrize("representative", ["lstsq", "lstsq-visible"])
def test_forward_lstsq_gqa_causal(representative):
    check_forward(2, 4, 2, 40, 40, 32, torch.float32, 2, 16, causal=True, representative=representative)


def test_forward_queries_longer_than_keys_causal():
    # top-left alignment: query rows past the last key still see every key
    check_forward(1, 1, 1, 40, 24, 32, torch.float16, 2, 16, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_fixed_config(monkeypatch, causal):
    """Inside ``fixed_config()`` (the guard's calibration) the forward launches the bare kernel with
    one config; the autotuner is never reached."""
    monkeypatch.setattr(attention, "_distr_fwd_grouped", None)
    monkeypatch.setattr(attention, "_distr_fwd_ungrouped", None)
    with attention.fixed_config():
        check_forward(1, 2, 1, 40, 40, 64, torch.float16, 2, 16, causal=causal)


def test_untuned_launches_take_the_autotune_space_first_config(monkeypatch):
    """Off the interpreter, calibration launches use the first config of the autotune space that
    fits in shared memory (so the guard's timing and Inductor find that kernel compiled), with the
    grouping block as query tile where the kernel groups; head dim 256 falls back to the small
    config. The interpreter keeps FIXED_CONFIG."""
    monkeypatch.setattr(attention, "QUICK", False)
    monkeypatch.delenv("DISTR_COMPILE_AUTOTUNE", raising=False)
    options = lambda c: {"num_warps": c.num_warps, "num_stages": c.num_stages}  # noqa: E731
    first_grouped, first_exact = attention._configs(True)[0], attention._configs(False)[0]
    assert attention._untuned_launch(True, 32, 64, 64) == {**first_grouped.kwargs, "BLOCK_M": 32, **options(first_grouped)}
    assert attention._untuned_launch(False, 32, 32, 64) == {**first_exact.kwargs, **options(first_exact)}
    small = attention.FIXED_TILED_CONFIG
    assert attention._untuned_launch(False, 64, 256, 256) == {**small.kwargs, **options(small)}
    monkeypatch.setattr(attention, "QUICK", True)
    fixed = attention.FIXED_CONFIG
    assert attention._untuned_launch(False, 32, 64, 64) == {**fixed.kwargs, "BLOCK_M": 32, **options(fixed)}

# ---- TMA loads: the ungrouped forward through tensor descriptors ----------------------------

TMA_CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "gqa-causal": dict(Hq=4, Hkv=2, causal=True),
    "odd-causal": dict(Lq=129, Lk=77, causal=True),  # ragged planes: zero-filled loads, clipped stores
    "dqk<dv": dict(D=32, DV=64, causal=True),  # the static path's reduced q', k'
    "strided": dict(layout="bshd"),
    "bool": dict(mask_kind="bool"),
}


def check_exact(B=2, Hq=2, Hkv=2, Lq=150, Lk=150, D=64, DV=None, dtype=torch.float16, block_m=32, mask_kind="none",
                causal=False, layout="contiguous", tol=2e-3):
    """The ungrouped forward (G = 1, any V head dim) against float64 exact attention."""
    q, k, _ = make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout)
    v = make_inputs(B, Hkv, Hkv, Lk, Lk, DV or D, dtype, layout)[1]
    mask = make_mask(mask_kind, B, Hq, Lq, Lk)
    out, lse = distr_forward(q, k, v, None, None, mask, causal, None, 1, block_m)
    ref_out, ref_lse = reference.attention(q.double(), k.double(), v.double(), mask, causal)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, DV or D)
    assert out.isfinite().all(), "unwritten or non-finite output"
    assert rel_err(out, ref_out) < tol
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


@pytest.fixture
def tma_launches(monkeypatch):
    """Forwards in the test take TMA loads (mode "1"); yields the descriptor sets built, so that a
    test can check the TMA path ran."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    built = []
    make = attention._tma_descriptors
    monkeypatch.setattr(attention, "_tma_descriptors", lambda *args: built.append(make(*args)) or built[-1])
    with attention.tma_loads("1"):
        yield built


@pytest.fixture(params=range(len(attention.TMA_CONFIGS)))
def tma_config(request, monkeypatch, tma_launches):
    """Forwards in the test launch one of TMA_CONFIGS (the GPU's tiles and warps) through the
    autotuner, whose pre-hook re-tiles the descriptors; a pointer launch would fail."""
    config = attention._on_path([attention.TMA_CONFIGS[request.param]], tma=True)
    monkeypatch.setattr(attention, "QUICK", False)
    monkeypatch.setattr(attention, "_distr_fwd_ungrouped", {"1": attention._autotuned(config, grouped=False)})
    return config[0]


@pytest.mark.parametrize("case", list(TMA_CASES))
def test_forward_tma(case, tma_launches):
    """Untuned launches (the interpreter, DISTR_COMPILE_AUTOTUNE=0) with TMA loads forced."""
    check_exact(**TMA_CASES[case])
    assert tma_launches, "the pointer path ran"


@pytest.mark.parametrize("case", ["gqa-causal", "dqk<dv"])
def test_forward_tma_configs(tma_config, case):
    check_exact(**TMA_CASES[case] | dict(Lq=300, Lk=200, layout="bshd"))


def test_tma_only_where_descriptors_can_address():
    """TMA needs eager tensors (not a traced graph's) with d contiguous and 16-byte aligned base
    and strides; the guard's timing block loads through pointers, as compiled graphs do."""
    q = torch.randn(2, 3, 40, 64, device=DEVICE, dtype=torch.float16)
    assert attention._tma_ready(q, q.transpose(1, 2).contiguous().transpose(1, 2))
    assert not attention._tma_ready(q[..., 1:33])  # base off 16 bytes
    assert not attention._tma_ready(q.transpose(2, 3))  # d strided
    assert not attention._tma_ready(torch.randn(2, 3, 40, 36, device=DEVICE, dtype=torch.float16)[..., :32])
    assert not attention._tma_ready(q[:1].expand(2, -1, -1, -1))  # broadcast batch: stride 0
    with torch._subclasses.FakeTensorMode() as fake_mode:  # what a traced graph launches with
        assert not attention._tma_ready(fake_mode.from_tensor(q))
    with attention.tma_loads("1"), attention.autotuned():  # the guard times what compiled graphs run
        assert attention._TMA.get() == "0"
    with pytest.raises(ValueError):
        attention.tma_loads("yes").__enter__()


@pytest.mark.parametrize("mode, group_size", [("0", 1), ("1", 2)])
def test_pointer_path_without_tma(monkeypatch, mode, group_size):
    """Mode "0", and the grouped forward in any mode, build no descriptors."""
    built = []
    monkeypatch.setattr(attention, "_tma_descriptors", lambda *args: built.append(args))
    with attention.tma_loads(mode):
        check_forward(1, 2, 1, 40, 40, 32, torch.float16, group_size, 16, causal=True)
    assert not built


@pytest.mark.parametrize("num_hyperplanes", [1, 16])
def test_grouping_kernel_matches_reference(num_hyperplanes):
    config = DistrConfig(block_m=32, num_hyperplanes=num_hyperplanes, seed=5)
    q = torch.randn(2, 3, 70, 64, device=DEVICE, dtype=torch.float16)
    got = lsh_group(q, config).long()
    expected = reference.group_columns(q, config)
    # A projection within rounding of 0 may flip one sign bit between the two summation orders;
    # allow a handful of blocks to differ, never more.
    differing = (got != expected).any(-1).float().mean().item()
    assert differing <= 0.05
    assert torch.equal(got.sort(-1).values, torch.arange(64, device=DEVICE).expand_as(got))


# ---- GPU: every shape class in bf16 and fp16, relative error < 1e-2 -------------------------

GPU_CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "bool": dict(mask_kind="bool"),
    "additive": dict(mask_kind="additive"),
    "gqa": dict(Hkv=1, causal=True),
    "odd": dict(Lq=129, Lk=77, block_m=32),
    "strided": dict(layout="bshd", block_m=128),
    "sample": dict(representative="sample", block_m=16),
    "lstsq": dict(representative="lstsq", Hkv=2, causal=True),
}


def gpu_case(case: dict, D: int, dtype, group_size: int) -> dict:
    """Arguments of one GPU shape class (shared with the backward tests); skips d/G < 16, which
    runs the reference."""
    if D // group_size < 16:
        pytest.skip("d/G < 16 runs the reference")
    return dict(B=2, Hq=4, Hkv=4, Lq=300, Lk=300, D=D, dtype=dtype, group_size=group_size, block_m=64, tol=1e-2) | case


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_forward_gpu(dtype, D, group_size, case):
    check_forward(**gpu_case(GPU_CASES[case], D, dtype, group_size))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_forward_tma_gpu(dtype, D, case, tma_launches):
    """TMA loads forced, in whatever launch the environment gives (FIXED_CONFIG's tiles under
    DISTR_COMPILE_AUTOTUNE=0, else the TMA configs autotuned)."""
    case = dict(B=2, Hq=4, Hkv=4, Lq=300, Lk=300, D=D, dtype=dtype, block_m=64, tol=1e-2) | TMA_CASES[case]
    if "DV" in case:
        case |= dict(D=D // 2, DV=D)
    check_exact(**case)
    assert tma_launches, "the pointer path ran"


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", ["odd-causal", "gqa-causal", "dqk<dv"])
def test_forward_tma_configs_gpu(tma_config, D, case):
    """Each of TMA_CONFIGS (128-row tiles, 8 warps) compiled and run on the GPU, in bf16."""
    case = dict(B=2, Hq=4, Hkv=4, Lq=1000, Lk=1000, D=D, dtype=torch.bfloat16, tol=1e-2) | TMA_CASES[case]
    if "DV" in case:
        case |= dict(D=D // 2, DV=D)
    check_exact(**case)
