"""The attention pass over the zoo: what it finds, and that the rewrite keeps the meaning.

Inductor takes ~10 s per graph on a 2-core CPU, so these tests run the backend with the rewritten
graph executed by FX instead of compiled (``eager_backend``): they test the pass and the guard,
not Inductor. tests/test_backend.py compiles a few models with Inductor for real.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx

from distr_compile import DistrConfig
from distr_compile.passes import SITE_META, find_attention, rewrite_attention

from zoo import CASES, call, sdpa_as_distr

OP = torch.ops.distr.attention.default


def compiled_with(case, graphs_holder, **options):
    module = case.build()
    compiled = torch.compile(module, backend="distr", options=options)
    with torch.no_grad():
        out = call(compiled, case.inputs())
    return module, out


def op_nodes(graphs) -> list[fx.Node]:
    return [n for gm in graphs for n in gm.graph.nodes if n.target is OP]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zoo_finds_every_site(case):
    found, skipped = [], []

    def capture(gm, example_inputs):
        sites, left = find_attention(gm.graph)
        found.extend(sites)
        skipped.extend(left)
        return gm

    torch._dynamo.reset()
    call(torch.compile(case.build(), backend=capture), case.inputs())
    assert len(found) == case.sites, [s.name for s in found]
    assert len(skipped) == case.skipped, [(s.name, s.reason) for s in skipped]
    assert all(s.reason for s in skipped)
    assert len({s.name for s in found}) == len(found), "site names must be unique"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zoo_g1_rewrite_is_exact(case, eager_backend):
    """G = 1 through the op is exact attention: the rewritten model equals the eager model, and
    the left-alone sites stay as they were."""
    module, out = compiled_with(case, eager_backend, approximate="always", group_size=1)
    assert len(op_nodes(eager_backend)) == case.sites
    with torch.no_grad():
        expected = call(module, case.inputs())
    if case.name != "SdpaDropoutActive":  # random: compared by structure only (no op above)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.oracle], ids=lambda c: c.name)
def test_zoo_g2_matches_distr_attention(case, eager_backend):
    """G = 2: the compiled model equals the model run with ``distr_attention`` in place of its
    attention (the oracle), and differs from exact attention far more than from the oracle (the
    approximation is really in)."""
    config = DistrConfig(group_size=2, block_m=16)
    module, out = compiled_with(case, eager_backend, approximate="always", group_size=2, block_m=16)
    oracle = case.oracle(module)
    with torch.no_grad(), sdpa_as_distr(config):
        expected = call(oracle, case.inputs())
    with torch.no_grad():
        exact = call(module, case.inputs())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - exact).abs().max() > 10 * (out - expected).abs().max()


def test_hf_llama_gqa_reads_shared_heads(eager_backend):
    """HF's repeat_kv copies are gone: the op gets the 2 KV heads and enable_gqa."""
    case = next(c for c in CASES if c.name == "hf-llama-eager")
    compiled_with(case, eager_backend, approximate="always", group_size=1)
    for node in op_nodes(eager_backend):
        k = node.args[1].meta["example_value"]
        assert k.shape[1] == 2 and node.args[6] is True


def test_left_alone_sites_are_not_rewritten(eager_backend):
    case = next(c for c in CASES if c.name == "SdpaDropoutActive")
    compiled_with(case, eager_backend, approximate="always", group_size=2)
    assert op_nodes(eager_backend) == []
    sdpa = [n for gm in eager_backend for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(sdpa) == 1


def test_dropout_active_in_training_is_left_alone():
    case = next(c for c in CASES if c.name == "MaskedFillTrilDropoutEval")
    module = case.build().train()
    reasons = []

    def capture(gm, example_inputs):
        sites, skipped = find_attention(gm.graph)
        assert sites == []
        reasons.extend(s.reason for s in skipped)
        return gm

    torch._dynamo.reset()
    torch.compile(module, backend=capture)(case.inputs())
    assert len(reasons) == 1 and "dropout" in reasons[0]


def attention_graph(fn, *inputs, **kwargs) -> tuple[fx.GraphModule, list]:
    """Dynamo's graph of ``fn`` and its example inputs (in the graph's input order)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=False)(*inputs, **kwargs)
    (graph,) = graphs
    return graph


def test_rewrite_of_mask_terms_matches_original():
    """Additive mask, -inf fill and a constant scale applied after masking (which scales the
    mask): one combined mask, same result at G = 1."""
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    bias = torch.randn(10, 10)
    keep = torch.rand(10, 10) > 0.4
    keep |= torch.eye(10, dtype=torch.bool)

    def fn(q, k, v, bias, keep):
        s = (q @ k.transpose(-2, -1) + bias).masked_fill(~keep, float("-inf")) * 0.5
        return torch.softmax(s, -1) @ v

    gm, inputs = attention_graph(fn, q, k, v, bias, keep)
    expected = gm(*inputs)
    sites, skipped = find_attention(gm.graph)
    assert len(sites) == 1 and not skipped and sites[0].scale == 0.5
    (op,) = rewrite_attention(gm.graph, sites, {sites[0].name: DistrConfig(group_size=1)})
    gm.recompile()
    assert op.meta[SITE_META] == sites[0].name
    assert not any(n.target is torch.softmax for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs)[0], expected[0], rtol=1e-5, atol=1e-5)


def test_symbolic_scale_under_dynamic_shapes(eager_backend):
    """scale = 1/sqrt(k.size(-1)) is symbolic with dynamic=True: it is applied to q."""

    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)), dim=-1) @ v

    compiled = torch.compile(fn, backend="distr", dynamic=True, options={"approximate": "always", "group_size": 1})
    for length, d in ((8, 16), (13, 32)):
        q, k, v = (torch.randn(2, 2, length, d) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-4, atol=1e-5)
    assert len(op_nodes(eager_backend)) >= 1


def test_non_attention_matmul_softmax_is_ignored():
    def fn(x, w):
        return torch.softmax(x @ w, dim=0) @ w.t()

    gm, _ = attention_graph(fn, torch.randn(5, 4), torch.randn(4, 6))
    assert find_attention(gm.graph) == ([], [])


@pytest.mark.parametrize("op", ["mul", "div", "add"])
def test_score_op_writing_out_is_not_matched(op):
    """A scale or mask term with ``out=`` in the score chain writes a tensor the caller keeps:
    erasing it in a rewrite would lose that write, so the site is not matched."""
    bias = torch.zeros(8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))

    def fn(q, k, v, buf):
        s = q @ k.transpose(-1, -2)
        return torch.softmax(getattr(torch, op)(s, bias if op == "add" else 0.25, out=buf), -1) @ v

    q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
    assert sites_of(fn, q, k, v, torch.empty(1, 2, 8, 8)) == []


def sites_of(fn, *args, **kwargs) -> list:
    """The attention sites find_attention reports for ``fn(*args, **kwargs)``'s Dynamo graph."""
    gm, _ = attention_graph(fn, *args, **kwargs)
    return find_attention(gm.graph)[0]


def tiny_hf_llama():
    """A 2-layer random-init HF LlamaModel (sdpa attention) and a (2, 40) batch of token ids."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.LlamaModel(config).eval(), torch.randint(0, 97, (2, 40))


def test_hf_constant_causal_mask_becomes_is_causal():
    """Under torch.compile HF Llama passes SDPA a materialised (B, 1, L, L) causal mask: without a
    padding mask it is a graph constant, and the site takes is_causal instead (no L x L mask read,
    no masked tiles visited). With a padding mask the mask depends on an input and stays."""
    model, ids = tiny_hf_llama()
    folded = sites_of(model, input_ids=ids, use_cache=False)
    assert len(folded) == 2 and all(s.is_causal and s.attn_mask is None for s in folded)
    assert all("causal mask as is_causal" in s.pattern for s in folded)
    padded = sites_of(model, input_ids=ids, attention_mask=torch.ones(2, 40, dtype=torch.long), use_cache=False)
    assert len(padded) == 2 and all(not s.is_causal and s.attn_mask is not None for s in padded)


def attend_with_constant_mask(q, k, v, window=None):
    """SDPA with a mask built from aranges: causal, or causal within ``window`` positions."""
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    mask = j <= i if window is None else (j <= i) & (i - j < window)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("window", [None, 4])
def test_constant_mask_folds_only_when_exactly_causal(window):
    """A constant mask built from aranges folds when it is the causal pattern; a sliding window
    (causal AND within 4 positions) is constant too but not causal, and stays a mask."""

    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    (site,) = sites_of(attend_with_constant_mask, q, k, v, window=window)
    assert site.is_causal == (window is None) and (site.attn_mask is None) == (window is None)


def hf_style_mask(q, padding=None):
    """The (B, 1, Lq, Lk) bool mask transformers 5.17 builds for SDPA under torch.compile when the
    model has no causal pattern: ``ones & (q_idx >= 0) [& padding[b, kv]]``, expanded."""
    b, _, lq, _ = q.shape
    b_idx = torch.arange(b)[:, None, None, None]
    q_idx = torch.arange(lq)[None, None, :, None]
    kv_idx = torch.arange(lq)[None, None, None, :]
    mask = q_idx.new_ones((), dtype=torch.bool) & (q_idx >= 0).to(q.device)
    if padding is not None:
        mask = mask & padding[b_idx, kv_idx].to(mask.device)
    return mask.expand(b, -1, lq, lq)


def attend_with_hf_mask(q, k, v, padding=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=hf_style_mask(q, padding))


def test_constant_all_attend_mask_is_dropped():
    """A constant mask that masks nothing (HF ViT's, bool, or an additive one of zeros) is no mask."""
    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    (site,) = sites_of(attend_with_hf_mask, q, k, v)
    assert site.attn_mask is None and not site.is_causal and "all-attend" in site.pattern
    zeros = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=torch.zeros(q.shape[-2], q.shape[-2]))
    (site,) = sites_of(zeros, q, k, v)
    assert site.attn_mask is None and not site.is_causal


def test_padding_mask_reaches_sdpa_as_its_row():
    """HF's padding mask, broadcast to (B, 1, L, L) and combined with constant all-True terms, is
    read as the (B, 1, 1, L) row it came from; the function stays the same."""
    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :5] = False
    (site,) = sites_of(attend_with_hf_mask, q, k, v, padding)
    assert tuple(site.attn_mask.meta["example_value"].shape) == (2, 1, 1, 12) and not site.is_causal
    assert "read as (2, 1, 1, 12)" in site.pattern


def test_mask_terms_that_mask_something_stay():
    """``&`` with a term that is not constant all-True is kept: a per-query condition AND the
    padding row is a real (B, 1, L, L) mask."""

    def attend(q, k, v, padding, query_ok):
        mask = (padding[:, None, None, :] & query_ok[:, None, :, None]).expand(-1, 1, -1, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    (site,) = sites_of(attend, q, k, v, torch.rand(2, 12) > 0.2, torch.rand(2, 12) > 0.2)
    assert tuple(site.attn_mask.meta["example_value"].shape) == (2, 1, 12, 12)


def test_mask_term_written_after_the_and_is_not_read_instead(eager_backend):
    """``keep & all-True`` holds ``keep`` as it was at the ``&``: when ``keep`` is written in place
    afterwards, the mask is peeled down to the ``&`` and no further (not to ``keep``), and the
    compiled model equals the eager one."""

    def attend(q, k, v, keep):
        keep = keep.clone()
        mask = (keep & torch.ones((), dtype=torch.bool)).expand(2, 1, 12, 12)
        keep[:, :3] = False
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 2, 12, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    keep = torch.ones(12, 12, dtype=torch.bool)
    (site,) = sites_of(attend, q, k, v, keep)
    assert site.attn_mask.target is operator.and_
    torch.testing.assert_close(torch.compile(attend, backend="distr")(q, k, v, keep), attend(q, k, v, keep),
                               rtol=0, atol=0)


def test_mask_over_the_size_limit_stays_a_mask_and_is_logged(monkeypatch, caplog):
    """A constant causal mask larger than MAX_ELEMENTS is not evaluated: it stays a mask (still
    exact, just slower), and the log says why."""
    from distr_compile.passes import masks

    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    monkeypatch.setattr(masks, "MAX_ELEMENTS", 12 * 12 - 1)
    with caplog.at_level("INFO", logger="distr_compile"):
        (site,) = sites_of(attend_with_constant_mask, q, k, v)
    assert not site.is_causal and site.attn_mask is not None
    assert "is not evaluated" in caplog.text


def window_written_in_place(q):
    mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
    mask.triu_(-2)  # a sliding window: each query sees itself and 2 keys back
    return mask


def padding_set_in_place(q):
    mask = torch.zeros(q.shape[0], 1, 1, q.shape[-2])
    mask[1, ..., 5:] = float("-inf")  # additive: the second sequence's last keys are padding
    return mask


def filled_through_a_view(q):
    mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool)
    mask[:, 4:].fill_(False)
    return mask


def written_as_out(q):
    mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool)
    torch.tril(torch.ones_like(mask), out=mask)
    return mask


WRITTEN_MASKS = [window_written_in_place, padding_set_in_place, filled_through_a_view, written_as_out]


@pytest.mark.parametrize("make_mask", WRITTEN_MASKS, ids=lambda f: f.__name__)
def test_mask_written_in_place_is_not_a_constant(make_mask, eager_backend):
    """A mask built from constants but then written in place (directly, through a view, as
    ``out=``) is not the value its ancestors compute: it reaches SDPA as it is (not folded to
    is_causal, not dropped as all-attend), and the compiled model equals the eager one."""

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=make_mask(q))

    q, k, v = (torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    (site,) = sites_of(fn, q, k, v)
    assert site.attn_mask is not None and not site.is_causal and site.pattern == "sdpa"
    torch.testing.assert_close(torch.compile(fn, backend="distr")(q, k, v), fn(q, k, v), rtol=0, atol=0)


def causal_tril_in_place(q):
    return torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril_()


def causal_copied_elsewhere(q):
    mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
    torch.zeros_like(mask).copy_(mask)  # writes the copy, not the mask
    return mask


@pytest.mark.parametrize("make_mask", [causal_tril_in_place, causal_copied_elsewhere], ids=lambda f: f.__name__)
def test_constant_mask_with_in_place_ops_of_its_own_still_folds(make_mask):
    """Writes that are part of computing the mask (``tril_`` on a fresh tensor), or that go to
    another tensor, leave it a constant: the causal pattern still becomes is_causal."""

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=make_mask(q))

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    (site,) = sites_of(fn, q, k, v)
    assert site.is_causal and site.attn_mask is None


def explicit_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def sdpa_attention(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


CHAINS = {
    "sdpa-then-explicit": (sdpa_attention, explicit_attention),
    "explicit-then-sdpa": (explicit_attention, sdpa_attention),
    "three-deep": (explicit_attention, sdpa_attention, explicit_attention),
}


@pytest.mark.parametrize("chain", CHAINS, ids=str)
def test_chained_sites_rewrite_exactly(chain, eager_backend):
    """Attention of attention with no op in between: the output of one site is the query of the
    next, so the second site's query is a node the first rewrite replaces."""

    def fn(q, k, v):
        for attend in CHAINS[chain]:
            q = attend(q, k, v)
        return q

    q, k, v = (torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert len(sites_of(fn, q, k, v)) == len(CHAINS[chain])
    compiled = torch.compile(fn, backend="distr", options={"approximate": "always", "group_size": 1})
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)
    assert len(op_nodes(eager_backend)) == len(CHAINS[chain])


CAUSAL = torch.ones(8, 8, dtype=torch.bool).tril()
TENSOR_FILLS = {
    "where-tensor-inf": lambda s: torch.where(CAUSAL, s, torch.tensor(float("-inf"))),
    "masked_fill-full-inf": lambda s: s.masked_fill(~CAUSAL, torch.full((), float("-inf"))),
    "masked_fill-finfo-min-tensor": lambda s: s.masked_fill(~CAUSAL, torch.tensor(torch.finfo(s.dtype).min)),
    "where-finfo-min-tensor-first": lambda s: torch.where(~CAUSAL, torch.tensor(torch.finfo(s.dtype).min), s),
}


@pytest.mark.parametrize("fill", TENSOR_FILLS, ids=str)
def test_constant_tensor_fill_values_are_masks(fill, eager_backend):
    """A fill value given as a 0-dim constant tensor is the same mask as the Python number."""

    def fn(q, k, v):
        return torch.softmax(TENSOR_FILLS[fill](q @ k.transpose(-2, -1) * 0.25), dim=-1) @ v

    q, k, v = (torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    gm, _ = attention_graph(fn, q, k, v)
    sites, skipped = find_attention(gm.graph)
    assert len(sites) == 1 and skipped == []
    compiled = torch.compile(fn, backend="distr", options={"approximate": "always", "group_size": 1})
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)


def test_fill_value_from_an_input_is_left_alone():
    """A 0-dim fill tensor that is an input is not a constant: the site is left alone, with why."""

    def fn(q, k, v, fill):
        return torch.softmax(torch.where(CAUSAL, q @ k.transpose(-2, -1), fill), dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gm, _ = attention_graph(fn, q, k, v, torch.tensor(float("-inf")))
    sites, skipped = find_attention(gm.graph)
    assert sites == [] and len(skipped) == 1 and "not a constant" in skipped[0].reason
