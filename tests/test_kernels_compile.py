"""Compile the Triton kernels for Hopper (sm_90) without a GPU.

The interpreter runs kernels as NumPy and accepts code the GPU compiler rejects (a non-constexpr
global, a constexpr branch that only fails to type-check on hardware) and cannot see resource
limits. Triton ships ptxas, so the real compile runs here: every kernel must build for sm_90, and
every autotune config that survives the shared-memory pruning must fit Hopper's 227 KiB.

The kernels must be real ``JITFunction``s, not the interpreter's stand-ins, so the checks run in a
child process without TRITON_INTERPRET (this file is also that child's script).
"""

import os
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from distr_compile.kernels import attention, attention_backward, decode, grouping

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_MEMORY = 232448  # bytes per block, as the H100/H200 report it


def compile_for_hopper(kernel, pointers: dict, floats: tuple, constexprs: dict, num_warps=4, num_stages=3):
    """Compile ``kernel`` (a JITFunction) for sm_90: pointer args typed as given (names the kernel
    lacks are ignored), floats as fp32, every other runtime arg as i32. Returns the metadata."""
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: kind for name, kind in pointers.items() if name in signature})
    signature.update({name: "fp32" for name in floats})
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages}).metadata


def forward_constexprs(D, G, causal=True, mask_kind=attention.MASK_BOOL, block_m=64, block_n=64, DV=None, tma=False):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, D=D, DV=DV or D, G=G, IS_CAUSAL=causal, MASK_KIND=mask_kind, TMA=tma)


def tma_descriptors(D, DV, block_m, block_n) -> dict:
    """The TMA path's descriptor arguments, typed as a launch with these tiles types them."""
    tile = lambda rows, d: f"tensordesc<bf16[1,1,{rows},{d}]>"
    return dict(Q_DESC=tile(block_m, D), K_DESC=tile(block_n, D), V_DESC=tile(block_n, DV), O_DESC=tile(block_m, DV))


GROUPING_POINTERS = dict(PERM="*i32", PERM_INV="*i32", WEIGHTS="*fp32")
FORWARD_POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", MASK="*i1", OUT="*bf16", LSE="*fp32", **GROUPING_POINTERS)


def dummy_perm(G: int) -> dict:
    """At G = 1 the launchers pass a data tensor as the unused grouping arguments (PERM, PERM_INV,
    WEIGHTS): type them so, so that code reachable only for G > 1 (e.g. after an early return)
    fails here as it does on the GPU."""
    return dict.fromkeys(GROUPING_POINTERS, "*bf16") if G == 1 else {}


def check_forward():
    for D, G, DV in [(64, 1, 64), (64, 4, 64), (128, 2, 128), (256, 2, 256), (32, 1, 128)]:
        compile_for_hopper(attention._distr_fwd_kernel, {**FORWARD_POINTERS, **dummy_perm(G)}, ("qk_scale",),
                           forward_constexprs(D, G, DV=DV))
        if G == 1:
            compile_for_hopper(attention._distr_fwd_kernel, {**FORWARD_POINTERS, **dummy_perm(G), **tma_descriptors(D, DV, 64, 64)},
                               ("qk_scale",), forward_constexprs(D, G, DV=DV, tma=True))


def check_autotune_configs_fit_shared_memory():
    # grouped (WIDE_CONFIGS holds its default) and ungrouped (EXACT_CONFIGS, and TMA_CONFIGS with
    # their Q tile and O staging in shared memory too; the static path's reduced Q/K head dim beside
    # a full V head dim), each after the shared-memory pruning
    tma_configs = attention._on_path(attention.TMA_CONFIGS, tma=True)
    for configs, G, dims in [(attention.WIDE_CONFIGS, 2, [(128, 128), (256, 256)]),
                             (attention.EXACT_CONFIGS, 1, [(128, 128), (256, 256)]),
                             (tma_configs, 1, [(64, 64), (64, 128), (128, 128), (256, 256)])]:
        for D, DV in dims:
            for config in attention._fit_shared_memory(configs, {}, D=D, DV=DV):
                tile = dict(block_m=config.kwargs.get("BLOCK_M", 64), block_n=config.kwargs["BLOCK_N"])
                tma = config.kwargs.get("TMA", False)
                descriptors = tma_descriptors(D, DV, tile["block_m"], tile["block_n"]) if tma else {}
                meta = compile_for_hopper(
                    attention._distr_fwd_kernel, {**FORWARD_POINTERS, **dummy_perm(G), **descriptors}, ("qk_scale",),
                    forward_constexprs(D, G, causal=False, mask_kind=attention.MASK_NONE, DV=DV, tma=tma, **tile),
                    num_warps=config.num_warps, num_stages=config.num_stages,
                )
                assert meta.shared <= HOPPER_SHARED_MEMORY, f"D={D} {config}: {meta.shared} bytes of shared memory"


def check_grouping():
    compile_for_hopper(grouping._lsh_group_kernel, dict(Q="*bf16", PERM="*i32"), (), dict(BLOCK_M=64, D=128, R=16))
    compile_for_hopper(attention._keys_contiguous_kernel, dict(K="*bf16", OUT="*bf16"), (), dict(BLOCK_N=64, D=128))


def check_decode():
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", QPOS="*i64", KPOS="*i64", OUT="*fp32", LSE="*fp32")
    for causal in (False, True):
        constexprs = dict(BLOCK_M=16, BLOCK_N=64, D=128, DV=128, CAUSAL=causal, PRECISION="tf32")
        compile_for_hopper(decode._split_kv_kernel, pointers, ("qk_scale",), constexprs)


BACKWARD_POINTERS = dict(
    Q="*bf16", OUT="*bf16", K="*bf16", V="*bf16", Q_REP="*bf16", Q_TILDE="*bf16", DO="*bf16", LSE="*fp32",
    DLSE="*fp32", LSE2="*fp32", DELTA="*fp32", MASK="*i1", GRAD_K="*bf16", GRAD_V="*bf16", DQ="*fp32",
    **GROUPING_POINTERS,
)


def check_backward():
    for G, grouped, D in [(1, True, 128), (1, False, 128), (2, True, 128), (2, False, 128), (1, False, 64)]:
        common = dict(D=D, DV=128, G=G, GROUPED=grouped, IS_CAUSAL=True, MASK_KIND=attention.MASK_BOOL)
        pointers = {**BACKWARD_POINTERS, **dummy_perm(G)}
        if grouped:  # the preprocess has no GROUPED knob: once per G
            compile_for_hopper(attention_backward._bwd_preprocess_kernel, pointers, (),
                               dict(BLOCK_M=64, D=D, DV=128, G=G, HAS_DLSE=True))
        compile_for_hopper(attention_backward._bwd_dkdv_kernel.fn, pointers, ("qk_scale", "scale"),
                           dict(BLOCK_M=32, BLOCK_N=64, BLOCK_GROUP=64, **common))
        compile_for_hopper(attention_backward._bwd_dq_kernel.fn, pointers, ("qk_scale", "scale"),
                           dict(BLOCK_M=64, BLOCK_N=32, **common))


CHECKS = [check_forward, check_autotune_configs_fit_shared_memory, check_grouping, check_decode, check_backward]


def test_kernels_build_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]


if __name__ == "__main__":
    failed = []
    for check in CHECKS:
        try:
            check()
            print(f"ok    {check.__name__}")
        except Exception as e:  # report every failing kernel, not only the first
            failed.append(check.__name__)
            print(f"FAIL  {check.__name__}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
