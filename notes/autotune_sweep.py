"""Which forward configs win where? Input for a smaller autotune space (issue 3: every config is
one more Triton compile in a cold ``torch.compile``).

Runs the autotuned forward once per shape class (head dim, G, causal, key length) and prints every
config's median time from Triton's autotuner (ms), then, for each subset of 1..3 configs, the
worst-case and geometric-mean slowdown against the best of all configs. Needs a CUDA GPU.

    python notes/autotune_sweep.py
"""
import itertools
import math
import os

os.environ["DISTR_COMPILE_AUTOTUNE"] = "wide"
import torch  # noqa: E402

from distr_compile.kernels import attention  # noqa: E402

HEADS, TOKENS = 16, 16384


def main() -> None:
    tuned = attention._distr_fwd_tuned
    table = {}
    for d, G, causal, L in itertools.product((64, 128), (1, 2, 4), (False, True), (512, 2048, 8192)):
        B = max(1, TOKENS // L)
        q, k, v = (torch.randn(B, HEADS, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        tuned.configs_timings = None
        torch.ops.distr.attention(q, k, v, None, causal, None, False, G, 64, 16, "mean", "lsh", 0)
        torch.cuda.synchronize()
        timings = {str(c): t[0] if isinstance(t, list) else t for c, t in (tuned.configs_timings or {}).items()}
        table[(d, G, causal, L)] = timings
        print((d, G, causal, L), {c: round(t, 4) for c, t in timings.items()}, flush=True)
    configs = sorted({c for t in table.values() for c in t})
    for n in (1, 2, 3):
        scored = []
        for subset in itertools.combinations(configs, n):
            slow = [min(t[c] for c in subset if c in t) / min(t.values()) for t in table.values() if any(c in t for c in subset)]
            scored.append((max(slow), math.exp(sum(map(math.log, slow)) / len(slow)), subset))
        for worst, geo, subset in sorted(scored)[:3]:
            print(f"{n} configs: worst {worst:.3f}x geomean {geo:.3f}x  {subset}", flush=True)


if __name__ == "__main__":
    main()
