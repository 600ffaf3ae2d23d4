"""Zero-shot accuracy of static per-head projections (``distr_compile.projection``), every layer mapped.

Each model runs a calibration pass that captures every attention layer's post-RoPE q and k (a
custom ``transformers`` attention function, registered through ``AttentionInterface``), fits one
(A, B) per layer and candidate, then is evaluated on DIFFERENT inputs with every layer's attention
replaced by exact attention on (q A, k B, v), against exact attention on the same inputs:

* SmolLM2-135M (causal, GQA 9/3, d=64): maps fitted on the first ``--fit-tokens`` pydoc tokens,
  with RoPE-shifted copies of their q, k (``--shifts``, see ``rope_shifted``) so that 256 tokens of
  text cover the positions of 512-token windows; perplexity on ``--windows`` windows of
  ``--window`` tokens from the last 10% of pydoc, and perplexity / exact perplexity (1 is exact).
* MiniLM-L6 (d=32, 12 heads): fitted on the first ``--fit-texts`` pydoc topics, evaluated on the
  last ``--eval-texts`` (128 tokens at most, padding masked); mean and min cosine of the sentence
  embeddings to exact.
* a randomly initialised ViT (``models.vit``, "small": 6 heads of d=64, 224 px, 257 tokens): fitted
  on 2 Gaussian-noise images, evaluated on 8 others; mean and min CLS-token cosine to exact.

Candidates: the projection methods (kl, weighted, scores, pca) with one query map per query head,
and "kl shared" with one per KV head (``fit_projection``'s default)
at each G, and for comparison DistrAttention's per-block groupings (LSH and fixed, mean
representatives, block 64, the package's reference). "fit s" is the time to fit every layer.

    python benchmarks/projection.py --out projection.json     # 30-60 minutes on 2 busy CPU cores
    python benchmarks/projection.py --models minilm vit --groups 2 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from distr_compile import DistrConfig, distr_attention, models
from distr_compile.projection import fit_projection, projected_attention

IMPLEMENTATION = "distr_projection"
CANDIDATES = {"kl": ("kl", False), "kl shared": ("kl", True), "weighted": ("weighted", False),
              "scores": ("scores", False), "pca": ("pca", False)}
GROUPINGS = ("lsh", "fixed")

# (module, q, k, v, mask, is_causal, scale) -> output (B, Hq, L, dv)
Handler = Callable[..., torch.Tensor]
handler: Handler | None = None


def exact(module, q, k, v, mask, is_causal, scale) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def capture(calls: dict, module, q, k, v, mask, is_causal, scale) -> torch.Tensor:
    """Exact attention that records each layer's q, k and how attention sees them."""
    calls[module] = dict(q=q, k=k, attn_mask=mask, is_causal=is_causal, scale=scale)
    return exact(module, q, k, v, mask, is_causal, scale)


def projected(maps: dict, module, q, k, v, mask, is_causal, scale) -> torch.Tensor:
    return projected_attention(q, k, v, *maps[module], attn_mask=mask, is_causal=is_causal, scale=scale)


def grouped(config: DistrConfig, module, q, k, v, mask, is_causal, scale) -> torch.Tensor:
    return distr_attention(q, k, v, mask, 0.0, is_causal, scale, q.shape[1] != k.shape[1], config=config)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The registered attention function: SDPA's conventions (transformers' ``sdpa_attention_forward``)
    around whatever ``handler`` is active."""
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return handler(module, query, key, value, attention_mask, is_causal, scale).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def attention(model, run: Handler):
    """Every attention layer of ``model`` runs ``run`` inside the block."""
    global handler
    handler = run
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        with torch.no_grad():
            yield
    finally:
        model.set_attn_implementation("sdpa")
        handler = None


def fit_maps(calls: dict, group_size: int, method: str, shared: bool, steps: int) -> tuple[dict, float]:
    """(A, B) for every captured layer, and the fitting time in seconds."""
    start = time.perf_counter()
    maps = {m: fit_projection(group_size=group_size, method=method, shared_query_map=shared, steps=steps, **c)
            for m, c in calls.items()}
    return maps, time.perf_counter() - start


def captured(model, run: Callable[[], None]) -> dict:
    """Each attention layer's q, k (and mask, causal, scale) during ``run()``."""
    calls: dict = {}
    with attention(model, functools.partial(capture, calls)):
        run()
    return calls


def study(model, calls: dict, evaluate: Callable[[], dict], args) -> list[dict]:
    """Rows for one model: exact, then every candidate fitted on ``calls`` and grouping at each G."""
    with attention(model, exact):
        reference = evaluate()
    rows = [{"G": 1, "attention": "exact", **reference}]

    def row(group_size: int, name: str, metrics: dict, **extra) -> None:
        if "ppl" in metrics:
            metrics["ppl / exact"] = metrics["ppl"] / reference["ppl"]
        rows.append({"G": group_size, "attention": name, **metrics, **extra})
        print(rows[-1], flush=True)

    for group_size in args.groups:
        for name, (method, shared) in CANDIDATES.items():
            maps, seconds = fit_maps(calls, group_size, method, shared, args.steps)
            with attention(model, functools.partial(projected, maps)):
                row(group_size, name, evaluate(), **{"fit s": seconds})
        for grouping in GROUPINGS:
            config = DistrConfig(group_size=group_size, grouping=grouping)
            with attention(model, functools.partial(grouped, config)):
                row(group_size, f"{grouping} (per block)", evaluate())
    return rows


def rope_shifted(model, calls: dict, shifts: list[int]) -> dict:
    """The calibration q, k with copies moved ``shifts`` positions later (concatenated on the batch).
    RoPE rotates a window's q and k by the same angles for a common shift, which leaves its scores
    and attention unchanged: the copies cover positions up to shift + window without new text."""
    for call in calls.values():
        q, k = call["q"], call["k"]
        rotated = [apply_rotary_pos_emb(q, k, *model.model.rotary_emb(q, torch.full((1, q.shape[2]), t))) for t in shifts]
        call["q"], call["k"] = (torch.cat(x) for x in zip(*rotated))
    return calls


def cosines(outputs: torch.Tensor, reference: torch.Tensor) -> dict:
    cos = F.cosine_similarity(outputs, reference, dim=-1)
    return {"cos mean": cos.mean().item(), "cos min": cos.min().item()}


def smollm2(args) -> list[dict]:
    tokenizer, model = models.smollm2()
    ids = models.pydoc_token_ids(tokenizer)
    held_out = ids[int(0.9 * len(ids)):][: args.windows * args.window].view(args.windows, args.window)
    calls = captured(model, lambda: model(input_ids=ids[None, : args.fit_tokens], use_cache=False))
    return study(model, rope_shifted(model, calls, args.shifts), lambda: {"ppl": models.perplexity(model, held_out)}, args)


def minilm(args) -> list[dict]:
    tokenizer, model = models.minilm()
    texts = models.pydoc_texts()

    def batch(chunk: list[str]):
        return tokenizer(chunk, truncation=True, max_length=128, padding=True, return_tensors="pt")

    fit, held_out = batch(texts[: args.fit_texts]), batch(texts[-args.eval_texts:])
    with torch.no_grad():
        reference = models.sentence_embeddings(model, held_out)
    return study(model, captured(model, lambda: model(**fit)),
                 lambda: cosines(models.sentence_embeddings(model, held_out), reference), args)


def vit(args) -> list[dict]:
    model = models.vit(224, preset="small")
    generator = torch.Generator().manual_seed(0)
    fit, held_out = torch.randn(2, 3, 224, 224, generator=generator), torch.randn(8, 3, 224, 224, generator=generator)
    with torch.no_grad():
        reference = model(pixel_values=held_out).last_hidden_state[:, 0]
    return study(model, captured(model, lambda: model(pixel_values=fit)),
                 lambda: cosines(model(pixel_values=held_out).last_hidden_state[:, 0], reference), args)


MODELS = {"smollm2": smollm2, "minilm": minilm, "vit": vit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--groups", nargs="+", type=int, default=[2, 4], help="group sizes G (d -> d/G)")
    parser.add_argument("--steps", type=int, default=50, help="L-BFGS iterations of the kl method")
    parser.add_argument("--fit-tokens", type=int, default=256, help="SmolLM2 calibration tokens (start of pydoc)")
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 128, 256],
                        help="RoPE position shifts of SmolLM2's calibration q, k (0 alone: none; see rope_shifted)")
    parser.add_argument("--windows", type=int, default=4, help="SmolLM2 held-out windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per SmolLM2 window")
    parser.add_argument("--fit-texts", type=int, default=16, help="MiniLM calibration texts")
    parser.add_argument("--eval-texts", type=int, default=32, help="MiniLM held-out texts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for name in args.models:
        results[name] = MODELS[name](args)
        print(f"\n{name}\n" + tabulate(results[name], headers="keys", floatfmt=".4f", tablefmt="github", missingval="-"))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
                                        "torch": torch.__version__, "results": results}, indent=1))
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
