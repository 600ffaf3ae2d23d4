"""Compile time of ``backend="distr"`` against ``backend="inductor"`` on one HF Llama-style model.

Each measurement runs in a fresh process with Inductor's caches disabled, and times the first
call (Dynamo trace + our pass and guard + Inductor) minus a warm call. Prints a table; the target
(issue 3) is distr within 1.25x of inductor.

    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --layers 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, options = SETTINGS[args.one]
        print(json.dumps(measure(backend, options, args)))
        return
    rows = []
    for name in SETTINGS:
        times = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name],
                                 capture_output=True, text=True, check=True)
            times.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append((name, statistics.median(times), times))
    from tabulate import tabulate

    base = rows[0][1]
    print(f"HF Llama {args.layers} layers, {args.tokens} tokens, {args.attn} attention, {args.dtype} on {args.device}")
    print(tabulate([(n, f"{m:.2f}", f"{m / base:.2f}x", " ".join(f"{t:.2f}" for t in ts)) for n, m, ts in rows],
                   headers=["backend", "compile s (median)", "vs inductor", "runs"]))


if __name__ == "__main__":
    main()
