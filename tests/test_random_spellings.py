"""Randomised attention spellings: the matcher finds every composed site, and the rewrite at G=1
computes what the spelled-out function does.

Each seeded case is a chain of 1-3 attentions (the output of one is the query of the next, no op
in between), each drawn from the spellings the matcher supports: SDPA with no, a bool, an additive
or a causal mask; or softmax(q k^T) v with the scale as a multiply, a divide, a pre-scaled q or a
0-dim tensor, k^T by transpose, permute, ``.mT`` or einsum, a mask added or filled in (masked_fill
or where, with -inf, finfo.min or a constant 0-dim tensor) before or after the scale, the softmax
with or without float casts, GQA copies of K/V (repeat_interleave or Hugging Face's
expand/reshape) and inactive dropout, with arguments given by position or by keyword. The passes
run on Dynamo's graph directly (no Inductor).

G=1 through the op is exact attention computed by the reference: scores, max and sum in float32,
in another order than the spelled-out ops. It agrees with them to float32 rounding (~1e-7
relative), not bitwise, hence the tight tolerance; a wrong scale, mask or transposition errs by
1e-2 or more.
"""

from __future__ import annotations

import random
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from distr_compile import DistrConfig
from distr_compile.passes import find_attention, rewrite_attention

from test_passes import attention_graph, op_nodes

B, HEADS, KV_HEADS, L, D = 2, 4, 2, 8, 16
SCALE = 0.3
CASES = 40

Attend = Callable[..., torch.Tensor]  # (q, k, v, k_shared, v_shared, keep, bias) -> output


def sdpa_site(rng: random.Random) -> Attend:
    mask = rng.choice(["none", "bool", "additive", "causal"])
    scale = rng.choice([None, SCALE])
    gqa = rng.random() < 0.5

    def attend(q, k, v, k_shared, v_shared, keep, bias):
        if gqa:
            k, v = k_shared, v_shared
        attn_mask = {"bool": keep, "additive": bias}.get(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=mask == "causal", scale=scale,
                                              enable_gqa=gqa)
    return attend


def scores(q, k, spelling: str) -> torch.Tensor:
    if spelling == "einsum":
        return torch.einsum("bhqd,bhkd->bhqk", q, k)
    k_t = {"transpose": lambda: k.transpose(-2, -1), "transpose23": lambda: k.transpose(2, 3),
           "permute": lambda: k.permute(0, 1, 3, 2), "mT": lambda: k.mT}[spelling]()
    return q @ k_t


def masked(s: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor, spelling: str) -> torch.Tensor:
    inf = float("-inf")
    return {
        "none": lambda: s,
        "additive": lambda: s + bias,
        "add-kwargs": lambda: torch.add(input=s, other=bias),
        "masked_fill-inf": lambda: s.masked_fill(~keep, inf),
        "masked_fill-kwargs": lambda: s.masked_fill(mask=~keep, value=inf),
        "torch.masked_fill-kwargs": lambda: torch.masked_fill(input=s, mask=~keep, value=inf),
        "where-inf": lambda: torch.where(keep, s, inf),
        "where-inf-first": lambda: torch.where(~keep, inf, s),
        "where-kwargs": lambda: torch.where(condition=keep, input=s, other=inf),
        "where-tensor-inf": lambda: torch.where(keep, s, torch.tensor(inf)),
        "masked_fill-full-inf": lambda: s.masked_fill(~keep, torch.full((), inf)),
        "masked_fill-finfo-min": lambda: s.masked_fill(~keep, torch.finfo(s.dtype).min),
        "masked_fill-finfo-min-tensor": lambda: s.masked_fill(~keep, torch.tensor(torch.finfo(s.dtype).min)),
    }[spelling]()


def scaled(s: torch.Tensor, spelling: str) -> torch.Tensor:
    return {"mul": lambda: s * SCALE, "div": lambda: s / (1 / SCALE), "tensor": lambda: s * torch.tensor(SCALE),
            "mul-kwargs": lambda: torch.mul(input=s, other=SCALE), "prescale": lambda: s, "none": lambda: s}[spelling]()


def repeated(x: torch.Tensor, spelling: str) -> torch.Tensor:
    """K/V heads copied for GQA."""
    n = HEADS // KV_HEADS
    if spelling == "repeat_interleave":
        return x.repeat_interleave(n, dim=1)
    if spelling == "repeat_interleave-kwargs":
        return torch.repeat_interleave(input=x, repeats=n, dim=1)
    b, h, t, d = x.shape
    if spelling == "expand-reshape-kwargs":
        return torch.reshape(input=x.unsqueeze(dim=2).expand(b, h, n, t, d), shape=(b, h * n, t, d))
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


SPELLINGS = {
    "k_t": ["transpose", "transpose23", "permute", "mT", "einsum"],
    "scale": ["mul", "div", "tensor", "mul-kwargs", "prescale", "none"],
    "mask": ["none", "additive", "add-kwargs", "masked_fill-inf", "masked_fill-kwargs", "torch.masked_fill-kwargs",
             "where-inf", "where-inf-first", "where-kwargs", "where-tensor-inf", "masked_fill-full-inf",
             "masked_fill-finfo-min", "masked_fill-finfo-min-tensor"],
    "softmax": ["F", "torch", "method", "float-cast", "dtype-arg", "F-kwargs", "float-cast-kwargs"],
    "gqa": ["none", "repeat_interleave", "repeat_interleave-kwargs", "expand-reshape", "expand-reshape-kwargs"],
    "dropout": ["none", "p=0", "eval", "F-kwargs", "torch-kwargs"],
}


def explicit_site(rng: random.Random, **fixed: str) -> Attend:
    """A softmax(q k^T) v site of random spellings, except those ``fixed`` names (by SPELLINGS key)."""
    k_t, scale, mask, softmax, gqa, dropout = (fixed.get(part) or rng.choice(options)
                                               for part, options in SPELLINGS.items())
    # a positive constant scale scales the mask too
    mask_first = scale in ("mul", "div", "mul-kwargs") and rng.random() < 0.5

    def attend(q, k, v, k_shared, v_shared, keep, bias):
        if gqa != "none":
            k, v = repeated(k_shared, gqa), repeated(v_shared, gqa)
        if scale == "prescale":
            q = q * SCALE
        s = scores(q, k, k_t)
        s = scaled(masked(s, keep, bias, mask), scale) if mask_first else masked(scaled(s, scale), keep, bias, mask)
        p = {"F": lambda: F.softmax(s, dim=-1), "torch": lambda: torch.softmax(s, -1), "method": lambda: s.softmax(-1),
             "float-cast": lambda: F.softmax(s.float(), dim=-1).type_as(q),
             "dtype-arg": lambda: F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype),
             "F-kwargs": lambda: F.softmax(input=s, dim=-1),
             "float-cast-kwargs": lambda: F.softmax(s.float(), dim=-1).type_as(other=q)}[softmax]()
        p = {"none": lambda: p, "p=0": lambda: F.dropout(p, 0.0), "eval": lambda: F.dropout(p, 0.5, training=False),
             "F-kwargs": lambda: F.dropout(input=p, p=0.0),
             "torch-kwargs": lambda: torch.dropout(input=p, p=0.5, train=False)}[dropout]()
        return torch.einsum("bhqk,bhkd->bhqd", p, v) if k_t == "einsum" else p @ v
    return attend


def chain(seed: int) -> tuple[Attend, int]:
    """A seeded chain of attentions and its length."""
    rng = random.Random(seed)
    sites = [(sdpa_site if rng.random() < 0.3 else explicit_site)(rng) for _ in range(rng.choice([1, 1, 2, 3]))]

    def fn(q, k, v, k_shared, v_shared, keep, bias):
        for attend in sites:
            q = attend(q, k, v, k_shared, v_shared, keep, bias)
        return q
    return fn, len(sites)


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, L, D, generator=g) for _ in range(3))
    k_shared, v_shared = (torch.randn(B, KV_HEADS, L, D, generator=g) for _ in range(2))
    keep = (torch.rand(L, L, generator=g) > 0.3) | torch.eye(L, dtype=torch.bool)
    return q, k, v, k_shared, v_shared, keep, torch.randn(L, L, generator=g)


@pytest.mark.parametrize("seed", range(CASES))
def test_random_spelling_is_found_and_rewritten_exactly(seed):
    assert_found_and_rewritten_exactly(*chain(seed))


KEYWORD_SPELLINGS = [(part, spelling) for part, options in SPELLINGS.items() for spelling in options
                     if spelling.endswith("kwargs")]


@pytest.mark.parametrize("part, spelling", KEYWORD_SPELLINGS)
def test_keyword_spelling_is_found_and_rewritten_exactly(part, spelling):
    """Every spelling with arguments by keyword (``masked_fill(mask=..., value=...)``), in a site
    otherwise drawn at random: it reads as its positional twin."""
    assert_found_and_rewritten_exactly(explicit_site(random.Random(0), **{part: spelling}), 1)


def assert_found_and_rewritten_exactly(fn: Callable, length: int) -> None:
    """The matcher finds ``length`` sites in ``fn`` and skips none; at G=1 the rewrite computes what
    ``fn`` does."""
    gm, example_inputs = attention_graph(fn, *inputs())
    expected = fn(*inputs())
    sites, skipped = find_attention(gm.graph)
    assert (len(sites), skipped) == (length, [])
    rewrite_attention(gm.graph, sites, {s.name: DistrConfig(group_size=1) for s in sites})
    gm.recompile()
    assert len(op_nodes([gm])) == length
    (out,) = gm(*example_inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
