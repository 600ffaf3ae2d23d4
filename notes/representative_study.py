"""Can a better Q representative (or grouping) cut DistrAttention's error on SmolLM2-135M cheaply?

CPU, float32, plain PyTorch (the reference's math: build q_tilde, each Q column replaced by its
group's representative inside a block of ``block_m`` query rows, then run exact attention on it).

Representatives, for a group g of columns c with fused key K_g = sum_{c in g} k_c:
  mean        r_g = mean_c q_c (the current default).
  kw-all      least squares for the scores, r_g = sum_c w_c q_c with w_c = (k_c . K_g) / ||K_g||^2:
              needs only the head's D x D key Gram K^T K (all keys, causal mask ignored).
  kw-visible  the same weights from the Gram of the keys the block can see (causal prefix).
  kwc-*       the same with the centered Gram (keys minus their mean): least squares for the scores
              up to a constant per row, which is all softmax sees.

Groupings (all per block of query rows, 16 hyperplanes, seed 0):
  lsh         reference.group_columns: sort the columns by the sign code of their projections.
  random      a seeded random permutation (the floor LSH is measured against).
  pair-q      greedy matching on the Euclidean distance of the 16-dim projections (no signs).
  pair-qk     the same on the columns scaled by their key norms, q[:, c] * ||k_c||.
  pair-err    greedy matching on each pair's score error (projected ||q_a - q_b||^2 times a key
              factor from the centered Gram: ||k_a - k_b||^2 / 4 for mean, det / ||k_a + k_b||^2
              for kw), exact for one pair up to the projection.
G = 4 pairs the pairs (hierarchically) for the pair-* groupings. LSH on q[:, c] * ||k_c|| is not a
variant: angular LSH codes are invariant to scaling a column, so it is plain LSH (checked at run time).

Metrics: per-layer relative Frobenius error of the attention output vs exact (median and max over
the 30 layers, one 512-token pydoc window as benchmarks/accuracy.py), and the perplexity with every
layer approximated on held-out windows from the last 10% of the pydoc tokens.

    python notes/representative_study.py            # about 6.5 minutes on 2 cores
    python notes/representative_study.py --quick    # about 1.5 minutes: block 64, one window
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from distr_compile import DistrConfig, models, reference
from distr_compile.inputs import canonicalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import capture_sdpa  # noqa: E402

HYPERPLANES, SEED, WINDOW = 16, 0, 512
PAIR_COST = {"pair-q": "dist", "pair-qk": "dist", "pair-err": None}  # None: the representative's error


@dataclass(frozen=True)
class Variant:
    """One approximation: grouping and representative names (module docstring), rows, G."""

    grouping: str
    representative: str
    block_m: int
    group_size: int


# ---------------------------------------------------------------- key Gram and projections

def key_gram(k: torch.Tensor, hq: int, lq: int, block_m: int, causal: bool, visible: bool, centered: bool) -> torch.Tensor:
    """The key Gram K^T K per query head: (B, Hq, 1, D, D) over all keys, or with ``visible`` and a
    causal mask (B, Hq, nb, D, D) over the keys each query block's last row can see. ``centered``
    subtracts the keys' mean first (K^T K - n mu mu^T): a key component shared by all keys only
    shifts each score row by a constant, which softmax ignores."""
    k = k.float()
    if visible and causal:
        nb = math.ceil(lq / block_m)
        chunks = F.pad(k, (0, 0, 0, (-k.shape[2]) % block_m)).unflatten(2, (-1, block_m))
        last = torch.arange(nb).clamp(max=chunks.shape[2] - 1)
        gram = torch.einsum("bhnmd,bhnme->bhnde", chunks, chunks).cumsum(2)[:, :, last]
        total = chunks.sum(3).cumsum(2)[:, :, last]
        count = ((last + 1) * block_m).clamp(max=k.shape[2]).float()[:, None, None]
    else:
        gram = (k.transpose(-1, -2) @ k)[:, :, None]
        total, count = k.sum(2, keepdim=True), float(k.shape[2])
    if centered:
        gram = gram - total[..., :, None] * total[..., None, :] / count
    return gram.repeat_interleave(hq // k.shape[1], dim=1)


def projections(q: torch.Tensor, block_m: int) -> torch.Tensor:
    """Each block's columns projected on the LSH hyperplanes (those of reference.group_columns):
    (B, H, nb, R, D). Their signs are the LSH codes."""
    planes = reference.hyperplanes(HYPERPLANES, block_m, SEED, q.device)
    blocks = F.pad(q.float(), (0, 0, 0, (-q.shape[2]) % block_m)).unflatten(2, (-1, block_m))
    return torch.einsum("rm,bhnmd->bhnrd", planes, blocks)


# ---------------------------------------------------------------- representatives

def pair_weights(gram: torch.Tensor, representative: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (w_a, w_b) of a pair's representative for every pair of columns: (N, D, D) each."""
    a, b, c = gram.diagonal(0, -2, -1)[..., :, None], gram.diagonal(0, -2, -1)[..., None, :], gram
    if representative == "mean":
        half = torch.full_like(gram, 0.5)
        return half, half
    s = a + b + 2 * c + 1e-6 * (a + b)
    return (a + c) / s, (b + c) / s


def group_weights(perm: torch.Tensor, gram: torch.Tensor | None, group_size: int, representative: str) -> torch.Tensor:
    """Each column's weight in its group's representative: (B, H, nb, D). mean: 1/G; kw-*: the
    least-squares weights (k_c . K_g) / ||K_g||^2 from ``gram`` (a small ridge keeps them finite)."""
    if representative == "mean":
        return torch.full(perm.shape, 1.0 / group_size)
    gid = perm.argsort(-1) // group_size  # each column's group
    member = F.one_hot(gid, perm.shape[-1] // group_size).float()  # (B, H, nb, D, D/G)
    dot = (gram @ member).gather(-1, gid[..., None]).squeeze(-1)  # k_c . K_g
    norm2 = torch.einsum("...cg,...c->...g", member, dot)  # ||K_g||^2
    trace = torch.einsum("...cg,...c->...g", member, gram.diagonal(0, -2, -1).expand_as(dot))
    return dot / (norm2 + 1e-6 * trace).gather(-1, gid)


def q_tilde(q: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor, block_m: int, group_size: int) -> torch.Tensor:
    """q with every column replaced by its group's representative sum_c w_c q_c, per block."""
    D = q.shape[-1]
    block = torch.arange(q.shape[2]) // block_m
    index = perm.index_select(2, block)
    rows = (q * weights.index_select(2, block)).gather(-1, index)
    rep = rows.unflatten(-1, (D // group_size, group_size)).sum(-1)
    return torch.empty_like(q).scatter(-1, index, rep.repeat_interleave(group_size, dim=-1))


# ---------------------------------------------------------------- groupings

def greedy_pairs(cost: torch.Tensor) -> torch.Tensor:
    """Greedy minimum-cost perfect matching of D items, batched: cost (N, D, D) symmetric ->
    pairs (N, D/2, 2), cheapest pair first."""
    N, D, _ = cost.shape
    cost = cost.masked_fill(torch.eye(D, dtype=torch.bool), math.inf)
    rows, pairs = torch.arange(N), []
    for _ in range(D // 2):
        flat = cost.flatten(1).argmin(-1)
        a, b = flat // D, flat % D
        pairs.append(torch.stack([a, b], -1))
        for i in (a, b):
            cost[rows, i, :] = math.inf
            cost[rows, :, i] = math.inf
    return torch.stack(pairs, 1)


def pair_cost(proj: torch.Tensor, gram: torch.Tensor, kind: str) -> torch.Tensor:
    """Cost of pairing columns a and b: the projected ||q_a - q_b||^2, times (unless ``kind`` is
    "dist") the key factor that makes it the pair's score error under that representative."""
    dist = torch.cdist(proj.transpose(-1, -2), proj.transpose(-1, -2)) ** 2
    if kind == "dist":
        return dist
    a, b, c = gram.diagonal(0, -2, -1)[..., :, None], gram.diagonal(0, -2, -1)[..., None, :], gram
    if kind == "mean":
        return dist * (a + b - 2 * c) / 4
    return dist * (a * b - c * c) / (a + b + 2 * c + 1e-6 * (a + b))


def matched_perm(proj: torch.Tensor, gram: torch.Tensor, group_size: int, kind: str, representative: str) -> torch.Tensor:
    """Column order from greedy matching, pairs of pairs for G=4: (B, H, nb, D). A matched pair
    becomes one item: its representative's projection and the sum of its keys (Gram M^T G M)."""
    B, H, nb, R, D = proj.shape
    proj, gram = proj.flatten(0, 2), gram.expand(B, H, nb, D, D).flatten(0, 2)
    members = torch.arange(D)[:, None].expand(B * H * nb, D, 1)
    weight_kind = "mean" if representative == "mean" else "kw"
    while members.shape[-1] < group_size:
        pairs = greedy_pairs(pair_cost(proj, gram, kind or weight_kind))
        n, ia, ib = torch.arange(len(pairs))[:, None], pairs[..., 0], pairs[..., 1]
        w_a, w_b = (w[n, ia, ib][:, None] for w in pair_weights(gram, weight_kind))
        proj = w_a * proj.gather(-1, ia[:, None].expand(-1, R, -1)) + w_b * proj.gather(-1, ib[:, None].expand(-1, R, -1))
        merge = F.one_hot(ia, gram.shape[-1]).float() + F.one_hot(ib, gram.shape[-1]).float()  # (N, D'/2, D')
        gram = merge @ gram @ merge.transpose(-1, -2)
        members = torch.cat([members[n, ia], members[n, ib]], -1)
    return members.flatten(1).view(B, H, nb, D)


def column_order(q: torch.Tensor, k: torch.Tensor, gram: torch.Tensor | None, variant: Variant) -> torch.Tensor:
    """Per block, the column order whose consecutive runs of G are the groups: (B, H, nb, D)."""
    if variant.grouping in ("lsh", "random"):
        config = DistrConfig(group_size=variant.group_size, block_m=variant.block_m, grouping=variant.grouping)
        return reference.group_columns(q, config)
    if variant.grouping == "pair-qk":
        q = q * key_norms(k, q.shape[1])
    return matched_perm(projections(q, variant.block_m), gram, variant.group_size,
                        PAIR_COST[variant.grouping], variant.representative)


def key_norms(k: torch.Tensor, hq: int) -> torch.Tensor:
    """||k_c|| over all keys, per query head and column: (B, Hq, 1, D)."""
    return k.float().norm(dim=2, keepdim=True).repeat_interleave(hq // k.shape[1], dim=1)


def approximate_q(q: torch.Tensor, k: torch.Tensor, causal: bool, variant: Variant) -> torch.Tensor:
    """q_tilde of canonical q (B, Hq, L, D), k (B, Hkv, Lk, D) for one variant. The pair-*
    groupings use the centered all-keys Gram (pair-err's cost, and merging pairs for G=4)."""
    q = q.float()

    def gram(visible: bool, centered: bool) -> torch.Tensor:
        return key_gram(k, q.shape[1], q.shape[2], variant.block_m, causal, visible, centered)

    perm = column_order(q, k, gram(False, True) if variant.grouping.startswith("pair") else None, variant)
    if variant.representative == "mean":
        weights = group_weights(perm, None, variant.group_size, "mean")
    else:
        visible, centered = variant.representative.endswith("visible"), variant.representative.startswith("kwc")
        weights = group_weights(perm, gram(visible, centered), variant.group_size, "kw")
    return q_tilde(q, perm, weights, variant.block_m, variant.group_size)


# ---------------------------------------------------------------- metrics

def approximate_attention(call: tuple, variant: Variant | None) -> torch.Tensor:
    """One SDPA call (q, k, v, mask, causal, scale, gqa) in the caller's layout, exact attention on
    q_tilde (``variant`` None: on q itself)."""
    q, k, v, mask, causal, scale, gqa = call
    c = canonicalize(q, k, v, mask, 0.0, causal, scale, gqa, 1)
    cq = c.q if variant is None else approximate_q(c.q, c.k, causal, variant)
    out, _ = reference.attention(cq.to(c.k.dtype), c.k, c.v, c.attn_mask, causal, scale)
    return c.restore(out)


def layer_errors(calls: list, variant: Variant) -> list[float]:
    """Relative Frobenius error of each captured layer's attention output vs exact."""
    errors = []
    for call in calls:
        exact = approximate_attention(call, None)
        errors.append(((approximate_attention(call, variant) - exact).norm() / exact.norm()).item())
    return errors


@contextlib.contextmanager
def sdpa_replaced(variant: Variant | None):
    """Every F.scaled_dot_product_attention call runs ``variant`` (None: the reference's exact)."""
    original = F.scaled_dot_product_attention

    def replaced(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return approximate_attention((q, k, v, attn_mask, is_causal, scale, enable_gqa), variant)

    F.scaled_dot_product_attention = replaced
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def perplexity(model, windows: torch.Tensor, variant: Variant | None) -> float:
    """Perplexity over the held-out windows with every attention layer approximated."""
    with sdpa_replaced(variant):
        return models.perplexity(model, windows)


def lsh_ignores_key_norms(calls: list, block_m: int) -> float:
    """Fraction of (batch, head, block) groupings where LSH on q[:, c] * ||k_c|| equals LSH on q."""
    same = []
    for q, k, v, mask, causal, scale, gqa in calls:
        c = canonicalize(q, k, v, mask, 0.0, causal, scale, gqa, 1)
        config = DistrConfig(block_m=block_m)
        scaled = c.q * key_norms(c.k, c.q.shape[1])
        same.append((reference.group_columns(c.q, config) == reference.group_columns(scaled, config)).all(-1).float().mean())
    return torch.stack(same).mean().item()


# ---------------------------------------------------------------- study

G2 = [("lsh", "mean"), ("random", "mean"), ("lsh", "kw-all"), ("lsh", "kw-visible"), ("lsh", "kwc-all"),
      ("lsh", "kwc-visible"), ("pair-q", "mean"), ("pair-qk", "mean"), ("pair-qk", "kw-all"),
      ("pair-err", "mean"), ("pair-err", "kwc-all")]
BASELINE = ("lsh", "mean")


def measure(model, calls: list, windows: torch.Tensor, variant: Variant) -> dict:
    """One table row: the variant, its per-layer errors and its perplexity."""
    errors = layer_errors(calls, variant)
    row = {**vars(variant), "err median": statistics.median(errors), "err max": max(errors),
           "ppl": perplexity(model, windows, variant)}
    print(*(f"{v:.3f}" if isinstance(v, float) else v for v in row.values()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="block 64 only and one perplexity window")
    args = parser.parse_args()
    start = time.perf_counter()

    tokenizer, model = models.smollm2()
    ids = models.pydoc_token_ids(tokenizer)
    calls: list = []
    with torch.no_grad(), capture_sdpa(calls):
        model(input_ids=ids[None, 1000:1000 + WINDOW])
    held_out = ids[int(0.9 * len(ids)):]
    count = 1 if args.quick else 4
    windows = held_out[: count * WINDOW].view(count, WINDOW)
    blocks = (64,) if args.quick else (64, 32)

    print(f"LSH on q * ||k_c|| gives the same grouping as LSH on q in "
          f"{lsh_ignores_key_norms(calls, 64):.1%} of the blocks (angular LSH ignores column scale)")
    exact_ppl = perplexity(model, windows, None)
    print(f"exact attention perplexity: {exact_ppl:.3f} ({count} x {WINDOW} tokens)", flush=True)

    with torch.no_grad():
        rows = [measure(model, calls, windows, Variant(g, r, bm, 2)) for bm in blocks for g, r in G2]
        ranked = sorted((r for r in rows if (r["grouping"], r["representative"]) not in (BASELINE, ("random", "mean"))),
                        key=lambda r: r["ppl"])
        best = list(dict.fromkeys((r["grouping"], r["representative"]) for r in ranked))[:2]
        rows += [measure(model, calls, windows, Variant(g, r, bm, 4)) for bm in blocks for g, r in [BASELINE, *best]]

    rows.append({"grouping": "exact", "representative": "-", "block_m": "-", "group_size": 1,
                 "err median": 0.0, "err max": 0.0, "ppl": exact_ppl})
    print(f"\nSmolLM2-135M, CPU float32. err: per-layer relative Frobenius error of the attention output, "
          f"median/max over {len(calls)} layers (pydoc tokens 1000-1512); ppl: every layer approximated, "
          f"{count} x {WINDOW} held-out tokens (last 10% of pydoc). 16 hyperplanes, seed 0.\n")
    print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))
    print(f"\nruntime {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
