"""Model-zoo accuracy table: each real offline model compiled with ``backend="distr"``.

Per model: how many attention layers the guard approximates under the default settings, and the
model's end-to-end metric exact (eager) vs distr default vs distr with every layer approximated
(``approximate="always"``, G=2). The guard calibrates on the compiled model's first call; metrics
are measured on different, held-out inputs.

  - MiniLM-L6 (sentence embeddings): cosine of each held-out paragraph's embedding to the exact one.
  - SmolLM2-135M (causal LM): perplexity on a held-out pydoc window.

    python benchmarks/zoo.py --smollm2-dir <folder with the GGUF> --minilm-dir <folder> --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from distr_compile import models

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from results import append_section  # noqa: E402  (benchmarks/results.py, beside this script)
from smollm2_guard import windows  # noqa: E402  (the guard check's calibration and held-out windows)

SETTINGS = {"distr default": {}, "distr always (G=2)": {"approximate": "always", "group_size": 2}}


def compiled_runs(model, calibration, held_out, metric, row: dict) -> None:
    """Fill ``row`` with the metric of each distr setting on ``held_out`` (after calibrating on
    ``calibration``) and the default setting's approximated-layer count."""
    for name, options in SETTINGS.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="distr", options=options)
        with torch.no_grad():
            compiled(**calibration)
        row[name] = metric(compiled)
        if not options:
            row["layers approximated (default)"] = models.approximated(compiled)


def minilm_row(args) -> dict:
    tokenizer, model = models.minilm(args.minilm_dir, dtype=args.dtype)
    model = model.to(args.device)
    texts = models.pydoc_texts()
    tokenize = lambda t: tokenizer(t, truncation=True, max_length=args.minilm_tokens, padding="max_length",
                                   return_tensors="pt").to(args.device)
    calibration, held_out = tokenize(texts[:32]), tokenize(texts[32:64])
    with torch.no_grad():
        exact = models.sentence_embeddings(model, held_out)

    def cosine_to_exact(m) -> str:
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(models.sentence_embeddings(m, held_out), exact, dim=-1)
        return f"{cos.mean():.4f} (min {cos.min():.4f})"

    row = {"model": "MiniLM-L6 (6 layers, d=32)", "metric": f"embedding cosine vs exact, 32 x {args.minilm_tokens} tok",
           "exact": "1.0000"}
    compiled_runs(model, calibration, held_out, cosine_to_exact, row)
    return row


def smollm2_row(args) -> dict:
    tokenizer, model = models.smollm2(args.smollm2_dir)
    model = model.to(args.device, args.dtype)
    n = args.smollm2_tokens
    first, held_out = windows(tokenizer, n, args.device)
    calibration = {"input_ids": first, "use_cache": False}
    row = {"model": "SmolLM2-135M (30 layers, d=64, GQA)", "metric": f"perplexity, {n} held-out tokens",
           "exact": f"{models.perplexity(model, held_out):.3f}"}
    compiled_runs(model, calibration, held_out, lambda m: f"{models.perplexity(m, held_out):.3f}", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--minilm-dir", help="MiniLM save_pretrained folder (default: the installed package's)")
    parser.add_argument("--smollm2-dir", help="folder holding the SmolLM2 GGUF (default: the installed package's)")
    parser.add_argument("--minilm-tokens", type=int, default=256)
    parser.add_argument("--smollm2-tokens", type=int, default=2048)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--out", type=pathlib.Path, help="append the table to this markdown file")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        try:
            rows.append({"minilm": minilm_row, "smollm2": smollm2_row}[name](args))
        except RuntimeError as e:  # weights missing: say so, go on with the others
            print(f"{name}: {e}", file=sys.stderr)
        print(rows[-1] if rows else "", flush=True)
    append_section(args.out, "Model zoo: layers approximated and end-to-end accuracy",
                   f"{str(args.dtype).removeprefix('torch.')}, default DistrConfig (tolerance 0.05 rel. "
                   "Frobenius, G=2, block_m 64); calibrated on the first call, measured on held-out inputs. "
                   "`python benchmarks/zoo.py`", rows, device=args.device)


if __name__ == "__main__":
    main()
