"""Which forward-kernel configs win where: input for the default autotune space (GPU).

Every autotune config is one more Triton compile in a cold ``torch.compile``, so the default space
is short (``DISTR_COMPILE_AUTOTUNE=1``): one config for the grouped forward (the per-block LSH or
random grouping, G > 1), three pointer-load configs for the ungrouped one (G = 1, and the static
path of ``grouping="fixed"``, whose q' and k' have a d/G head dim), plus two TMA configs for its
eager calls on Hopper. This script sets ``DISTR_COMPILE_AUTOTUNE=wide`` (every config), runs the
public op once per shape class (head dim, variant, causal, key length; bf16, 16 heads, 16k tokens
per batch; block_m 64, mean), prints every config's median time from Triton's autotuner (ms),
then, per kernel, the best subsets of 1..3 configs by their worst-case and geometric-mean slowdown
against the best of all configs. Re-run it on a new GPU before changing the default lists in
``distr_compile/kernels/attention.py``.

    python benchmarks/autotune_sweep.py                                 # the full sweep
    python benchmarks/autotune_sweep.py --dims 128 --lengths 2048 --variants "lsh G=2" G=1   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import math
import os

os.environ["DISTR_COMPILE_AUTOTUNE"] = "wide"
import torch  # noqa: E402

import distr_compile  # noqa: E402,F401  (registers torch.ops.distr.attention)
from distr_compile.kernels import attention  # noqa: E402

VARIANTS = {  # name: (group size, grouping); G = 1 and the fixed grouping run the ungrouped kernel
    "G=1": (1, "lsh"),
    "lsh G=2": (2, "lsh"),
    "lsh G=4": (4, "lsh"),
    "fixed G=2": (2, "fixed"),
    "fixed G=4": (4, "fixed"),
}
HEADS, TOKENS = 16, 16384


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--causal", type=int, nargs="+", choices=[0, 1], default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--max-subset", type=int, default=3, help="largest config subset scored")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the autotuner times the Triton kernels)")

    tables: dict[str, dict[tuple, dict[str, float]]] = {"grouped": {}, "ungrouped": {}}
    for d, name, causal, L in itertools.product(args.dims, args.variants, args.causal, args.lengths):
        G, grouping = VARIANTS[name]
        ungrouped = G == 1 or grouping == "fixed"
        # ungrouped: every memory path's space (pointer, TMA, both: DISTR_COMPILE_TMA=0 / 1 / auto)
        tuned = attention._distr_fwd_ungrouped.values() if ungrouped else [attention._distr_fwd_grouped]
        B = max(1, TOKENS // L)
        q, k, v = (torch.randn(B, HEADS, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for tuner in tuned:
            tuner.configs_timings = None
        # the registered op itself: distr_attention sends G = 1 to SDPA, not to our exact kernel
        torch.ops.distr.attention(q, k, v, None, bool(causal), None, False, G, 64, 16, "mean", grouping, 0)
        torch.cuda.synchronize()
        timings = {str(c): t[0] if isinstance(t, list) else t
                   for tuner in tuned for c, t in (tuner.configs_timings or {}).items()}
        if not timings:  # this key was tuned before (another variant with the same kernel key)
            continue
        key = (d, name, causal, L)
        tables["ungrouped" if ungrouped else "grouped"][key] = timings
        print(key, {c: round(t, 4) for c, t in timings.items()}, flush=True)

    for kernel, table in tables.items():
        if not table:
            continue
        print(f"\n{kernel} forward ({len(table)} shape classes):")
        configs = sorted({c for t in table.values() for c in t})
        for n in range(1, min(args.max_subset, len(configs)) + 1):
            scored = []
            for subset in itertools.combinations(configs, n):
                slow = [min(t[c] for c in subset if c in t) / min(t.values())
                        for t in table.values() if any(c in t for c in subset)]
                scored.append((max(slow), math.exp(sum(map(math.log, slow)) / len(slow)), subset))
            for worst, geo, subset in sorted(scored)[:3]:
                print(f"  {n} config(s): worst {worst:.3f}x, geomean {geo:.3f}x  {subset}", flush=True)


if __name__ == "__main__":
    main()
