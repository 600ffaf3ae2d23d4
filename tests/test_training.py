"""Training with DistrAttention in the loop (CPU): the adaptation mode puts forward and
backward through the op under AOTAutograd with dynamic shapes, gradients match eager
DistrAttention, a tiny training loop's loss decreases, checkpoints round-trip, and the guard whose
reference is the original model's output decides as designed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch._dynamo.backends.common import aot_autograd

import distr_compile
import distr_compile.backend as backend
from distr_compile import DistrConfig, DistrPlan
from distr_compile.training import adaptation_options, load_checkpoint, save_checkpoint

from test_guard import Synthetic, inputs, synthetic
from test_passes import op_nodes
from zoo import sdpa_as_distr

VOCAB, LAYERS = 32, 2
ADAPT = adaptation_options(group_size=2, block_m=16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_graphs(monkeypatch):
    """Compile the backend's rewritten graphs with AOTAutograd and no Inductor (fast on CPU);
    collects the rewritten Dynamo graphs (where the op is a node) and the forward and backward
    graphs AOTAutograd traces (where, on CPU, the op's reference body and autograd are inlined)."""
    graphs = {"dynamo": [], "forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return gm
        return compiler

    aot = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    def compile_fx(gm, example_inputs, config_patches=None):
        graphs["dynamo"].append(gm)
        return aot(gm, example_inputs)

    monkeypatch.setattr(backend, "compile_fx", compile_fx)
    return graphs


def tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    """A 2-layer HF Llama (GQA, causal, head dim 16) in training mode, SDPA attention."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            attn_implementation="sdpa")
    return tf.LlamaForCausalLM(config).train()


def counting_batch(length: int, seed: int, batch: int = 4) -> torch.Tensor:
    """Token ids that count up modulo the vocabulary from a random start: learnable in a few steps."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(length)) % VOCAB


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def test_adaptation_options_validate():
    assert ADAPT == {"approximate": "always", "group_size": 2, "block_m": 16}
    with pytest.raises(ValueError, match="approximates every site"):
        adaptation_options(approximate="guarded")
    with pytest.raises(ValueError, match="group_size"):
        adaptation_options(group_size=3)


def test_adaptation_mode_forward_and_backward_through_the_op_dynamic(aot_graphs):
    """Two sequence lengths, dynamic=True: one forward and one backward graph, every layer's
    attention is the op, and the gradients equal eager DistrAttention's."""
    model = tiny_llama()
    oracle = tiny_llama()
    compiled = torch.compile(model, backend="distr", dynamic=True, options=ADAPT)
    for length in (19, 40):  # both over block_m: a first length <= block_m specializes once
        ids = counting_batch(length, seed=length)
        model.zero_grad()
        oracle.zero_grad()
        loss_of(compiled, ids).backward()
        with sdpa_as_distr(DistrConfig(group_size=2, block_m=16)):
            loss_of(oracle, ids).backward()
        for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert len(aot_graphs["forward"]) == 1 and len(aot_graphs["backward"]) == 1, "dynamic=True must not recompile"
    assert len(op_nodes(aot_graphs["dynamo"])) == LAYERS
    plan = distr_compile.plan_of(compiled)
    assert [d.group_size for d in plan.sites.values()] == [2] * LAYERS


def test_adaptation_mode_on_compiled_layers_traces_one_layer_for_all(aot_graphs):
    """The recipe's regional compilation (examples/adapt.py): each decoder layer compiled in place.
    One layer is traced and its graph serves every layer (compile time independent of depth); HF
    passes no mask here, so the site is SDPA's is_causal; gradients equal eager DistrAttention's;
    parameter names stay plain."""
    model, oracle = tiny_llama(), tiny_llama()
    names = list(model.state_dict())
    for layer in model.model.layers:
        layer.compile(backend="distr", dynamic=True, options=ADAPT)
    ids = counting_batch(24, seed=1)
    loss_of(model, ids).backward()
    with sdpa_as_distr(DistrConfig(group_size=2, block_m=16)):
        loss_of(oracle, ids).backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert len(aot_graphs["forward"]) == 1 and len(aot_graphs["backward"]) == 1
    (site,) = op_nodes(aot_graphs["dynamo"][-1:])  # (an earlier attempt: Dynamo's float restart)
    assert site.args[3] is None and site.args[4] is True  # attn_mask, is_causal
    assert list(model.state_dict()) == names


def test_adaptation_gradients_differ_from_exact_attention(aot_graphs):
    """The backward is DistrAttention's own (grouping held fixed), not exact attention's."""
    model, exact = tiny_llama(), tiny_llama()
    ids = counting_batch(16, seed=0)
    loss_of(torch.compile(model, backend="distr", options=ADAPT), ids).backward()
    loss_of(exact, ids).backward()
    g, e = model.model.layers[0].self_attn.q_proj.weight.grad, exact.model.layers[0].self_attn.q_proj.weight.grad
    assert (g - e).norm() > 1e-3 * e.norm()


@pytest.mark.parametrize("representative", ["mean", "lstsq"])
def test_tiny_training_loop_loss_decreases(aot_graphs, representative):
    model = tiny_llama()
    compiled = torch.compile(model, backend="distr", dynamic=True, options=ADAPT | {"representative": representative})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(25):
        loss = loss_of(compiled, counting_batch(16 + step % 3, seed=step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert len(op_nodes(aot_graphs["dynamo"])) >= LAYERS
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


def test_active_attention_dropout_in_training_stays_exact_with_the_reason(aot_graphs):
    """Dropout on the attention weights is not in the op: such a site keeps SDPA and says why."""
    model = tiny_llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    compiled = torch.compile(model, backend="distr", options=ADAPT)
    loss_of(compiled, counting_batch(12, seed=0)).backward()
    assert len(op_nodes(aot_graphs["dynamo"])) == 0 and aot_graphs["backward"]
    plan = distr_compile.plan_of(compiled)
    assert len(plan.skipped) == LAYERS and all("dropout" in s.reason for s in plan.skipped.values())


def test_checkpoint_round_trip_resumes_identically(aot_graphs, tmp_path):
    """Train 3 steps, save (from the compiled model), load into fresh model and optimizer, train 2
    more: the same losses and weights as 5 uninterrupted steps."""
    def train(model, optimizer, steps):
        compiled = torch.compile(model, backend="distr", dynamic=True, options=ADAPT)
        out = []
        for step in steps:
            loss = loss_of(compiled, counting_batch(14, seed=step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return compiled, out

    straight = tiny_llama()
    _, expected = train(straight, torch.optim.AdamW(straight.parameters(), lr=1e-2), range(5))

    first = tiny_llama()
    opt = torch.optim.AdamW(first.parameters(), lr=1e-2)
    compiled, losses = train(first, opt, range(3))
    path = save_checkpoint(tmp_path / "ckpt.pt", compiled, opt, step=3, losses=losses)
    assert not any(k.startswith("_orig_mod.") for k in torch.load(path, weights_only=True)["model"])

    resumed = tiny_llama(seed=1)
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    step, extra = load_checkpoint(path, resumed, opt)
    assert step == 3 and extra["losses"] == losses
    _, more = train(resumed, opt, range(step, 5))
    assert extra["losses"] + more == pytest.approx(expected, rel=1e-5)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="no optimizer state"):
        save_checkpoint(tmp_path / "weights.pt", resumed, None, step=5)
        load_checkpoint(tmp_path / "weights.pt", resumed, opt)


# ------------------------------------------------------------- guard against the original model


def adapted_synthetic() -> tuple[Synthetic, Synthetic]:
    """(original, adapted): the synthetic guard model (its layers' approximations are exact at G=4,
    far, exact at G=2, far) and a copy whose layer 1 value projection changed a little."""
    original, adapted = synthetic(), synthetic()
    with torch.no_grad():
        adapted.layers[1].v.weight.mul_(1.01)
    return original, adapted


def guard_original(adapted, original, batches, output_tolerance, **options):
    torch._dynamo.reset()
    return distr_compile.calibrate(adapted, batches, original=original, guard_reference="original",
                                   output_tolerance=output_tolerance, block_m=16, min_speedup=0, **options)


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_original_reference_guard_decides_as_designed(tmp_path):
    """Tolerance just above the adapted model's own exact-attention gap to the original: the
    sites whose approximation is exact stay approximated (layer 2 steps down from G=4 to G=2),
    the others go back to exact. The same adapted model against a different original: all exact,
    and the plan says that even so the model is over the tolerance."""
    original, adapted = adapted_synthetic()
    batches = [inputs(0), inputs(1)]
    with torch.no_grad():
        gap = max(rel_gap(adapted(x), original(x)) for x in batches)
    assert gap > 1e-4
    tolerance = gap * 1.01 + 1e-5
    plan = guard_original(adapted, original, batches, tolerance, group_size=[4, 2])
    assert [d.group_size for d in plan.sites.values()] == [4, 1, 2, 1], plan.sites
    assert all(d.source == "original" for d in plan.sites.values())
    assert "demoted" in plan.sites["layers.1"].reason and "<= output_tolerance" in plan.sites["layers.0"].reason
    assert 0 < plan.output_error <= tolerance
    assert DistrPlan.load(plan.save(str(tmp_path / "plan.json"))).output_error == plan.output_error
    with open("/dev/null", "w") as devnull:
        text = distr_compile.report(plan, file=devnull)
    assert "Reference: the original model's output" in text and "End-to-end error of this plan" in text

    torch.manual_seed(1)
    stranger = Synthetic().eval()
    plan = guard_original(adapted, stranger, batches, tolerance, group_size=[4, 2])
    assert not any(d.approximated for d in plan.sites.values())
    assert plan.output_error > tolerance
    with open("/dev/null", "w") as devnull:
        assert "over output_tolerance although every site is exact" in distr_compile.report(plan, file=devnull)


def test_original_reference_guard_accepts_a_task_metric():
    """``output_error`` is what the tolerance applies to: a metric that only looks at the mean
    keeps every site approximated although most err far from exact attention on their own."""
    original, adapted = adapted_synthetic()
    batches = [inputs(0)]
    plan = guard_original(adapted, original, batches, 10.0, group_size=2,
                          output_error=lambda out, ref: float((out.mean() - ref.mean()).abs()))
    assert [d.group_size for d in plan.sites.values()] == [2] * len(Synthetic.DUPS)
    assert sum(d.error("rel_fro") > 0.05 for d in plan.sites.values()) >= 2


def test_original_reference_needs_the_original_model_and_a_tolerance():
    model = synthetic()
    with pytest.raises(ValueError, match="needs output_tolerance"):
        DistrConfig(guard_reference="original")
    with pytest.raises(ValueError, match="guard_reference"):
        DistrConfig(guard_reference="adapted")
    with pytest.raises(ValueError, match="exactly when guard_reference='original'"):
        distr_compile.calibrate(model, [inputs(0)], guard_reference="original", output_tolerance=0.1)
    with pytest.raises(ValueError, match="exactly when guard_reference='original'"):
        distr_compile.calibrate(model, [inputs(0)], original=model)
    compiled = torch.compile(model, backend="distr",
                             options={"approximate": "guarded", "guard_reference": "original", "output_tolerance": 0.1})
    with pytest.raises(Exception, match="needs the original model"), torch.no_grad():
        compiled(inputs(0))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--group-size", "3"], "group_size must be one of"),
    (["--eval-windows", "2", "--guard-batches", "3"], "--guard-batches (3) must be <= --eval-windows (2)"),
    (["--extra-train-text", "wikipedia"], "invalid choice: 'wikipedia'"),
    (["--objective", "mse"], "invalid choice: 'mse'"),
])
def test_adapt_example_rejects_bad_arguments(argv, message):
    proc = subprocess.run([sys.executable, "examples/adapt.py", *argv], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_stdlib_docstrings_are_extra_training_text_never_the_evaluation_text():
    """The extra training text: many long docstrings, in a fixed order, and none of them taken
    from pydoc_data (the held-out evaluation text) or from test suites."""
    from distr_compile import models

    texts = models.stdlib_docstrings()
    assert len(texts) > 1000 and min(map(len, texts)) >= 100
    assert texts == models.stdlib_docstrings()
    pydoc = set(models.pydoc_texts())
    assert not any(t in pydoc for t in texts)
