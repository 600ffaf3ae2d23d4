"""DistrAttention backward kernels vs SDPA flash, cuDNN and efficient backward, side by side in one run (GPU).

For each (head dim, sequence length, causal), bf16, 16 heads, B x L = 16k tokens: median times
(triton.testing.do_bench, ms) of
  * forward+backward: SDPA flash / cuDNN / efficient (autograd), and ours at G=1 (plain FlashAttention-2 in
    Triton, the exact baseline) / G=2 / G=4 (grouping kernel + forward + ``distr_backward``);
  * backward only: the same, from a saved forward;
plus, as a correctness check on these very shapes and autotuned configs, the worst relative error
of (dq, dk, dv) vs SDPA's gradients for G=1, and vs autograd through the reference (one batch
element, two heads) for G>1; and the dK/dV and dQ configs the autotuner picked for G=2 (``grp``:
S on K_fused at d/G, ``dns``: S on q_tilde at full d). Prints a table and appends it to
BENCHMARKS.md with device and versions.

    python benchmarks/backward.py                          # full sweep
    python benchmarks/backward.py --dims 128 --lengths 4096  # d=128, L=4096: the shape BENCHMARKS.md reports
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate
from torch._library.triton import set_wrap_triton_enabled
from torch.nn.attention import SDPBackend, sdpa_kernel

from distr_compile import DistrConfig, reference
from distr_compile.config import GROUPINGS, REPRESENTATIVES
from distr_compile.kernels import attention_backward as bwd
from distr_compile.kernels.attention import distr_forward
from distr_compile.ops import kernel_grouping

from results import append_section  # benchmarks/results.py, beside this script

SDPA_BACKENDS = {  # flash first: its gradients are G=1's reference
    "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
TOKENS, HEADS, DTYPE = 16384, 16, torch.bfloat16


def bench(fn, grads=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def worst_rel_err(got, want) -> float:
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want))


def describe(config: triton.Config) -> str:
    kw = config.kwargs
    shape = "x".join(str(kw[n]) for n in ("BLOCK_M", "BLOCK_N") if n in kw)
    return f"{'grp' if kw['GROUPED'] else 'dns'} {shape} w{config.num_warps}s{config.num_stages}"


def time_sdpa(row, q, k, v, grad_out, causal):
    """SDPA backends: forward+backward and backward-only; returns flash's gradients."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grads = None
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
                row[f"{name} f+b"] = bench(
                    lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(grad_out), leaves
                )
                row[f"{name} bwd"] = bench(lambda: out.backward(grad_out, retain_graph=True), leaves)
                if grads is None:
                    grads = torch.autograd.grad(out, leaves, grad_out)
        except RuntimeError:  # backend refuses this shape/dtype
            row[f"{name} f+b"] = row[f"{name} bwd"] = math.nan
    return grads


def time_distr(row, q, k, v, grad_out, causal, config: DistrConfig, sdpa_grads):
    G, block_m = config.group_size, config.block_m

    def forward():
        perm, weights = kernel_grouping(q, k, v, config, causal)  # as the op computes them
        return perm, weights, *distr_forward(q, k, v, perm, weights, None, causal, None, G, block_m)

    def backward(perm, weights, out, lse):
        return bwd.distr_backward(q, k, v, perm, weights, out, lse, grad_out, None, causal, None, G, block_m)

    perm, weights, out, lse = forward()
    grads = backward(perm, weights, out, lse)
    row[f"G={G} f+b"] = bench(lambda: backward(*forward()))
    row[f"G={G} bwd"] = bench(lambda: backward(perm, weights, out, lse))
    if G == 1:
        row["G=1 err"] = worst_rel_err(grads, sdpa_grads)
        return
    head = [t[:1, :2].detach().float().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.distr_attention(*head, None, causal, None, config, perm=perm[:1, :2])
    expected = torch.autograd.grad(ref_out, head, grad_out[:1, :2].float())
    row[f"G={G} err"] = worst_rel_err([t[:1, :2] for t in grads], expected)
    if G == 2:
        row["G=2 dkdv"] = describe(bwd._bwd_dkdv_kernel.best_config)
        row["G=2 dq"] = describe(bwd._bwd_dq_kernel.best_config)


def run_case(d: int, L: int, causal: bool, base: DistrConfig, groups: list[int]) -> dict:
    B = max(1, TOKENS // L)
    q, k, v, grad_out = (torch.randn(B, HEADS, L, d, device="cuda", dtype=DTYPE) for _ in range(4))
    row = {"d": d, "L": L, "B": B, "causal": causal}
    sdpa_grads = time_sdpa(row, q, k, v, grad_out, causal)
    with set_wrap_triton_enabled(False):  # launch directly, as inside the op
        for G in groups:
            time_distr(row, q, k, v, grad_out, causal, base.replace(group_size=G), sdpa_grads)
    for G in groups[1:]:
        row[f"G={G} f+b vs flash"] = row["flash f+b"] / row[f"G={G} f+b"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4], help="G values; 1 must come first")
    parser.add_argument("--block-m", type=int, default=DistrConfig().block_m)
    parser.add_argument("--representative", choices=REPRESENTATIVES, default=DistrConfig().representative)
    parser.add_argument("--grouping", choices=GROUPINGS, default=DistrConfig().grouping)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("BENCHMARKS.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/backward.py needs a CUDA GPU")
    if args.groups[0] != 1:
        sys.exit("--groups must start with 1 (the exact baseline)")

    base = DistrConfig(block_m=args.block_m, representative=args.representative, grouping=args.grouping)
    rows = []
    for d in args.dims:
        for L in args.lengths:
            for causal in (False, True):
                rows.append(run_case(d, L, causal, base, args.groups))
                print(tabulate([rows[-1]], headers="keys", floatfmt=".3f"), flush=True)
    append_section(
        args.out, "Backward kernels: DistrAttention vs SDPA flash, cuDNN and efficient",
        f"bf16, {HEADS} heads, B x L = {TOKENS} tokens, block_m={args.block_m}, {args.grouping} grouping, {args.representative} representatives. "
        "do_bench medians in ms. `f+b`: forward + backward (ours: grouping kernel + forward + backward "
        "kernels); `bwd`: backward only from a saved forward. `err`: worst relative error of (dq, dk, dv), "
        "G=1 vs SDPA flash's gradients, G>1 vs autograd through the reference (batch 0, heads 0-1). "
        "`dkdv`/`dq`: configs the autotuner picked (grp: S at d/G on K_fused; dns: S at full d on q_tilde). "
        "Last columns: flash f+b time / ours (>1: faster).",
        rows,
    )

if __name__ == "__main__":
    main()
