"""Issue 8's open speed gap: at d=128, L=4096, B=4 the G=2 forward+backward costs ~1.45 ms more
than G=1 with or without a causal mask (BENCHMARKS.md, session 5), so the overhead does not shrink
with the causal half of the work. Per-kernel CUDA time of one forward+backward (grouping, forward,
preprocess, dK/dV, dQ, copies), G=1 vs G=2, causal and not, from torch.profiler.

    python notes/backward_profile.py
"""
import collections

import torch
from tabulate import tabulate
from torch._library.triton import set_wrap_triton_enabled
from torch.profiler import ProfilerActivity, profile

from distr_compile import DistrConfig
from distr_compile.kernels.attention import distr_forward
from distr_compile.kernels.attention_backward import distr_backward
from distr_compile.ops import kernel_grouping

B, H, L, D, ITERS = 4, 16, 4096, 128, 20


def step(q, k, v, grad_out, causal, G):
    config = DistrConfig(group_size=G)
    perm, weights = kernel_grouping(q, k, v, config, causal)
    out, lse = distr_forward(q, k, v, perm, weights, None, causal, None, G, config.block_m)
    return distr_backward(q, k, v, perm, weights, out, lse, grad_out, None, causal, None, G, config.block_m)


def kernel_times(causal, G):
    q, k, v, grad_out = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for _ in range(5):  # autotune and warm up
        step(q, k, v, grad_out, causal, G)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            step(q, k, v, grad_out, causal, G)
        torch.cuda.synchronize()
    times = collections.Counter()
    for event in prof.key_averages():
        if event.device_time_total > 0:
            times[event.key[:60]] += event.device_time_total / ITERS
    return times


with set_wrap_triton_enabled(False):
    for causal in (False, True):
        columns = {G: kernel_times(causal, G) for G in (1, 2)}
        names = sorted(set().union(*columns.values()), key=lambda n: -max(c[n] for c in columns.values()))
        rows = [[n, *(f"{columns[G][n]:.0f}" for G in (1, 2))] for n in names]
        rows.append(["total", *(f"{sum(columns[G].values()):.0f}" for G in (1, 2))])
        print(f"causal={causal}, us per forward+backward (B={B}, H={H}, L={L}, d={D}, bf16)")
        print(tabulate(rows, headers=["kernel", "G=1", "G=2"]), flush=True)
