"""SmolLM2-135M training step (forward + backward) with ``attn_implementation="distr"`` in eager mode vs compiled.

One run, one model shape (SmolLM2-135M's: 30 layers, 9 query / 3 KV heads of dim 64, random init:
the time does not depend on the weights), ``--batch`` x ``--tokens`` tokens, the next-token loss
and its backward. Rows:

* eager, "sdpa" and eager, "distr" configured with G (``distr_compile.configure``): the eager
  fine-tuning path;
* compiled, ``backend="inductor"`` (exact) and compiled, ``backend="distr"`` with
  ``approximate="always"`` at the same G: the compiled path;
* the eager "distr" model compiled with ``backend="inductor"``: whether a gap between the two distr
  rows is attention or the rest of the model (Inductor fuses norms, RoPE and the MLP).

Columns: median ms (``triton.testing.do_bench`` on CUDA, wall clock elsewhere), ratio to the
compiled distr row (or the first row timed, without it: ``--rows``), and the loss (the two distr
rows compute the same function: equal up to bf16 rounding).

    python benchmarks/hf_eager.py                       # CUDA, bf16, 8 x 1024 tokens, G=2
    python benchmarks/hf_eager.py --device cpu --smoke  # tiny shape: checks the script
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import transformers

import distr_compile
from distr_compile import DistrConfig, models
from distr_compile.config import GROUPINGS

SMOLLM2 = models.SMOLLM2_SHAPE
ROWS = ("eager-sdpa", "eager-distr", "compiled-inductor", "compiled-distr", "eager-distr-inductor")
SMOKE = dict(SMOLLM2, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--grouping", choices=GROUPINGS, default="fixed")
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to time (default: all)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model at 2 x 64 tokens, float32")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each row, profile one step and print its N most expensive ops (self time)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.tokens = 2, 64
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.smoke else torch.float32
    config = DistrConfig(group_size=args.group_size, grouping=args.grouping, block_m=args.block_m)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(SMOKE if args.smoke else SMOLLM2),
                                                                  attn_implementation="sdpa"))
    base = base.to(device, dtype).train()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.tokens), device=device)
    options = {"approximate": "always", "group_size": config.group_size, "grouping": config.grouping,
               "block_m": config.block_m}

    def eager_distr() -> torch.nn.Module:
        return distr_compile.configure(copy.deepcopy(base), config)

    g = config.group_size
    rows = {  # key: (label, the model, built when its row runs)
        "eager-sdpa": ("eager, sdpa", lambda: copy.deepcopy(base)),
        "eager-distr": (f"eager, distr G={g}", eager_distr),
        "compiled-inductor": ("compiled, backend=inductor",
                              lambda: torch.compile(copy.deepcopy(base), backend="inductor")),
        "compiled-distr": (f"compiled, backend=distr G={g}",
                           lambda: torch.compile(copy.deepcopy(base), backend="distr", options=options)),
        "eager-distr-inductor": (f"eager distr G={g}, compiled with inductor",
                                 lambda: torch.compile(eager_distr(), backend="inductor")),
    }
    results = {}
    for key in args.rows:
        name, build = rows[key]
        model = build()
        params = list(model.parameters())

        def step(model=model) -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss

        loss = step().item()  # compiles the compiled rows
        results[name] = (median_ms(step, params, device), loss)
        print(f"{name}: {results[name][0]:.2f} ms, loss {loss:.4f}", flush=True)
        if args.profile:
            print(profile(step, params, device, args.profile), flush=True)
        del model, params

    reference_name = rows["compiled-distr"][0] if "compiled-distr" in args.rows else next(iter(results))
    reference = results[reference_name][0]
    from tabulate import tabulate

    shape = "2-layer smoke" if args.smoke else "SmolLM2-135M"
    print(f"\n{shape} shape, forward+backward, {args.batch} x {args.tokens} tokens, {dtype}, {device_name(device)}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {config}")
    print(tabulate([[name, f"{ms:.2f}", f"{ms / reference:.3f}", f"{loss:.4f}"] for name, (ms, loss) in results.items()],
                   headers=["path", "median ms", f"vs {reference_name}", "loss"]))


def median_ms(step: Callable[[], torch.Tensor], params: list[torch.Tensor], device: torch.device) -> float:
    """Median time of one training step: ``triton.testing.do_bench`` on CUDA (gradients reset to
    None between calls), the wall-clock median of 5 calls elsewhere."""
    if device.type == "cuda":
        import triton

        # a step takes 30-150 ms: rep=3000 times 20-100 of them (rep=50 timed a single step)
        return triton.testing.do_bench(step, warmup=500, rep=3000, grad_to_none=params, return_mode="median")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile(step: Callable[[], torch.Tensor], params: list[torch.Tensor], device: torch.device, top: int) -> str:
    """Where one step's time goes: ``torch.profiler``'s table of the ``top`` ops by self time on the
    device (CPU time without CUDA), after one untimed step."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        for p in params:
            p.grad = None
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=top)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


if __name__ == "__main__":
    main()
