"""How fast an attention site runs exact and approximated, measured on the site's real inputs.

The guard approximates a site only where DistrAttention is measured faster than the exact
attention it would replace: SDPA on the same q/k/v, mask and flags, i.e. the fused kernel PyTorch
picks there (cuDNN, flash, efficient or math). Approximate candidates run through the op with
their kernels autotuned, as a compiled model runs them. Times are medians in milliseconds:
``triton.testing.do_bench`` on CUDA, wall clock on the CPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .kernels.attention import autotuned

EXACT = 1


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of ``fn()`` in ms (after a warm-up call that also compiles and autotunes)."""
    fn()
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def site_times(args: tuple, candidates: Mapping[int, Callable[[], object]]) -> dict[int, float]:
    """ms per group size at one site: 1 is exact SDPA on ``args``, the op's leading arguments
    (q, k, v, attn_mask, is_causal, scale, enable_gqa); each candidate G runs its callable, the
    op as the rewrite emits it (for a projection, the q A and k B products included)."""
    q, k, v, mask, is_causal, scale, enable_gqa = args
    with torch.no_grad(), autotuned():
        times = {EXACT: time_ms(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa), q.device)}
        for g, run in candidates.items():
            times[g] = time_ms(run, q.device)
    return times


def too_slow(times: dict[int, float], group_size: int, min_speedup: float) -> str | None:
    """Why G is not worth it here (exact ms / G's ms under ``min_speedup``), or None."""
    exact, approx = times.get(EXACT), times.get(group_size)
    if min_speedup <= 0 or exact is None or approx is None or exact >= min_speedup * approx:
        return None
    return (f"G={group_size} measured {approx:.3g} ms against {exact:.3g} ms for exact SDPA "
            f"(needs {min_speedup:g}x)")
