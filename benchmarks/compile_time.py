"""Compile time of ``backend="distr"`` against ``backend="inductor"`` on one HF Llama-style model.

Each measurement runs in a fresh process with Inductor's caches disabled, and times the first
call (Dynamo trace + our pass and guard + Inductor) minus a warm call. Triton's own on-disk cache
(compiled kernels) is reported both ways, for every backend alike: "cold" runs get an empty
TRITON_CACHE_DIR each (a first compile on a new machine), "warm" runs share one that an unmeasured
run of the same setting filled (every later compile of the same model). Prints a table and appends
it to BENCHMARKS.md with --out; the target is distr within 1.25x of inductor.

    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --layers 8 --repeats 3 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "inductor": ("inductor", None),
    "distr (default: guard calibrates)": ("distr", {}),
    "distr (approximate='always')": ("distr", {"approximate": "always"}),
}


def measure(backend: str, options: dict | None, args: argparse.Namespace) -> float:
    """One compile in this process: seconds of the first call beyond a warm call."""
    import torch
    import transformers as tf

    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096, attn_implementation=args.attn,
    )
    dtype = getattr(torch, args.dtype)
    model = tf.LlamaModel(config).to(args.device, dtype).eval()
    ids = torch.randint(0, 4096, (1, args.tokens), device=args.device)
    kwargs = {"backend": backend} if options is None else {"backend": backend, "options": options}
    compiled = torch.compile(model, **kwargs)
    with torch.no_grad():
        _sync(args.device)
        start = time.perf_counter()
        compiled(input_ids=ids)
        _sync(args.device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiled(input_ids=ids)
        _sync(args.device)
        warm = time.perf_counter() - start
    return first - warm


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(name: str, cache_dir: str) -> float:
    """One measurement of setting ``name`` in a fresh process using Triton cache ``cache_dir``."""
    env = os.environ | {"TRITON_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting and cache state")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which settings to run (the first is the baseline of the ratios)")
    parser.add_argument("--out", type=pathlib.Path, help="append the table to this markdown file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, options = SETTINGS[args.one]
        print(json.dumps(measure(backend, options, args)))
        return
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from results import append_section

    cold = {name: [] for name in args.settings}
    warm = {name: [] for name in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        warm_dirs = {name: tempfile.mkdtemp(dir=tmp) for name in args.settings}
        for name in args.settings:
            run_one(name, warm_dirs[name])  # fills the cache, not counted
        for _ in range(args.repeats):  # settings interleaved, so a drifting machine hits all alike
            for name in args.settings:
                cold[name].append(run_one(name, tempfile.mkdtemp(dir=tmp)))
                warm[name].append(run_one(name, warm_dirs[name]))
                print(name, "cold", cold[name][-1], "warm", warm[name][-1], flush=True)
    base = {state: statistics.median(runs[args.settings[0]]) for state, runs in (("cold", cold), ("warm", warm))}
    rows = []
    for name in args.settings:
        cold_s, warm_s = statistics.median(cold[name]), statistics.median(warm[name])
        rows.append({
            "backend": name,
            "cold Triton cache s": cold_s, "vs inductor (cold)": f"{cold_s / base['cold']:.2f}x",
            "warm Triton cache s": warm_s, "vs inductor (warm)": f"{warm_s / base['warm']:.2f}x",
            "runs cold / warm": " ".join(f"{t:.1f}" for t in cold[name]) + " / " + " ".join(f"{t:.1f}" for t in warm[name]),
        })
    append_section(
        args.out, 'Compile time: backend="distr" vs "inductor"',
        f"random-init HF Llama ({args.layers} layers, hidden 576, 9/3 heads), {args.tokens} tokens, {args.attn} "
        f"attention, {args.dtype}. `python benchmarks/compile_time.py --layers {args.layers} --repeats {args.repeats}`: "
        "each run a fresh process with Inductor's caches off; seconds of the first call beyond a warm call; "
        f"medians of {args.repeats} runs per cache state, settings interleaved (cold: empty Triton cache; "
        "warm: filled by one unmeasured run of the same setting). Forward autotune space: "
        f"DISTR_COMPILE_AUTOTUNE={os.environ.get('DISTR_COMPILE_AUTOTUNE', '1')}.",
        rows, device=args.device, floatfmt=".2f",
    )


if __name__ == "__main__":
    main()
