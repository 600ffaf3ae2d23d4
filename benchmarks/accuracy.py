"""Per-layer accuracy of DistrAttention settings on real activations (CPU; picks the defaults).

Runs MiniLM-L6 (128-token sentences) and SmolLM2-135M (a 512-token window) on pydoc text,
captures every attention call's q/k/v (and mask/causal/GQA) at the SDPA boundary, and for each
setting (grouping, representative, block rows, G) computes the relative Frobenius error of the
attention output against exact attention, per layer and head-batch, in float32 with the
reference. Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/accuracy.py                 # both models, about 2 minutes on 2 cores
    python benchmarks/accuracy.py --models minilm
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import pathlib
import statistics

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distr_compile import DistrConfig, models, reference
from distr_compile.inputs import canonicalize

from results import append_section  # benchmarks/results.py, beside this script


@contextlib.contextmanager
def capture_sdpa(calls: list):
    """Record every F.scaled_dot_product_attention call's arguments (and still run it)."""
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q, k, v, attn_mask, is_causal, scale, enable_gqa))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def activations(name: str) -> list:
    """Captured attention calls of one model on pydoc text."""
    calls: list = []
    if name == "minilm":
        tokenizer, model = models.minilm()
        batch = tokenizer(models.pydoc_texts()[:8], truncation=True, max_length=128, padding=True, return_tensors="pt")
        with torch.no_grad(), capture_sdpa(calls):
            model(**batch)
    else:
        tokenizer, model = models.smollm2()
        ids = models.pydoc_token_ids(tokenizer)[None, 1000:1512]
        with torch.no_grad(), capture_sdpa(calls):
            model(input_ids=ids)
    return calls


def layer_error(call, config: DistrConfig) -> float:
    q, k, v, mask, causal, scale, gqa = call
    c = canonicalize(q, k, v, mask, 0.0, causal, scale, gqa, config.group_size)
    exact, _ = reference.attention(c.q, c.k, c.v, c.attn_mask, causal, scale)
    approx, _ = reference.distr_attention(c.q, c.k, c.v, c.attn_mask, causal, scale, config)
    return ((approx - exact).norm() / exact.norm()).item()


SETTINGS = [
    dict(grouping=g, representative=r, block_m=bm, group_size=G)
    for g, r, bm, G in itertools.product(("lsh", "random"), ("mean", "sample"), (16, 32, 64, 128), (2, 4))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("BENCHMARKS.md"))
    args = parser.parse_args()

    rows = []
    for name in args.models:
        calls = activations(name)
        for setting in tqdm(SETTINGS, desc=name):
            errors = [layer_error(call, DistrConfig(**setting)) for call in calls]
            rows.append({"model": name, **setting, "median": statistics.median(errors), "max": max(errors)})
    append_section(
        args.out, "Accuracy of DistrAttention settings on real activations",
        "float32 reference. Relative Frobenius error of each attention layer's output vs exact attention, "
        "median and max over layers. MiniLM-L6: 8 pydoc topics, 128 tokens, padding masked; SmolLM2-135M: "
        "one 512-token pydoc window, causal, GQA 9/3. 16 hyperplanes, seed 0.",
        rows, device="cpu",
    )

if __name__ == "__main__":
    main()
