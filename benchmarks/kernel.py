"""DistrAttention through the public op vs every SDPA backend, side by side in one run (GPU).

For each (head dim, sequence length, causal): do_bench medians (ms) of SDPA cuDNN / flash /
efficient and of ``distr_attention`` (the public op) for each variant: exact attention through
the op (G=1), the per-block LSH grouping (the paper's algorithm), the fixed grouping and the
projection (the static path: q' = q A, k' = k B once per call, then exact attention with a d/G
Q/K head dim), at G=2 and G=4. Forward ("fwd") and forward+backward ("f+b"), eager and under
``torch.compile`` ("compiled"). The last columns give each variant's speed against the fastest
SDPA backend (>1: faster) and its output error against exact attention on these random inputs
(the projection rows time per-head maps equal to the fixed grouping's: same error, same cost as
fitted maps). Batch x length is 16k tokens of 16 heads.

The op's exact attention (G=1 and the static path) runs on cuDNN where it applies, else on our
Triton kernel; ``--exact`` times each given ("exact" column; ``ops.cudnn_exact``). Our kernel
loads through pointers or TMA descriptors; ``--tma`` times its eager calls in each mode given
(``kernels.attention.tma_loads``: "0" pointers, "1" TMA, "auto" the autotuner's pick among both;
the "tma" column). Compiled graphs always load through pointers, so their rows are timed once.

    python benchmarks/kernel.py                                   # the full sweep (about 8 min, H200)
    python benchmarks/kernel.py --dims 128 --lengths 4096 --no-compiled   # a quick look
    python benchmarks/kernel.py --variants G=1 --exact triton --tma 0 1 --no-backward --no-compiled  # pointer vs TMA
    python benchmarks/kernel.py --json results.json               # also write every number as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

from distr_compile import DistrConfig, distr_attention
from distr_compile.kernels.attention import TMA_MODES, tma_loads
from distr_compile.ops import cudnn_exact, is_static, static_maps

from results import environment  # benchmarks/results.py, beside this script

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
VARIANTS = {
    "G=1": DistrConfig(group_size=1),
    "lsh G=2": DistrConfig(group_size=2, grouping="lsh"),
    "fixed G=2": DistrConfig(group_size=2, grouping="fixed"),
    "lsh G=4": DistrConfig(group_size=4, grouping="lsh"),
    "fixed G=4": DistrConfig(group_size=4, grouping="fixed"),
    "projection G=2": DistrConfig(group_size=2, grouping="projection"),
    "projection G=4": DistrConfig(group_size=4, grouping="projection"),
}
EXACT_PATHS = ("cudnn", "triton")
TOKENS, HEADS = 16384, 16


def bench(fn: Callable) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def op_call(config: DistrConfig, causal: bool, q: torch.Tensor) -> Callable:
    """The public entry: ``distr_attention``; G=1 goes through ``torch.ops.distr.attention`` (the
    op's exact path) since ``distr_attention`` hands G=1 to SDPA. Projection maps per head: the
    fixed grouping's, one copy per query / KV head."""
    if config.exact:
        knobs = dataclasses.astuple(config)[:6]
        return lambda q, k, v: torch.ops.distr.attention(q, k, v, None, causal, None, False, *knobs)[0]
    if config.grouping == "projection":
        fixed = static_maps(q, q, config.replace(grouping="fixed"))
        maps = tuple(m.expand(q.shape[1], *m.shape).contiguous() for m in fixed)
        return lambda q, k, v: distr_attention(q, k, v, is_causal=causal, config=config, maps=maps)
    return lambda q, k, v: distr_attention(q, k, v, is_causal=causal, config=config)


def timings(fn: Callable, q, k, v, grad, backward: bool) -> dict[str, float]:
    """Forward and (``backward``) forward+backward medians of ``fn(q, k, v)``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        fwd = bench(lambda: fn(q, k, v))
    if not backward:
        return {"fwd": fwd}
    return {"fwd": fwd, "f+b": bench(lambda: torch.autograd.grad(fn(*leaves), leaves, grad))}


def run_case(d: int, L: int, causal: bool, variants: list[str], compiled: bool, dtype: torch.dtype,
             exact_paths: list[str], tma_modes: list[str], backward: bool) -> list[dict]:
    B = max(1, TOKENS // L)
    q, k, v = (torch.randn(B, HEADS, L, d, device="cuda", dtype=dtype) for _ in range(3))
    grad = torch.randn_like(q)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    base = {"d": d, "L": L, "B": B, "causal": causal}
    rows = []
    for name, backend in SDPA_BACKENDS.items():
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            with sdpa_kernel(backend):
                rows.append(base | {"impl": f"sdpa {name}", "mode": "eager", "exact": "-", "tma": "-"}
                            | timings(sdpa, q, k, v, grad, backward))
        except RuntimeError:  # the backend refuses this shape or dtype
            continue
    measures = ("fwd", "f+b") if backward else ("fwd",)
    best = {m: min(r[m] for r in rows) for m in measures}
    for name in variants:
        config = VARIANTS[name]
        fn = op_call(config, causal, q)
        ungrouped = config.exact or is_static(config) or config.grouping == "projection"  # the op's exact path
        for exact in exact_paths if ungrouped else ["-"]:
            with cudnn_exact(exact != "triton"):
                for tma in tma_modes if exact == "triton" else ["-"]:
                    with tma_loads("0" if tma == "-" else tma):
                        error = rel_err(fn(q, k, v), expected)
                        rows.append(base | {"impl": f"distr {name}", "mode": "eager", "exact": exact, "tma": tma}
                                    | timings(fn, q, k, v, grad, backward) | {"err": error})
                if compiled:  # traced afresh: a compiled graph keeps the exact path chosen when traced
                    torch._dynamo.reset()
                    run = torch.compile(fn, fullgraph=True, dynamic=False)
                    error = rel_err(run(q, k, v), expected)
                    rows.append(base | {"impl": f"distr {name}", "mode": "compiled", "exact": exact,
                                        "tma": "0" if exact == "triton" else "-"}
                                | timings(run, q, k, v, grad, backward) | {"err": error})
    for row in rows:
        for m in measures:
            row[f"{m} vs best"] = best[m] / row[m]
    torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--causal", nargs="+", type=int, choices=(0, 1), default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each variant under torch.compile")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time forward+backward (its autotuning adds compiles)")
    parser.add_argument("--exact", nargs="+", choices=EXACT_PATHS, default=list(EXACT_PATHS),
                        help="the op's exact paths to time (G=1 and the static path): cuDNN, our Triton kernel")
    parser.add_argument("--tma", nargs="+", choices=TMA_MODES, default=["0"],
                        help="eager memory paths of our exact kernel to time (0 pointers, 1 TMA, auto)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write every row here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 1024  # one compile per (variant, shape) is intended
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    rows = []
    print(f"{environment()}, {args.dtype}, {HEADS} heads, B x L = {TOKENS}", flush=True)
    for d in args.dims:
        for L in args.lengths:
            for causal in args.causal:
                case = run_case(d, L, bool(causal), args.variants, args.compiled, dtype, args.exact, args.tma,
                                args.backward)
                print(tabulate(case, headers="keys", floatfmt=".3f", tablefmt="github", missingval="-"), flush=True)
                rows += case
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "dtype": args.dtype, "rows": rows}, indent=1))
    summary = [r for r in rows if r["impl"].startswith("distr")]
    print("\nSummary (speed vs the fastest SDPA backend, >1 is faster):")
    columns = ("d", "L", "causal", "impl", "mode", "exact", "tma", "fwd", "fwd vs best", "f+b vs best", "err")
    print(tabulate([{k: r[k] for k in columns if k in r} for r in summary], headers="keys", floatfmt=".3f",
                   tablefmt="github"))


if __name__ == "__main__":
    main()
