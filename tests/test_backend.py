"""The ``distr`` backend end to end: entry point, options, Inductor, dynamic shapes, graph breaks,
CUDA-graph mode, recompiles, and (GPU) the Triton kernel inside a compiled HF Llama."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import UnsupportedOperatorException
import torch.nn as nn
import torch.nn.functional as F

import distr_compile
import distr_compile.backend as backend
from distr_compile import DistrConfig
from distr_compile.config import ConfigError
from distr_compile.passes import SITE_META

from test_passes import op_nodes, tiny_hf_llama
from zoo import CASES, NanoGPTCausalSelfAttention, call, sdpa_as_distr

FORCED_G2 = {"approximate": "always", "group_size": 2, "block_m": 16}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_entry_point_needs_no_import():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.softmax(x @ x.mT, -1) @ x, backend='distr')\n"
        "x = torch.randn(2, 5, 8)\n"
        "torch.testing.assert_close(f(x), torch.softmax(x @ x.mT, -1) @ x)\n"
        "print('imported' if 'distr_compile.backend' in sys.modules else 'missing')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("imported")
    assert "distr" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("options, message", [
    ({"group_sise": 2}, r"unknown DistrConfig option\(s\) \['group_sise'\].*group_size"),
    ({"group_size": 3}, r"group_size must be one of \[1, 2, 4, 8\], got 3"),
    ({"tolerance": -1}, "tolerance must be a non-negative number"),
    ({"plan": 1}, r"plan must be a path \(str\)"),
])
def test_bad_options_raise_a_config_error(options, message):
    """Options are the user's to fix: a ConfigError naming the problem, whatever the option."""
    f = torch.compile(lambda x: x + 1, backend="distr", options=options)
    with pytest.raises(Exception, match=message) as caught:
        f(torch.randn(3))
    assert isinstance(caught.value.inner_exception, ConfigError)


def test_no_attention_compiles_like_inductor():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        ours = torch.compile(mlp, backend="distr")(x)
        torch._dynamo.reset()
        theirs = torch.compile(mlp, backend="inductor")(x)
    assert torch.equal(ours, theirs)


def test_nanogpt_inductor_dynamic_matches_distr_attention():
    """Inductor compiles the rewritten graph, with dynamic shapes, for two sequence lengths."""
    torch.manual_seed(0)
    model = NanoGPTCausalSelfAttention().eval()
    oracle = NanoGPTCausalSelfAttention(flash=True).eval()
    oracle.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="distr", dynamic=True, options=FORCED_G2)
    for length in (9, 20):
        x = torch.randn(2, length, 64)
        with torch.no_grad(), sdpa_as_distr(DistrConfig(group_size=2, block_m=16)):
            expected = oracle(x)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    plan = distr_compile.plan_of(compiled)
    assert [d.group_size for d in plan.sites.values()] == [2]


def test_reduce_overhead_mode_and_monitor_warning():
    """mode='reduce-overhead' (as options["mode"], since torch.compile refuses mode with options)
    reaches Inductor (CUDA graphs; skipped on CPU); the runtime monitor is disabled there with a
    warning. torch.compile's own mode= works too."""
    torch.manual_seed(0)
    model = NanoGPTCausalSelfAttention().eval()
    x = torch.randn(2, 8, 64)
    compiled = torch.compile(model, backend="distr",
                             options={**FORCED_G2, "monitor_every": 1, "mode": "reduce-overhead"})
    with pytest.warns(UserWarning, match="monitor.*disabled under CUDA graphs"), torch.no_grad():
        out = compiled(x)
    assert out.shape == x.shape
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="distr", mode="reduce-overhead")(x), model(x))


def test_graph_break_sites_in_both_graphs(eager_backend):
    class TwoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = NanoGPTCausalSelfAttention(), NanoGPTCausalSelfAttention()

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(2, 8, 64)
    compiled = torch.compile(model, backend="distr", options={"approximate": "always", "group_size": 1})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(eager_backend) == 2 and len(op_nodes(eager_backend)) == 2
    assert sorted(distr_compile.plan_of(compiled).sites) == ["a", "b"]


def two_attentions_split_by_a_graph_break(q, k, v, q2, k2):
    a = F.scaled_dot_product_attention(q, k, v)
    torch._dynamo.graph_break()
    return a, F.scaled_dot_product_attention(q2, k2, v)


def split_attention_inputs(length: int) -> tuple[torch.Tensor, ...]:
    """q with paired columns, on which G=2 "fixed" is exact; the second site's q2 is not."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 2, length, 8, generator=g).repeat_interleave(2, dim=-1)
    return q, *torch.randn(4, 1, 2, length, 16, generator=g).unbind(0)


def test_sites_of_different_graphs_have_their_own_names_and_decisions(eager_backend, monkeypatch, tmp_path):
    """Both sites are root code, one each side of a graph break: the second graph's is
    ``<root>#1``, decided on its own (over the tolerance: exact). A recompile for a new length
    finds both under the same names (their decisions are reused), and a saved plan applies by
    them to another compile without calibrating."""
    fn, inputs = two_attentions_split_by_a_graph_break, split_attention_inputs(32)
    options = {"approximate": "guarded", "grouping": "fixed", "min_speedup": 0}
    compiled = torch.compile(fn, backend="distr", dynamic=False, options=options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs)[1], fn(*inputs)[1])
    plan = distr_compile.plan_of(compiled)
    assert {n: d.group_size for n, d in plan.sites.items()} == {"<root>": 2, "<root>#1": 1}

    monkeypatch.setattr(distr_compile.guard.decisions, "decide_sites", boom)
    with torch.no_grad():
        compiled(*split_attention_inputs(40))
    assert len(eager_backend) == 4, "the new length must recompile both graphs"
    assert distr_compile.plan_of(compiled).sites == plan.sites

    path = plan.save(str(tmp_path / "plan.json"))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend="distr", options={"plan": path})(*inputs)
    assert [n.meta[SITE_META] for n in op_nodes(eager_backend[4:])] == ["<root>"]


class SplitAttention(nn.Module):
    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(a, k, v)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SplitAttention()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def test_a_graph_break_inside_a_module_gives_its_sites_distinct_names(eager_backend):
    """Both sites are in one module, in two graphs; calibrate names them as the backend does, so
    its plans apply."""
    q, k, v = torch.randn(3, 1, 2, 24, 16).unbind(0)
    compiled = torch.compile(Outer(), backend="distr", options=FORCED_G2)
    with torch.no_grad():
        compiled(q, k, v)
    names = list(distr_compile.plan_of(compiled).sites)
    assert len(eager_backend) == 2 and len(set(names)) == 2, names
    assert list(distr_compile.calibrate(Outer(), [(q, k, v)]).sites) == names


def test_cpu_default_keeps_exact_attention(eager_backend):
    case = next(c for c in CASES if c.name == "hf-llama-eager")
    model = case.build()
    compiled = torch.compile(model, backend="distr")
    with torch.no_grad():
        torch.testing.assert_close(call(compiled, case.inputs()), call(model, case.inputs()))
    assert op_nodes(eager_backend) == []
    plan = distr_compile.plan_of(compiled)
    assert len(plan.sites) == 2 and all("CPU" in d.reason and not d.approximated for d in plan.sites.values())


def test_exact_sdpa_sites_take_is_causal_for_a_constant_causal_mask(eager_backend):
    """Sites that stay exact keep SDPA, but HF's materialised causal mask (use_cache=False under
    torch.compile) becomes is_causal there too, so Inductor can pick a fused causal kernel: same
    outputs, no mask argument left."""
    model, ids = tiny_hf_llama()
    compiled = torch.compile(model, backend="distr")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).last_hidden_state,
                                   model(input_ids=ids, use_cache=False).last_hidden_state)
    sdpa = [n for gm in eager_backend for n in gm.graph.nodes
            if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 2 and op_nodes(eager_backend) == []
    assert all(n.kwargs["is_causal"] is True and n.kwargs["attn_mask"] is None for n in sdpa)


def hf_materialised_masks(monkeypatch):
    """Make transformers build the (B, 1, L, L) SDPA mask of a model without padding under
    torch.compile, as transformers 5.17 did (later versions skip it: then there is nothing to do)."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *args, **kwargs: False)


@pytest.mark.parametrize("name, padded", [("vit", False), ("bert", True), ("bert", False), ("llama", False)])
def test_exact_sdpa_sites_get_no_square_mask(eager_backend, monkeypatch, name, padded):
    """The exact sites of HF ViT, BERT (with and without a padding mask) and Llama reach Inductor as
    SDPA calls without an (L, L) mask: none (an all-attend mask), ``is_causal`` (Llama's constant
    causal mask) or the (B, 1, 1, L) padding row, made additive once for every layer (cuDNN takes
    no bool mask); a square mask rules out flash and cuDNN on CUDA (Inductor runs the unfused math
    path there). Outputs equal the uncompiled model's. (A padded decoder's mask, causal AND
    padding, is square by nature and stays.)"""
    from test_hf import MODELS, output

    hf_materialised_masks(monkeypatch)
    build, inputs = MODELS[name]
    model, batch = build(), inputs()
    if not padded:
        batch.pop("attention_mask", None)
    compiled = torch.compile(model, backend="distr")
    with torch.no_grad():
        torch.testing.assert_close(output(compiled, batch), output(model, batch), atol=1e-5, rtol=1e-5)
    sdpa = [n for gm in eager_backend for n in gm.graph.nodes
            if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == model.config.num_hidden_layers and op_nodes(eager_backend) == []
    masks = [n.kwargs["attn_mask"] for n in sdpa]
    assert all(m is None or m.meta["example_value"].shape[-2] == 1 for m in masks), masks
    assert all(m is None or m.meta["example_value"].dtype == torch.float32 for m in masks), masks
    assert len({m for m in masks if m is not None}) == (name == "bert" and padded)
    assert all(n.kwargs["is_causal"] for n in sdpa) == (name == "llama" and not padded)


def test_recompile_reuses_decisions(eager_backend, monkeypatch):
    """A new sequence length recompiles the graph; the calibrated decisions are reused."""
    calls = []
    real = distr_compile.guard.decisions.decide_sites
    monkeypatch.setattr(distr_compile.guard.decisions, "decide_sites", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = NanoGPTCausalSelfAttention().eval()
    compiled = torch.compile(model, backend="distr", dynamic=False,
                             options={"approximate": "guarded", "tolerance": 10.0, "block_m": 16, "min_speedup": 0})
    with torch.no_grad():
        compiled(torch.randn(2, 8, 64))
        compiled(torch.randn(2, 12, 64))
    assert len(eager_backend) == 2, "the second length must recompile"
    assert len(calls) == 1
    assert len(op_nodes(eager_backend)) == 2


GUARDED_LOOSE = {"approximate": "guarded", "tolerance": 10.0, "block_m": 16, "min_speedup": 0}
REUSED = "fitted to the parameters this graph was compiled with"


def compiled_separately(other, compiled):
    return torch.compile(other, backend="distr", options=GUARDED_LOOSE)


def called_with_its_weights(other, compiled):
    return lambda x: torch.func.functional_call(compiled, dict(other.named_parameters()), (x,))


def calibrated_and_other(run_other, options=GUARDED_LOOSE):
    """A model compiled with a site the guard approximates (calibrated on its weights), its
    approximated output on ``x``, and a second model of the same class run through the same graph
    (``run_other``), which Dynamo reuses without calling the backend: it compares backends by value."""
    torch.manual_seed(0)
    first, other = NanoGPTCausalSelfAttention().eval(), NanoGPTCausalSelfAttention().eval()
    compiled = torch.compile(first, backend="distr", options=options)
    x = torch.randn(2, 8, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{REUSED}")
        approximated = compiled(x)
    assert (approximated - first(x)).norm() > 1e-2 * first(x).norm(), "the site must be approximated"
    return compiled, approximated, run_other(other, compiled), other, x


@pytest.mark.parametrize("run_other", [compiled_separately, called_with_its_weights], ids=lambda f: f.__name__)
def test_a_calibrated_graph_runs_exact_attention_for_other_parameters(eager_backend, run_other):
    """A second model of the same class compiled with equal options, or the first one's compiled
    module called with the second's weights, runs the graph calibrated on the first model's
    weights. The approximation was never measured on the second's: it runs exact attention (a graph
    compiled once, on its first call), with a warning once. The first model keeps its approximated
    output, without a warning, and its decision."""
    compiled, approximated, run, other, x = calibrated_and_other(run_other)
    with torch.no_grad(), pytest.warns(UserWarning, match=f"{REUSED}.*run exact attention at <root>") as caught:
        torch.testing.assert_close(run(x), other(x))
        torch.testing.assert_close(run(2 * x), other(2 * x))
    assert len([w for w in caught if REUSED in str(w.message)]) == 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{REUSED}")
        torch.testing.assert_close(compiled(x), approximated, atol=0, rtol=0)
    (decision,) = distr_compile.plan_of(compiled).sites.values()
    assert (decision.group_size, decision.source) == (2, "calibrated")
    assert [len(op_nodes([gm])) for gm in eager_backend] == [1, 0], "the exact graph is compiled once"


def test_the_monitor_watches_only_the_parameters_its_decisions_are_for(eager_backend, monkeypatch):
    """The runtime monitor rechecks the first model's approximation on the first model's calls; the
    other model's calls run the exact graph and are not its to check."""
    checks = []
    monkeypatch.setattr(backend, "run_probe", lambda probe, args: checks.append(probe))
    compiled, _, run, other, x = calibrated_and_other(called_with_its_weights, {**GUARDED_LOOSE, "monitor_every": 1})
    with torch.no_grad():
        with pytest.warns(UserWarning, match=REUSED):
            torch.testing.assert_close(run(x), other(x))
        assert len(checks) == 1, "the other model's call is not checked"
        compiled(x)
    assert len(checks) == 2, "the first model's calls are"


def test_the_exact_graph_is_compiled_with_the_same_inductor_settings(monkeypatch):
    """Under mode="reduce-overhead" the exact graph for other parameters gets CUDA graphs too: the
    same Inductor settings as the graph of the first parameters."""
    patches = []
    monkeypatch.setattr(backend, "compile_fx", lambda gm, inputs, config_patches: patches.append(config_patches) or gm)
    _, _, run, other, x = calibrated_and_other(called_with_its_weights, {**GUARDED_LOOSE, "mode": "reduce-overhead"})
    with torch.no_grad(), pytest.warns(UserWarning, match=REUSED):
        torch.testing.assert_close(run(x), other(x))
    assert len(patches) == 2 and patches[1] == patches[0] and patches[0]["triton.cudagraphs"]


def test_a_failed_exact_compile_runs_the_graph_as_it_came(eager_backend, monkeypatch):
    """Compiling the exact graph is the backend's own work: should it fail, the other model's calls
    run the graph as it came (compiled with Inductor; exact too), with a warning that it is a bug,
    never the approximation."""
    _, _, run, other, x = calibrated_and_other(compiled_separately)
    monkeypatch.setattr(backend, "use_simpler_masks", boom)
    with torch.no_grad(), pytest.warns(UserWarning, match="mask rewrite failed.*This is a bug in distr-compile"):
        torch.testing.assert_close(run(x), other(x))
    assert len(eager_backend) == 2 and op_nodes(eager_backend[1:]) == []


def test_training_backward_through_the_op(eager_backend):
    torch.manual_seed(0)
    model = NanoGPTCausalSelfAttention().eval()
    compiled = torch.compile(model, backend="distr", options=FORCED_G2)
    compiled(torch.randn(2, 8, 64)).square().sum().backward()
    assert model.c_attn.weight.grad is not None and model.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_hf_llama_bf16_runs_the_triton_kernel_and_matches_eager_distr():
    """HF Llama (GQA, causal), bf16 on CUDA, approximation forced: every attention is the Triton
    kernel in Inductor's code, and the output matches the eager model with distr_attention."""
    import transformers as tf
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    cfg = dict(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = tf.LlamaModel(tf.LlamaConfig(attn_implementation="eager", **cfg)).cuda().bfloat16().eval()
    oracle = tf.LlamaModel(tf.LlamaConfig(attn_implementation="sdpa", **cfg)).cuda().bfloat16().eval()
    oracle.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    options = {"approximate": "always", "group_size": 2}
    compiled = torch.compile(model, backend="distr", options=options)
    with torch.no_grad():
        out, code = run_and_get_code(lambda: compiled(input_ids=ids).last_hidden_state)
        with sdpa_as_distr(DistrConfig(group_size=2)):
            expected = oracle(input_ids=ids).last_hidden_state
        exact = model(input_ids=ids).last_hidden_state
    launches = sum(src.count("_distr_fwd_kernel") for src in code)
    assert launches >= cfg["num_hidden_layers"], f"{launches} kernel references in Inductor's code"
    err = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    # Measured 0.025 on an H200 (torch 2.11): the grouping is a discontinuous function of q, so
    # bf16 differences between Inductor's fused ops and eager flip a few LSH sign bits per layer;
    # both stay far closer to each other than to exact attention (checked below).
    assert err(out, expected) < 5e-2, err(out, expected)
    assert err(out, exact) > err(out, expected)


@pytest.mark.slow
def test_inductor_cache_sees_a_changed_op_implementation(monkeypatch):
    """Inductor's caches key a graph calling distr::attention on the op name and Triton kernels,
    not on the op's PyTorch code. Once the PyTorch code changes (here: the LSH seed key, so the
    grouping), a recompile must run the new code, not a graph cached from the old one: the
    backend's SourceKey (a hash of the package source) is part of the key."""
    from distr_compile import reference

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    options = {"approximate": "always", "group_size": 2, "block_m": 16}
    torch._dynamo.reset()
    with torch.no_grad():
        before = torch.compile(fn, backend="distr", options=options)(q, k, v)
        monkeypatch.setattr(reference, "seed_key", lambda seed: 12345)  # a new version of the op's code
        monkeypatch.setattr(backend.SourceKey, "uuid", lambda self: b"the new version's source")
        torch._dynamo.reset()
        after = torch.compile(fn, backend="distr", options=options)(q, k, v)
        expected = distr_compile.distr_attention(q, k, v, is_causal=True, config=DistrConfig(block_m=16))
    assert not torch.allclose(before, expected, atol=1e-4)  # the change matters
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- fault isolation


def boom(*args, **kwargs):
    raise RuntimeError("injected fault")


def fail_on_second_site(monkeypatch):
    """The rewrite raises at the second site, after the first one was rewritten."""
    from distr_compile.passes import rewrite

    emitted = []
    emit = rewrite._emit_op
    monkeypatch.setattr(rewrite, "_emit_op", lambda *a: boom() if emitted else emitted.append(1) or emit(*a))


def fail_kernel_launch(monkeypatch):
    from distr_compile import ops

    monkeypatch.setattr(ops, "uses_kernel", lambda q, v, config: True)
    monkeypatch.setattr(ops, "distr_forward", boom)


def fail_on_the_op(monkeypatch, eager_backend):
    """Inductor fails on a graph with the op (as if its lowering broke), not on the original."""
    run_graph = backend.compile_fx
    monkeypatch.setattr(backend, "compile_fx", lambda gm, *a, **k: boom() if op_nodes([gm]) else run_graph(gm, *a, **k))


GUARDED = {"approximate": "guarded", "tolerance": 10.0, "block_m": 16, "min_speedup": 0}  # accuracy only
FAULTS = {  # stage: (how to inject the fault, options)
    "matching": (lambda mp, _: mp.setattr(backend, "find_attention", boom), FORCED_G2),
    "mask rewrite": (lambda mp, _: mp.setattr(backend, "use_simpler_masks", boom), {}),
    "calibration": (lambda mp, _: mp.setattr(distr_compile.guard.probe, "run_probe", boom), GUARDED),
    "calibration kernel launch": (lambda mp, _: fail_kernel_launch(mp), GUARDED),
    "rewrite": (lambda mp, _: fail_on_second_site(mp), FORCED_G2),
    "Inductor on the rewritten graph": (fail_on_the_op, FORCED_G2),
}


def two_causal_attentions(x):
    """Chained SDPA calls with a constant causal mask: two sites, the causal-mask rewrite applies."""
    t = x.shape[-2]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for _ in range(2):
        x = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask)
    return x


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_a_fault_in_any_stage_compiles_the_graph_unchanged(fault, eager_backend, monkeypatch):
    inject, options = FAULTS[fault]
    inject(monkeypatch, eager_backend)
    stage = fault.removesuffix(" kernel launch")
    x = torch.randn(2, 4, 24, 32)
    compiled = torch.compile(two_causal_attentions, backend="distr", options=options)
    with pytest.warns(UserWarning, match=f"{stage} failed \\(RuntimeError: injected fault\\)"):
        out = compiled(x)
    assert torch.equal(out, two_causal_attentions(x))
    assert op_nodes(eager_backend) == []
    plan = distr_compile.plan_of(compiled)
    assert plan.sites == {} and {s.fault for s in plan.skipped.values()} == {stage}
    assert f"the backend failed on their graph ({stage})" in distr_compile.report(compiled)


@pytest.mark.parametrize("stage", ["calibration", "Inductor on the rewritten graph"])
def test_an_eager_fallback_signal_compiles_the_original_graph(stage, eager_backend, monkeypatch):
    """A fake-tensor error that Dynamo answers by running the graph eagerly (no compile at all),
    raised by our work or by Inductor on the rewritten graph, is a fault like any other: the graph
    is compiled as it came, never left to eager."""
    def unsupported(*args, **kwargs):
        raise UnsupportedOperatorException(torch.ops.aten.add.Tensor)

    if stage == "calibration":
        monkeypatch.setattr(distr_compile.guard.probe, "run_probe", unsupported)
    else:
        run_graph = backend.compile_fx
        monkeypatch.setattr(backend, "compile_fx", lambda gm, *a, **k: unsupported() if op_nodes([gm]) else
                            run_graph(gm, *a, **k))
    x = torch.randn(2, 4, 24, 32)
    compiled = torch.compile(two_causal_attentions, backend="distr", options=GUARDED if stage == "calibration" else FORCED_G2)
    with pytest.warns(UserWarning, match=f"{stage} failed \\(UnsupportedOperatorException"):
        out = compiled(x)
    assert torch.equal(out, two_causal_attentions(x))
    assert len(eager_backend) == 1 and op_nodes(eager_backend) == []  # compiled, unchanged


def test_a_fault_never_fails_the_compile_with_inductor(monkeypatch):
    """Real Inductor: calibration fails, the model still compiles and computes what eager does."""
    monkeypatch.setattr(distr_compile.guard.probe, "run_probe", boom)
    torch.manual_seed(0)
    model = NanoGPTCausalSelfAttention().eval()
    x = torch.randn(2, 8, 64)
    compiled = torch.compile(model, backend="distr", options=GUARDED)
    with torch.no_grad(), pytest.warns(UserWarning, match="calibration failed"):
        torch.testing.assert_close(compiled(x), model(x))


def test_stage_times_are_logged(eager_backend, monkeypatch, caplog):
    """Every stage logs its wall time at INFO, each under its own name: a calibration made 0.3 s
    slower shows in the calibration record only, and the stages in their order."""
    decide_graph = backend.decide_graph

    def slow_decide_graph(*args, **kwargs):
        time.sleep(0.3)
        return decide_graph(*args, **kwargs)

    monkeypatch.setattr(backend, "decide_graph", slow_decide_graph)
    compiled = torch.compile(two_causal_attentions, backend="distr", options=GUARDED)
    with caplog.at_level(logging.INFO, logger="distr_compile"):
        compiled(torch.randn(2, 4, 24, 32))
    times = [(r.distr_stage, r.seconds) for r in caplog.records if hasattr(r, "distr_stage")]
    assert [stage for stage, _ in times] == ["matching", "calibration", "mask rewrite", "rewrite", backend.INDUCTOR]
    seconds = dict(times)
    assert seconds["calibration"] >= 0.3
    assert all(0 <= t < 0.3 for stage, t in times if stage != "calibration"), times
    assert "distr: calibration took" in caplog.text


def test_a_fault_in_the_runtime_monitor_turns_it_off(eager_backend, monkeypatch):
    monkeypatch.setattr(backend, "run_probe", boom)
    torch.manual_seed(0)
    model = NanoGPTCausalSelfAttention().eval()
    compiled = torch.compile(model, backend="distr", options={**FORCED_G2, "monitor_every": 1})
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="runtime monitor failed"):
            first = compiled(x)  # call 1: the check fails; the call still returns
        second = compiled(x)  # the monitor is off: no second warning, same graph
    assert torch.equal(first, second) and len(eager_backend) == 1


def test_runtime_monitor_with_inductor_checks_and_demotes():
    """Real Inductor (whose callable Dynamo calls with positional arguments): the calls between
    checks run the compiled graph; a check that finds the site over the tolerance recompiles it
    exact, and from then on the model computes SDPA, at every length of the dynamic graph (the
    recompile is for the graph's shapes, not the call's)."""
    def attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(3, 1, 2, 32, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    for x in (q, k, v):
        torch._dynamo.mark_dynamic(x, 2)  # the length (a dynamic head dim would keep the site exact)
    compiled = torch.compile(attention, backend="distr", options={**FORCED_G2, "monitor_every": 2, "tolerance": 0.0})
    with torch.no_grad():
        approximated = compiled(q, k, v)  # call 1: no check due
        exact = compiled(q, k, v)  # call 2: the check demotes the site
        torch.testing.assert_close(compiled(q, k, v), exact)
        longer = torch.randn(3, 1, 2, 48, 16, generator=torch.Generator().manual_seed(1)).unbind(0)
        torch.testing.assert_close(compiled(*longer), attention(*longer))
    assert not torch.allclose(approximated, attention(q, k, v), atol=1e-3)
    torch.testing.assert_close(exact, attention(q, k, v))
    (decision,) = distr_compile.plan_of(compiled).sites.values()
    assert decision.source == "monitor" and not decision.approximated
