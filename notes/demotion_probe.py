"""How many SmolLM2 layers the original-reference guard keeps approximated, zero-shot, on CPU.

The adapted-model guard (``guard_reference="original"``) demotes sites until the model's
perplexity on the guard windows is within ``--tolerance`` of the original's. Which site it demotes
next decides how many stay approximated; this probe runs it on the pretrained model (the original
is the model itself) and prints the count, the end-to-end error, the number of model runs, and
the plan's perplexity increase on other held-out windows (did the choice fit the guard windows only?).

    python notes/demotion_probe.py --windows 2 --seq-len 256 --validation-windows 8
"""

import argparse
import copy
import math
import time

import torch

from distr_compile import DistrConfig, calibrate, guard, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--grouping", default="lsh")
    parser.add_argument("--representative", default="mean")
    parser.add_argument("--validation-windows", type=int, default=8)
    args = parser.parse_args()
    tokenizer, model = models.smollm2()
    model.eval()
    ids = models.pydoc_token_ids(tokenizer)
    ids = ids[int(len(ids) * 0.9):]  # adapt.py's held-out part
    batches = [{"input_ids": ids[i * args.seq_len:(i + 1) * args.seq_len][None], "labels":
                ids[i * args.seq_len:(i + 1) * args.seq_len][None], "use_cache": False}
               for i in range(args.windows + args.validation_windows)]
    batches, validation = batches[:args.windows], batches[args.windows:]
    calls = []

    def perplexity_increase(output, original_output) -> float:
        calls.append(1)
        return math.exp(output.loss.float().item() - original_output.loss.float().item()) - 1.0

    start = time.perf_counter()
    plan = calibrate(model, batches, original=copy.deepcopy(model), guard_reference="original",
                     output_tolerance=args.tolerance, output_error=perplexity_increase,
                     grouping=args.grouping, representative=args.representative)
    kept = sorted(int(n.split("_")[-1]) if n.split("_")[-1].isdigit() else n
                  for n, d in plan.sites.items() if d.approximated)
    seconds = time.perf_counter() - start
    config = DistrConfig(grouping=args.grouping, representative=args.representative)
    approx = {n: config.replace(group_size=d.group_size) for n, d in plan.sites.items() if d.approximated}
    print(f"{len(kept)}/{len(plan.sites)} sites approximated, perplexity {plan.output_error:+.2%} on "
          f"{args.windows} x {args.seq_len} tokens, {validation_increase(model, approx, validation):+.2%} on "
          f"{len(validation)} other windows; {len(calls) // args.windows} model runs, {seconds:.0f} s; "
          f"approximated: {kept}")


def validation_increase(model, approx: dict, batches: list[dict]) -> float:
    """Relative perplexity increase over the model itself on ``batches`` with the sites in
    ``approx`` approximated (the guard's own replay: a probe interpreter per traced graph)."""
    def replay(gm, example_inputs):
        probe_gm = guard.probe_module(gm)
        return lambda *args: guard.run_probe(guard.SiteProbe(probe_gm, {}, approx), list(args))

    torch._dynamo.reset()
    replayed = torch.compile(model, backend=replay)
    with torch.no_grad():
        nll = sum(replayed(**b).loss.item() for b in batches)
        exact = sum(model(**b).loss.item() for b in batches)
    return math.exp((nll - exact) / len(batches)) - 1.0


if __name__ == "__main__":
    main()
