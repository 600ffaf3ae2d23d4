"""DistrAttention forward kernels vs every SDPA backend, side by side in one run (GPU).

For each (dtype, head dim, sequence length, causal): median time (triton.testing.do_bench) of
SDPA flash / cuDNN / efficient, the ``distr::attention`` op at G=1 (our Triton forward without
grouping: plain FlashAttention-2, the kernel's own exact baseline) and at G=2 and G=4 (grouping
kernel + grouped forward), plus the
grouping kernel's share of the op's time and each DistrAttention config's relative output error
against exact attention on the same random inputs. Batch is chosen so every row holds 16k tokens
of 16 heads. Prints a table and appends it to BENCHMARKS.md with device and versions.

    python benchmarks/kernel.py                       # full sweep (about 3 minutes on an H100)
    python benchmarks/kernel.py --lengths 1024 --dims 64 --dtypes bf16   # quick look
    python benchmarks/kernel.py --dims 64 --lengths 1024 --layouts bhsd bshd  # HF's strided q/k/v too
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch._library.triton import set_wrap_triton_enabled

from distr_compile import DistrConfig
from distr_compile.kernels.grouping import lsh_group

from results import append_section  # benchmarks/results.py, beside this script

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
TOKENS, HEADS = 16384, 16


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_case(dtype: torch.dtype, d: int, L: int, causal: bool, block_m: int, layout: str) -> dict:
    B = max(1, TOKENS // L)
    if layout == "bshd":  # (B, L, H, D) storage seen as (B, H, L, D), as a fused QKV projection gives
        q, k, v = (torch.randn(B, L, HEADS, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, HEADS, L, d, device="cuda", dtype=dtype) for _ in range(3))
    row = {"dtype": str(dtype).removeprefix("torch."), "d": d, "L": L, "B": B, "causal": causal, "layout": layout}
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                row[f"sdpa-{name}"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        except RuntimeError:  # backend refuses this shape/dtype
            row[f"sdpa-{name}"] = math.nan
    for G in (1, 2, 4):
        config = DistrConfig(group_size=G, block_m=block_m)

        def op():
            return torch.ops.distr.attention(
                q, k, v, None, causal, None, False,
                G, block_m, config.num_hyperplanes, config.representative, config.grouping, config.seed,
            )

        name = "triton G=1" if G == 1 else f"distr G={G}"
        row[name] = bench(op)
        if G > 1:
            with set_wrap_triton_enabled(False):  # launch directly, as inside the op
                row[f"group% G={G}"] = 100 * bench(lambda: lsh_group(q, config)) / row[name]
            row[f"err G={G}"] = rel_err(op()[0], exact)
    best_exact = min(row[f"sdpa-{n}"] for n in SDPA_BACKENDS if not math.isnan(row[f"sdpa-{n}"]))
    row["G=2 vs best SDPA"] = best_exact / row["distr G=2"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--block-m", type=int, default=DistrConfig().block_m)
    parser.add_argument("--layouts", nargs="+", default=["bhsd"], choices=["bhsd", "bshd"],
                        help="memory layout of q/k/v: contiguous (B, H, L, D), or (B, L, H, D) as HF models give")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("BENCHMARKS.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU")

    rows = []
    for dtype in args.dtypes:
        for d in args.dims:
            for L in args.lengths:
                for causal, layout in itertools.product((False, True), args.layouts):
                    rows.append(run_case(DTYPES[dtype], d, L, causal, args.block_m, layout))
                    print(tabulate([rows[-1]], headers="keys", floatfmt=".3f"), flush=True)
    append_section(
        args.out, "Forward kernel: DistrAttention vs SDPA",
        f"{HEADS} heads, B x L = {TOKENS} tokens, block_m={args.block_m}, LSH grouping, mean representatives. "
        "Times are do_bench medians in ms; `group%` is the grouping kernel's share of the DistrAttention "
        "time; `err` is the relative Frobenius error of the output vs exact attention on these random "
        "inputs; the last column is best SDPA time / DistrAttention G=2 time (>1: faster).",
        rows,
    )

if __name__ == "__main__":
    main()
