"""Static per-head projections: fitting (shapes, GQA, exactness where the data allows it, masks) and
attention on the mapped q, k against SDPA and a float64 hand-written reference."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from distr_compile.projection import METHODS, fit_projection, project, projected_attention

B, HQ, HKV, L, D = 2, 6, 2, 48, 16


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def low_rank(heads: int, expand: int, rank: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    """(B, heads * expand, L, D) rows in a rank-``rank`` subspace per group of ``expand`` heads."""
    basis = randn(heads, D, rank, dtype=dtype, seed=seed + 1).repeat_interleave(expand, dim=0)
    return randn(B, heads * expand, L, rank, dtype=dtype, seed=seed) @ basis.transpose(-1, -2)


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


def rel_err(x, y):
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_shapes_and_gqa(method, group_size, shared):
    q, k, v = randn(B, HQ, L, D), randn(B, HKV, L, D, seed=1), randn(B, HKV, L, 24, seed=2)
    a, b = fit_projection(q, k, group_size, method=method, shared_query_map=shared, is_causal=True, steps=3)
    assert a.shape == (HQ, D, D // group_size) and b.shape == (HKV, D, D // group_size)
    assert a.dtype == b.dtype == torch.float32
    qp, kp = project(q, k, a, b)
    assert qp.shape == (B, HQ, L, D // group_size) and kp.shape == (B, HKV, L, D // group_size)
    assert projected_attention(q, k, v, a, b, is_causal=True).shape == (B, HQ, L, 24)
    if shared:  # one query map per KV head
        groups = a.unflatten(0, (HKV, HQ // HKV))
        assert torch.equal(groups, groups[:, :1].expand_as(groups))


@pytest.mark.parametrize("method", ["kl", "weighted", "scores"])
@pytest.mark.parametrize("low", ["k", "q"])
def test_exact_when_scores_have_rank_d_over_g(method, low):
    """Keys in a rank-d/G subspace per KV head, or queries in one per GQA group: q k^T has rank <=
    d/G per head, and the fitted maps reproduce attention."""
    rank = D // 2
    q = low_rank(HKV, HQ // HKV, rank) if low == "q" else randn(B, HQ, L, D)
    k = low_rank(HKV, 1, rank, seed=3) if low == "k" else randn(B, HKV, L, D, seed=3)
    v = randn(B, HKV, L, D, seed=4)
    a, b = fit_projection(q, k, 2, method=method, is_causal=True)
    assert rel_err(projected_attention(q, k, v, a, b, is_causal=True), sdpa(q, k, v, is_causal=True)) < 1e-5


def test_float64():
    """In float64: attention on the mapped q, k against a hand-written softmax with the ORIGINAL head
    dim's scale, and the fitted scores against q k^T (exact up to the maps' float32 rounding)."""
    q, k = randn(B, HQ, L, D, dtype=torch.float64), low_rank(HKV, 1, D // 4, dtype=torch.float64, seed=3)
    v = randn(B, HKV, L, D, dtype=torch.float64, seed=4)
    a, b = fit_projection(q, k, 4, method="weighted")
    qp, kp = project(q, k, a, b)
    assert qp.dtype == kp.dtype == torch.float64

    def expand(x):
        return x.repeat_interleave(HQ // HKV, 1)

    expected = torch.softmax(qp @ expand(kp).transpose(-1, -2) / D**0.5, -1) @ expand(v)
    assert rel_err(projected_attention(q, k, v, a, b), expected) < 1e-12
    assert rel_err(qp @ expand(kp).transpose(-1, -2), q @ expand(k).transpose(-1, -2)) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_group_size_one_is_sdpa(method):
    """G=1: identity maps and fitted full-rank maps both give SDPA (mask, GQA)."""
    q, k, v = randn(B, HQ, L, D), randn(B, HKV, L, D, seed=1), randn(B, HKV, L, D, seed=2)
    mask = randn(B, 1, L, L, seed=5) > -1.0
    expected = sdpa(q, k, v, attn_mask=mask)
    eye_q, eye_k = torch.eye(D).expand(HQ, D, D), torch.eye(D).expand(HKV, D, D)
    assert rel_err(projected_attention(q, k, v, eye_q, eye_k, attn_mask=mask), expected) < 1e-6
    a, b = fit_projection(q, k, 1, method=method, attn_mask=mask, steps=3)
    assert rel_err(projected_attention(q, k, v, a, b, attn_mask=mask), expected) < 1e-4


@pytest.mark.parametrize("method", ["kl", "weighted", "scores"])
def test_fit_sees_only_what_attention_sees(method):
    """Causal (top-left, as SDPA): keys past the last query are never attended, so they do not move
    the maps; is_causal and the equivalent boolean mask give the same maps."""
    q, k = randn(B, HQ, L, D), randn(B, HKV, L + 16, D, seed=1)
    maps = fit_projection(q, k, 2, method=method, is_causal=True, steps=5)
    unseen = k.clone()
    unseen[:, :, L:] = randn(B, HKV, 16, D, seed=9) * 10
    for other in (fit_projection(q, unseen, 2, method=method, is_causal=True, steps=5),
                  fit_projection(q, k, 2, method=method, attn_mask=torch.ones(L, L + 16, dtype=torch.bool).tril(),
                                 steps=5)):
        torch.testing.assert_close(other, maps, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fit_projection(q, k, 2, method=method, steps=5)[1], maps[1], atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    q, k = randn(B, HQ, L, D), randn(B, HKV, L, D, seed=1)
    first, second = (fit_projection(q, k, 2, method=method, is_causal=True, steps=5) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_rejects_bad_arguments():
    q, k = randn(B, HQ, L, D), randn(B, HKV, L, D)
    with pytest.raises(ValueError, match="method"):
        fit_projection(q, k, 2, method="svd")
    with pytest.raises(ValueError, match="divisible"):
        fit_projection(q, k, 3)
    with pytest.raises(ValueError, match=r"must be \(B, H, L, d\)"):
        fit_projection(q[0], k[0], 2)


# ---- grouping="projection" through the backend: maps fitted on the first call, saved with the plan --

PROJECTED = {"approximate": "always", "grouping": "projection", "group_size": 2}
# The guard on accuracy alone (min_speedup 0: on the CPU the op is slower than SDPA), loose enough to pass.
GUARDED_PROJECTION = {**PROJECTED, "approximate": "guarded", "tolerance": 10.0, "min_speedup": 0}


class CausalSelfAttention(torch.nn.Module):
    """One causal SDPA site on (B, heads, L, head_dim) q, k, v from one linear layer."""

    def __init__(self, heads: int = 2, head_dim: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(32, 3 * heads * head_dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv(x).view(*x.shape[:2], 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(*self.qkv_heads(x), is_causal=True)


def compiled_attention(options=PROJECTED, **kwargs):
    torch.manual_seed(0)
    model = CausalSelfAttention(**kwargs)
    return model, torch.compile(model, backend="distr", options=options), randn(2, 24, 32)


def test_backend_fits_the_maps_on_the_first_call_and_projects(eager_backend):
    """The compiled site is exact attention on (q A, k B) with maps fitted on the first call's q, k:
    the graph reads A and B as buffers, multiplies and calls the op at G=1; the report names the
    grouping."""
    import distr_compile
    from test_passes import op_nodes

    model, compiled, x = compiled_attention()
    with torch.no_grad():
        out = compiled(x)
        q, k, v = model.qkv_heads(x)
    a, b = fit_projection(q, k, 2, is_causal=True)
    torch.testing.assert_close(out, projected_attention(q, k, v, a, b, is_causal=True), atol=1e-5, rtol=1e-5)
    assert rel_err(out, sdpa(q, k, v, is_causal=True)) > 1e-3
    (gm,) = eager_backend
    assert sorted(n.target for n in gm.graph.find_nodes(op="get_attr")) == ["distr_projection_0_a",
                                                                           "distr_projection_0_b"]
    assert [n.args[7] for n in op_nodes(eager_backend)] == [1]
    assert "G=2 projection" in distr_compile.report(compiled)


@pytest.mark.parametrize("options, source", [(PROJECTED, "forced"), (GUARDED_PROJECTION, "calibrated")],
                         ids=["always", "guarded"])
def test_backend_projection_on_gqa_llama_matches_eager(eager_backend, monkeypatch, options, source):
    """GQA (4 query heads on 2 KV heads): A per query head, B per KV head; the compiled model
    equals the eager model with each layer's SDPA replaced by attention on (q A, k B), whether
    the maps come unguarded or from the guard's calibration."""
    import distr_compile
    from test_passes import tiny_hf_llama

    model, ids = tiny_hf_llama()
    compiled = torch.compile(model, backend="distr", options=options)
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).last_hidden_state
    plan = distr_compile.plan_of(compiled)
    assert [(d.group_size, d.grouping, d.source) for d in plan.sites.values()] == [(2, "projection", source)] * 2
    maps = [plan.sites[f"layers.{i}.self_attn"].maps for i in range(2)]
    assert [tuple(m.shape) for m in maps[0]] == [(4, 16, 8), (2, 16, 8)]
    real_sdpa = F.scaled_dot_product_attention

    def projected_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        qp, kp = project(q, k, *maps.pop(0))
        return real_sdpa(qp, kp, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa,
                         scale=q.shape[-1] ** -0.5 if scale is None else scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", projected_sdpa)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).last_hidden_state
    assert not maps
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


REUSED = "fitted to the parameters this graph was compiled with"


def test_graph_reused_for_other_parameters_runs_exact_attention(eager_backend, monkeypatch):
    """Regional compilation (``layer.compile()`` on each identical layer) reuses one graph, fitted
    on the first layer, for every layer: the first layer runs its maps, the second (whose q and k
    the maps were not fitted on) exact attention, and the backend says so once. Compiling the whole
    model gives every layer its own maps and no warning."""
    import distr_compile
    from test_passes import op_nodes, tiny_hf_llama

    model, ids = tiny_hf_llama()
    for layer in model.layers:
        layer.compile(backend="distr", options=PROJECTED)
    with pytest.warns(UserWarning, match=REUSED) as caught, torch.no_grad():
        out = model(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).last_hidden_state, out)
    assert len([w for w in caught if "projection maps" in str(w.message)]) == 1
    assert [len(op_nodes([gm])) for gm in eager_backend] == [1, 0], "one graph per layer kind, and its exact twin"
    (site,) = distr_compile.plan_of(model.layers[0]).sites.values()
    layer_maps = [site.maps, None]  # layer 0 projects with its maps, layer 1 attends exactly
    real_sdpa = F.scaled_dot_product_attention

    def layer_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        maps = layer_maps.pop(0)
        if maps is not None:
            q, k = project(q, k, *maps)
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    with monkeypatch.context() as patch, torch.no_grad(), torch.compiler.set_stance("force_eager"):
        patch.setattr(F, "scaled_dot_product_attention", layer_sdpa)
        expected = model(input_ids=ids, use_cache=False).last_hidden_state
    assert not layer_maps
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    model, ids = tiny_hf_llama()
    compiled = torch.compile(model, backend="distr", options=PROJECTED)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{REUSED}")
        with torch.no_grad():
            compiled(input_ids=ids, use_cache=False)
            compiled(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_graph_reused_for_other_parameters_runs_exact_attention_with_inductor(batch):
    """Real Inductor, whose callable Dynamo calls with positional arguments, and dynamic shapes: the
    layer the graph was compiled for runs its maps without the warning (whatever its batch size); a
    second layer reusing the graph warns once and computes exact attention, at every length (its
    exact graph is compiled for the shapes the first graph was, not for the call's)."""
    import distr_compile

    torch._dynamo.reset()
    torch.manual_seed(0)
    first, second = CausalSelfAttention(), CausalSelfAttention()
    for layer in (first, second):
        layer.compile(backend="distr", dynamic=True, options=PROJECTED)
    x = randn(batch, 24, 32)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=f".*{REUSED}")
            projected = first(x)
        (site,) = distr_compile.plan_of(first).sites.values()
        q, k, v = first.qkv_heads(x)
        torch.testing.assert_close(projected, projected_attention(q, k, v, *site.maps, is_causal=True),
                                   atol=1e-5, rtol=1e-5)
        with pytest.warns(UserWarning, match=REUSED) as caught:
            for length in (24, 40):
                x = randn(batch, length, 32, seed=length)
                torch.testing.assert_close(second(x), second.forward(x), atol=1e-5, rtol=1e-5)
    assert len([w for w in caught if REUSED in str(w.message)]) == 1


def test_backend_projection_trains(eager_backend):
    """Gradients flow through the projected q, k into the weights (the maps stay fixed)."""
    model, compiled, x = compiled_attention()
    compiled(x).square().sum().backward()
    grad = model.qkv.weight.grad
    assert grad is not None and grad[:64].abs().sum() > 0  # the q and k rows


def test_plan_saves_and_loads_the_maps(eager_backend, tmp_path, monkeypatch):
    """plan.json + plan.safetensors: compiling with the loaded plan reproduces the output without
    fitting again."""
    import distr_compile

    model, compiled, x = compiled_attention()
    with torch.no_grad():
        out = compiled(x)
    path = distr_compile.plan_of(compiled).save(str(tmp_path / "plan.json"))
    assert (tmp_path / "plan.safetensors").exists()
    monkeypatch.setattr(distr_compile.guard.probe, "fit_projection", pytest.fail)
    torch._dynamo.reset()
    reloaded = torch.compile(model, backend="distr", options={"plan": path})
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), out, atol=0, rtol=0)


@pytest.fixture
def saved_plan(eager_backend, tmp_path):
    import distr_compile

    _, compiled, x = compiled_attention()
    with torch.no_grad():
        compiled(x)
    torch._dynamo.reset()
    return distr_compile.plan_of(compiled).save(str(tmp_path / "plan.json"))


def test_plan_maps_of_another_head_dim_are_a_config_error(saved_plan):
    torch.manual_seed(0)
    other = torch.compile(CausalSelfAttention(heads=4, head_dim=8), backend="distr", options={"plan": saved_plan})
    with pytest.raises(Exception, match=r"ConfigError: the plan does not fit this model:\n  <root>: projection maps A \(2, 16, 8\), B \(2, 16, 8\) do not fit .*"
                                          r"expected A \(4, 8, 4\), B \(4, 8, 4\)"):
        other(randn(2, 24, 32))


def test_plan_without_its_maps_file_is_a_config_error(saved_plan, tmp_path):
    from distr_compile import DistrPlan
    from distr_compile.config import ConfigError

    (tmp_path / "plan.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"sites \['<root>'\] use grouping='projection' but their maps file "
                                          r".*plan.safetensors is missing"):
        DistrPlan.load(saved_plan)


# ---- the guard calibrates the projection: maps fitted once per site and G, measured like any candidate --


def counting_fits(monkeypatch) -> list:
    """Record the G of every fit the guard makes."""
    from distr_compile.guard import probe

    fits, fit = [], probe.fit_projection
    monkeypatch.setattr(probe, "fit_projection", lambda q, k, g, **kw: fits.append(g) or fit(q, k, g, **kw))
    return fits


def test_guarded_projection_takes_the_cheapest_fitted_maps_within_tolerance(eager_backend, monkeypatch):
    """Candidates G=4 and G=2: each gets its maps fitted once on the site's q, k and its error
    measured against exact attention; the cheapest within tolerance wins and the compiled site is
    attention on (q A, k B) with its maps. The speed check times the projected op."""
    import distr_compile
    from distr_compile import guard

    fits, timed = counting_fits(monkeypatch), {}
    monkeypatch.setattr(guard.speed, "site_times", lambda args, runs: timed.update({g: run()[0] for g, run in runs.items()})
                        or {1: 1.0, 4: 0.5, 2: 0.5})
    options = {**GUARDED_PROJECTION, "group_size": [4, 2], "tolerance": 0.3, "min_speedup": 1.05}
    model, compiled, x = compiled_attention(options)
    with torch.no_grad():
        out = compiled(x)
        q, k, v = model.qkv_heads(x)
    d = distr_compile.plan_of(compiled).sites["<root>"]
    assert (d.group_size, d.grouping, d.source, sorted(fits)) == (4, "projection", "calibrated", [2, 4])
    torch.testing.assert_close(d.maps, fit_projection(q, k, 4, is_causal=True), atol=1e-4, rtol=1e-4)
    expected = projected_attention(q, k, v, *d.maps, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(timed[4], expected, atol=1e-5, rtol=1e-5)
    assert d.errors[4]["rel_fro"] == pytest.approx(rel_err(expected, sdpa(q, k, v, is_causal=True)), rel=1e-3)
    assert 1e-3 < d.errors[2]["rel_fro"] < d.errors[4]["rel_fro"] <= 0.3
    assert "G=4 projection" in distr_compile.report(compiled)


def test_guarded_projection_over_tolerance_stays_exact(eager_backend, tmp_path):
    import distr_compile
    from test_passes import op_nodes

    _, compiled, x = compiled_attention({**GUARDED_PROJECTION, "tolerance": 1e-3})
    with torch.no_grad():
        compiled(x)
    plan = distr_compile.plan_of(compiled)
    d = plan.sites["<root>"]
    assert not d.approximated and d.maps is None
    assert d.reason.startswith(f"rel_fro over tolerance 0.001 (G=2 {d.errors[2]['rel_fro']:.3g})")
    assert not op_nodes(eager_backend)
    plan.save(str(tmp_path / "plan.json"))
    assert not (tmp_path / "plan.safetensors").exists()


def test_guarded_projection_plan_reloads_without_fitting(eager_backend, tmp_path, monkeypatch):
    import distr_compile

    model, compiled, x = compiled_attention(GUARDED_PROJECTION)
    with torch.no_grad():
        out = compiled(x)
    path = distr_compile.plan_of(compiled).save(str(tmp_path / "plan.json"))
    monkeypatch.setattr(distr_compile.guard.probe, "fit_projection", pytest.fail)
    torch._dynamo.reset()
    reloaded = torch.compile(model, backend="distr", options={**GUARDED_PROJECTION, "plan": path})
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), out, atol=0, rtol=0)
    assert distr_compile.plan_of(reloaded).sites["<root>"].grouping == "projection"


def test_calibrate_projection_end_to_end_keeps_the_maps_of_the_final_group_size(eager_backend, monkeypatch):
    """calibrate on two batches with the end-to-end guard: maps fitted once per G (on the first
    batch), both batches measure them; G=4 is over output_tolerance, so the site ends at G=2 with
    the G=2 maps, and the model's output is within output_tolerance of exact on both batches."""
    import distr_compile

    fits = counting_fits(monkeypatch)
    torch.manual_seed(0)
    model, batches = CausalSelfAttention(), [randn(2, 24, 32), randn(2, 24, 32, seed=1)]
    options = {**GUARDED_PROJECTION, "group_size": [4, 2], "output_tolerance": 0.19}
    d = distr_compile.calibrate(model, batches, **options).sites["<root>"]
    assert sorted(fits) == [2, 4]
    assert (d.group_size, d.source, [tuple(m.shape) for m in d.maps]) == (2, "end-to-end", [(2, 16, 8)] * 2)
    assert d.errors[4]["rel_fro"] > 0.19
    with torch.no_grad():
        for x in batches:
            q, k, v = model.qkv_heads(x)
            assert rel_err(projected_attention(q, k, v, *d.maps, is_causal=True), sdpa(q, k, v, is_causal=True)) <= 0.19


Q, K = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)


@pytest.mark.parametrize("q, k, g, kwargs, match", [
    (Q, K, 0, {}, "divisible by G=0"),
    (Q, K, -2, {}, "divisible by G=-2"),
    (Q, K, 2.0, {}, "divisible by G=2.0"),
    (Q, K[..., :8], 2, {}, "share the batch and head dim"),
    (Q, K.expand(2, -1, -1, -1), 2, {}, "share the batch and head dim"),
    (Q.clone().fill_(float("nan")), K, 2, {}, "must be finite"),
    (Q, K, 2, {"attn_mask": torch.zeros(8, 8, dtype=torch.bool)}, "degenerate"),
], ids=["g0", "g-negative", "g-float", "head-dim", "batch", "nan", "all-masked"])
def test_fit_projection_rejects_bad_inputs(q, k, g, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_projection(q, k, g, steps=2, **kwargs)


def test_fit_projection_takes_activations_that_require_grad():
    a, b = fit_projection(Q.clone().requires_grad_(), K, 2, steps=2)
    assert not a.requires_grad and a.shape == (4, 16, 8) and b.shape == (2, 16, 8)
