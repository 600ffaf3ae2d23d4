"""Host time of one eager call of the public op, against SDPA and a bare Triton launch (GPU).

Small attention calls in eager mode (a Hugging Face model without torch.compile, at SmolLM2's size)
are bound by the host: the GPU finishes before Python has issued the next call. This prints, per
call, the host time (Python until the call returns, GPU not waited for) and the wall time (GPU
synchronised after the loop), for a shape too small to keep the GPU busy and for one step of
SmolLM2-135M's attention (8 x 1024 tokens, 9 query / 3 KV heads of dim 64, causal):

* ``sdpa``: ``F.scaled_dot_product_attention`` (the floor an eager op competes with);
* ``triton launch``: one launch of our forward kernel with a fixed config (Triton's own cost);
* ``op G=1`` and ``op fixed G=2``: ``distr_attention`` forward, and forward+backward.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --profile "op G=1 f+b"   # also where that call's host time goes
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate

from distr_compile import DistrConfig, distr_attention
from distr_compile.kernels import attention as kernels

SHAPES = {"tiny (1, 2, 128, 64)": (1, 2, 2, 128, 64), "SmolLM2 step (8, 9/3, 1024, 64)": (8, 9, 3, 1024, 64)}


def per_call_us(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host, wall) microseconds per call over ``calls`` calls after a warm-up."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return host / calls * 1e6, wall / calls * 1e6


def cases(batch: int, hq: int, hkv: int, length: int, dim: int) -> dict[str, Callable[[], object]]:
    make = lambda h: torch.randn(batch, h, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = make(hq), make(hkv), make(hkv)
    grad = torch.randn_like(q)
    out = torch.empty_like(q.detach())
    lse = torch.empty(batch, hq, length, device="cuda")
    grid = (triton.cdiv(length, 64), batch * hq)
    config = kernels.FIXED_CONFIG

    def launch() -> None:
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        kernels._distr_fwd_kernel[grid](
            qd, kd, vd, qd, qd, qd, out, lse, qd, kd, vd, out, *qd.stride(), *kd.stride(), *vd.stride(), 0, 0, 0, 0, *out.stride(),
            hq, hq // hkv, length, length, grid[0], 0.18, triton.next_power_of_2(length),
            BLOCK_M=64, D=dim, DV=dim, G=1, IS_CAUSAL=True, MASK_KIND=kernels.MASK_NONE, TMA=False, num_warps=config.num_warps,
            num_stages=config.num_stages, **config.kwargs)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def op(group_size: int) -> Callable[[], torch.Tensor]:
        config = DistrConfig(group_size=group_size, grouping="fixed")
        return lambda: distr_attention(q, k, v, is_causal=True, enable_gqa=True, config=config)

    backward = lambda fwd: (lambda: fwd().backward(grad))  # noqa: E731
    return {"sdpa fwd": sdpa, "sdpa f+b": backward(sdpa), "triton launch (fwd kernel)": launch,
            "op G=1 fwd": op(1), "op G=1 f+b": backward(op(1)),
            "op fixed G=2 fwd": op(2), "op fixed G=2 f+b": backward(op(2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", nargs="*", default=[], metavar="CALL",
                        help="calls (names as printed) to profile at the SmolLM2 shape: top functions by own and cumulative time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it measures host time around GPU launches)")
    rows = []
    for shape, dims in SHAPES.items():
        for name, fn in cases(*dims).items():
            host, wall = per_call_us(fn, args.calls)
            rows.append([shape, name, f"{host:.1f}", f"{wall:.1f}"])
            print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, bf16")
    print(tabulate(rows, headers=["shape", "call", "host us / call", "wall us / call"]))
    calls = cases(*SHAPES["SmolLM2 step (8, 9/3, 1024, 64)"])
    for name in args.profile:
        per_call_us(calls[name], 1)  # warm: autotuning and compiles out of the profile
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [calls[name]() for _ in range(args.calls)])
        print(f"\n{name}, {args.calls} calls at the SmolLM2 shape, by own and by cumulative time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
