"""transformers models in eager mode with ``attn_implementation="distr"`` (CPU).

Tiny random Llama (causal, GQA, padding), BERT (padding), ViT and T5 (position bias,
cross-attention) built from config: unconfigured
they compute exactly what "sdpa" computes; configured with G=2 everywhere they compute what
``backend="distr"`` with ``approximate="always"`` computes on the same weights; a saved plan applies
per layer; gradients flow and match the compiled path's; active dropout stays exact.

The compiled side runs the backend's rewritten graph with FX (the ``eager_backend`` fixture), so
both sides run the same PyTorch reference of the op in float32 on the same q, k, v: they agree
bit for bit here (the asserted 1e-5 leaves room for float32 rounding, e.g. a causal mask against
``is_causal``), while G=2 moves the outputs by 4e-4 (BERT) to 2e-2 (ViT) from exact attention.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import transformers as tf

import distr_compile
from distr_compile import DistrConfig, DistrPlan, configure, plan_of
from distr_compile.hf import DROPOUT, LAYER_ATTRIBUTE, MAPS, UNCONFIGURED, say_once, select_attention
from distr_compile.hf_attention import NO_WEIGHTS

B, L, VOCAB = 2, 20, 128
G2 = DistrConfig(group_size=2)
TOL = dict(atol=1e-5, rtol=1e-5)


def llama(**overrides) -> tf.LlamaForCausalLM:
    """3 layers, 4 query / 2 KV heads of dim 16, causal."""
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", **overrides)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def bert(**overrides) -> tf.BertModel:
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, attn_implementation="sdpa", **overrides)
    torch.manual_seed(0)
    return tf.BertModel(config, add_pooling_layer=False).eval()


def vit() -> tf.ViTModel:
    config = tf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.ViTModel(config, add_pooling_layer=False).eval()


def t5() -> tf.T5ForConditionalGeneration:
    """Encoder-decoder with a relative position bias in every self-attention, and cross-attention."""
    config = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         decoder_start_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(config).eval()


def text_inputs() -> dict:
    """Token ids with the second sequence left-padded by 5."""
    ids = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def seq2seq_inputs() -> dict:
    return text_inputs() | {"decoder_input_ids": text_inputs()["input_ids"][:, :7]}


def image_inputs() -> dict:
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


MODELS = {"llama": (llama, text_inputs), "bert": (bert, text_inputs), "vit": (vit, image_inputs),
          "t5": (t5, seq2seq_inputs)}


def output(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(autouse=True)
def warn_afresh():
    """Each test sees the once-per-process messages afresh."""
    say_once.cache_clear()
    yield
    say_once.cache_clear()


def test_import_registers_with_transformers_when_its_modeling_code_loads():
    """Importing the package does not load transformers' modeling code (2-3 s); loading it later
    registers "distr" and leaves transformers' module its own loader; the other order works too,
    and so does importing the module that needs transformers first (the hook runs within it)."""
    check = ("from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks; "
             "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as attention; "
             "assert 'distr' in attention and 'distr' in masks")
    after = ("import sys, distr_compile; assert 'transformers.modeling_utils' not in sys.modules; "
             f"{check}; import transformers.modeling_utils as m; assert type(m.__loader__).__name__ == 'SourceFileLoader'")
    before = f"import transformers.modeling_utils, distr_compile; {check}"
    internal_first = f"import distr_compile.hf_attention; {check}"
    for code in (after, before, internal_first):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", list(MODELS))
def test_unconfigured_computes_exactly_sdpa_and_says_so_once(name):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    with torch.no_grad():
        want = output(model, inputs)
        select_attention(model, "distr")  # set_attn_implementation misses T5's stacks in transformers 5.17
        with pytest.warns(UserWarning, match="computes exact attention") as record:
            got = output(model, inputs)
            output(model, inputs)
    assert torch.equal(got, want)
    assert sum(UNCONFIGURED in str(w.message) for w in record) == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_g2_everywhere_equals_the_backend_approximating_always(name, eager_backend):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    with torch.no_grad():
        exact = output(model, inputs)
        compiled = torch.compile(model, backend="distr", options={"approximate": "always", "group_size": 2})
        want = output(compiled, inputs)
        got = output(configure(model, G2), inputs)
    assert model.config._attn_implementation == "distr"
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, exact, **TOL)  # the approximation did run


def test_loading_with_attn_implementation_distr(tmp_path):
    llama().save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="distr")
    built = tf.LlamaForCausalLM._from_config(loaded.config, attn_implementation="distr")
    assert loaded.config._attn_implementation == built.config._attn_implementation == "distr"


def test_a_saved_plan_applies_per_layer(tmp_path, eager_backend):
    """A plan from the backend, edited to G=2 / exact / G=4, saved and loaded: each layer computes
    its own G, and the eager model agrees with the model compiled with that plan."""
    model, inputs = llama(), text_inputs()
    with torch.no_grad():
        output(torch.compile(model, backend="distr", options={"approximate": "always"}), inputs)
        plan = plan_of(model)
        assert list(plan.sites) == [f"model.layers.{i}.self_attn" for i in range(3)]
        for site, g in zip(plan.sites.values(), (2, 1, 4)):
            site.group_size = g
        path = plan.save(str(tmp_path / "plan.json"))
        torch._dynamo.reset()
        want = output(torch.compile(model, backend="distr", options={"plan": path}), inputs)
        got = output(configure(model, DistrPlan.load(path)), inputs)
    torch.testing.assert_close(got, want, **TOL)
    groups = [getattr(layer.self_attn, LAYER_ATTRIBUTE).config.group_size for layer in model.model.layers]
    assert groups == [2, 1, 4]


def test_a_plan_for_another_module_is_an_error():
    model = llama()
    plan = DistrPlan(G2.__dict__ | {"candidate_group_sizes": []})
    plan.sites["layers.0.self_attn"] = distr_compile.guard.SiteDecision("layers.0.self_attn", "sdpa", "", 2, "", "")
    with pytest.raises(ValueError, match="configure that") as e:
        configure(model, plan)
    assert "'model'" in str(e.value) and not hasattr(model.model, LAYER_ATTRIBUTE)
    plan.sites = {"model.layers.0.self_attn": plan.sites["layers.0.self_attn"]}
    configure(model, plan)  # names one layer of three: the first unnamed one to run is an error
    with torch.no_grad(), pytest.raises(ValueError, match="'model.layers.1.self_attn' has no decision in the plan"):
        output(model, text_inputs())


def test_gradients_flow_and_match_the_compiled_path(eager_backend):
    inputs = text_inputs() | {"labels": text_inputs()["input_ids"]}
    grads = []
    for compiled in (True, False):
        model = llama().train()
        run = torch.compile(model, backend="distr", options={"approximate": "always"}) if compiled else configure(model, G2)
        run(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], **TOL, msg=name)


def test_active_dropout_stays_exact():
    """Training BERT with attention dropout 0.1: the same dropout masks (same seed) and the same
    outputs as "sdpa", and one warning; in eval mode the same model approximates."""
    model, inputs = bert(attention_probs_dropout_prob=0.1).train(), text_inputs()
    torch.manual_seed(2)
    want = output(model, inputs)
    configure(model, G2)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="dropout is active") as record:
        got = output(model, inputs)
    assert torch.equal(got, want) and sum(DROPOUT in str(w.message) for w in record) == 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch.allclose(output(model.eval(), inputs), output(bert().eval(), inputs), **TOL)


def test_decoding_with_a_cache_and_removing_the_setting():
    """Greedy generation (prefill, then one query row per step over the cache, GQA): G=1 through
    the op and ``configure(model, None)`` give sdpa's tokens."""
    model, inputs = llama(), text_inputs()
    generate = lambda: model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)  # noqa: E731
    want = generate()
    configure(model, DistrConfig(group_size=1))
    assert torch.equal(generate(), want)
    configure(model, None)
    assert not any(hasattr(m, LAYER_ATTRIBUTE) for m in model.modules())
    with pytest.warns(UserWarning, match="computes exact attention"):
        assert torch.equal(generate(), want)


def op_on_sdpa_inputs(model, run, monkeypatch, config: DistrConfig):
    """``run()`` of ``model`` under "sdpa" with every SDPA call replaced by ``distr_attention`` at
    ``config``: the op on exactly the inputs "sdpa" gives SDPA (KV heads shared in place, as
    "distr" reads them: "sdpa" would otherwise fold a decoding step's query heads into rows)."""
    from distr_compile.ops import distr_attention

    def approximate(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return distr_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config=config)

    with monkeypatch.context() as patch:
        patch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", approximate)
        return run()


def mistral() -> tf.MistralForCausalLM:
    """:func:`llama`'s shapes with a sliding window of 8 (of 20 tokens)."""
    config = tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=8, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("build", [llama, mistral])
def test_decoding_with_g2_runs_the_op_on_what_sdpa_sees(build, cache, monkeypatch):
    """Greedy generation with G=2, a left-padded batch, GQA: the prefill (over a static cache's
    empty slots too) and each one-row step over the cache, with or without a sliding window
    shorter than the sequence, give the logits of the op applied where "sdpa" applies SDPA."""
    model, inputs = build(), text_inputs()

    def generate():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation=cache,
                             output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits)

    exact = generate()
    want = op_on_sdpa_inputs(model, generate, monkeypatch, G2)
    configure(model, G2)
    got = generate()
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, exact, **TOL)


def gemma4() -> tf.Gemma4ForCausalLM:
    """4 layers, the last 2 sharing the KV of earlier ones, sliding and full attention."""
    config = tf.Gemma4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16,
                                 sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                                 num_kv_shared_layers=2, vocab_size_per_layer_input=VOCAB,
                                 hidden_size_per_layer_input=8, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.Gemma4ForCausalLM(config).eval()


@pytest.mark.parametrize("call", ["logits_to_keep", "static_cache"])
def test_unconfigured_kv_shared_layers_compute_what_sdpa_computes(call):
    """Gemma 4 slices the queries of its KV-shared layers to ``logits_to_keep`` after making the
    masks, except under "sdpa" where a mask is missing: "distr" always gets masks for it, else
    its causal stand-in is aligned to the first queries, or a static cache's empty slots are
    attended. The full-sequence path of "sdpa" and the sliced one of "distr" agree to rounding."""
    model, inputs = gemma4(), {"input_ids": text_inputs()["input_ids"]}  # no padding: masks are skipped

    def run():
        if call == "logits_to_keep":
            return model(**inputs, logits_to_keep=3).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static",
                             output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits)

    with torch.no_grad():
        want = run()
        model.set_attn_implementation("distr")
        got = run()
    torch.testing.assert_close(got, want, **TOL)


def test_asking_for_attention_weights_warns_that_there_are_none():
    """BART passes ``output_attentions`` to its attention function: "sdpa" warns that it returns
    no weights, and so does an approximating layer."""
    config = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = configure(tf.BartModel(config).eval(), G2)
    with torch.no_grad(), pytest.warns(UserWarning, match="returns no attention weights") as record:
        out = model(**text_inputs(), output_attentions=True)
    assert not any(out.encoder_attentions) and sum(NO_WEIGHTS in str(w.message) for w in record) == 1


def gpt_oss() -> tf.GptOssForCausalLM:
    """Attention sinks (``s_aux``) in every layer: "sdpa" would drop them."""
    config = tf.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                             num_experts_per_tok=1, attn_implementation="eager")
    torch.manual_seed(0)
    return tf.GptOssForCausalLM(config).eval()


def gemma2() -> tf.Gemma2ForCausalLM:
    """Attention logit soft-capping (``softcap``) in every layer."""
    config = tf.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="eager")
    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("setting", [None, G2])
@pytest.mark.parametrize(("build", "name"), [(gpt_oss, "s_aux"), (gemma2, "softcap")])
def test_an_argument_that_changes_the_math_and_distr_cannot_apply_is_an_error(build, name, setting):
    """Sinks and soft-capping, exact or approximated: an error that names them, never attention
    without them (what transformers' "sdpa" function would compute)."""
    model = build()
    model.set_attn_implementation("distr")
    if setting is not None:
        configure(model, setting)
    with torch.no_grad(), pytest.raises(ValueError, match=f"passes {name} .* attn_implementation='eager'"):
        output(model, text_inputs())


@pytest.mark.parametrize("name", ["sinks", "indices", "block_indices"])
def test_every_such_argument_is_an_error(name):
    from distr_compile.hf_attention import distr_attention_forward

    q = k = v = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=f"passes {name} "):
        distr_attention_forward(torch.nn.Module(), q, k, v, None, **{name: torch.zeros(2)})


# --------------------------------------------------------------------------- projection maps

PROJECTION = DistrConfig(group_size=2, grouping="projection")


def projected_reference(model, maps: list, inputs: dict, monkeypatch) -> torch.Tensor:
    """``model`` ("sdpa") with the i-th attention call on (q A_i, k B_i): layer i with ``maps[i]``."""
    from distr_compile.projection import project

    sdpa, todo = torch.nn.functional.scaled_dot_product_attention, list(maps)

    def projected(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        a, b = todo.pop(0)
        qp, kp = project(q, k, a, b.repeat_interleave(k.shape[1] // b.shape[0], dim=0))  # sdpa may repeat_kv
        return sdpa(qp, kp, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", projected)
        out = output(model, inputs)
    assert not todo
    return out


def layer_maps(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.self_attn.distr_projection_a, layer.self_attn.distr_projection_b) for layer in model.model.layers]


@pytest.fixture
def calibrated():
    """(tiny Llama with maps fitted on one batch, the same model with "sdpa" and no setting)."""
    model, inputs = llama(), text_inputs()
    reference = copy.deepcopy(model)
    return configure(model, PROJECTION, calibration=[inputs]), reference


def test_a_plan_with_projection_maps_equals_the_backend_projecting_always(eager_backend):
    """The backend fits each site's maps on its first call; the eager model configured with its
    plan runs every layer on the same maps and computes the same output."""
    model, inputs = llama(), text_inputs()
    with torch.no_grad():
        compiled = torch.compile(model, backend="distr", options={"approximate": "always", "group_size": 2,
                                                                    "grouping": "projection"})
        want = output(compiled, inputs)
        plan = plan_of(model)
        got = output(configure(model, plan), inputs)
    torch.testing.assert_close(got, want, **TOL)
    for (a, b), site in zip(layer_maps(model), plan.sites.values()):
        assert torch.equal(a, site.maps[0]) and torch.equal(b, site.maps[1])


def test_each_layer_runs_its_own_maps_eager_and_under_regional_compilation(calibrated, monkeypatch):
    """Fitted per layer, the maps differ between layers, and layer i attends with layer i's: eager,
    and with every layer compiled on its own (one graph for the identical layers, whose maps are
    graph inputs like their weights). Layer 0's maps in every layer give another output."""
    model, reference = calibrated
    inputs = text_inputs() | {"use_cache": False}  # a cache is indexed by layer: one graph per layer
    maps = layer_maps(model)
    assert [tuple(m.shape) for m in maps[0]] == [(4, 16, 8), (2, 16, 8)]
    assert not torch.allclose(maps[0][0], maps[1][0]) and not torch.allclose(maps[1][1], maps[2][1])
    want = projected_reference(reference, maps, inputs, monkeypatch)
    assert not torch.allclose(projected_reference(reference, [maps[0]] * 3, inputs, monkeypatch), want, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(output(model, inputs), want, **TOL)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    for layer in model.model.layers:
        layer.compile(backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(output(model, inputs), want, **TOL)
    assert len(graphs) == 1


def test_fitted_maps_saved_as_a_plan_configure_another_copy(calibrated, tmp_path):
    """configured_plan turns the fitted (or trained) maps into a plan: saved (JSON + safetensors)
    and loaded, it configures a fresh copy of the model with the same maps, without refitting."""
    from distr_compile.hf import configured_plan

    model, reference = calibrated
    path = configured_plan(model).save(str(tmp_path / "plan.json"))
    fresh = configure(reference, DistrPlan.load(path))
    for got, want in zip(layer_maps(fresh), layer_maps(model)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, text_inputs()), output(model, text_inputs()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="holds projection maps"):
        configured_plan(configure(llama(), G2))


def test_calibration_records_the_masks_sdpa_sees(monkeypatch):
    """Maps are fitted on each call's attention as SDPA computes it under "sdpa": T5's position
    bias is part of the recorded mask (as it is of the mask the backend fits its maps on). The
    calibrated model then runs with the bias in every projected layer."""
    from distr_compile.hf_attention import capturing

    model, inputs, seen = t5(), seq2seq_inputs(), []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        output(model, inputs)
    with capturing(model) as calls, torch.no_grad():
        output(model, inputs)
    recorded = [call.mask for module_calls in calls.values() for call in module_calls]
    assert len(recorded) == len(seen) == 6
    assert all(torch.equal(r, s) for r, s in zip(recorded, seen))
    configure(model, PROJECTION, calibration=[inputs])
    with torch.no_grad():
        assert torch.isfinite(output(model, inputs)).all()


def test_projection_needs_maps_that_fit():
    model = llama()
    with pytest.raises(ValueError, match="needs per-layer maps"):
        configure(model, PROJECTION)
    with pytest.raises(ValueError, match="calibration= fits projection maps"):
        configure(model, G2, calibration=[text_inputs()])
    with pytest.raises(ValueError, match="trainable_maps=True trains projection maps"):
        configure(model, G2, trainable_maps=True)
    plan = DistrPlan(PROJECTION.__dict__ | {"candidate_group_sizes": []})
    for i in range(3):
        site = distr_compile.guard.SiteDecision(f"model.layers.{i}.self_attn", "sdpa", "", 2, "", "",
                                                grouping="projection")
        plan.sites[site.name] = site
    with pytest.raises(ValueError, match="without maps"):
        configure(model, plan)
    for site in plan.sites.values():
        site.maps = torch.randn(4, 16, 8), torch.randn(4, 16, 8)  # B per query head: GQA has 2 KV heads
    with pytest.raises(ValueError, match=r"expected A \(4, 16, 8\), B \(2, 16, 8\)"):
        configure(model, plan)
    for site in plan.sites.values():
        site.maps = torch.randn(4, 16, 8), torch.randn(2, 16, 8)
    configure(model, plan)
    with torch.no_grad():
        output(model, text_inputs())


def test_a_failing_configure_leaves_the_model_as_it_was():
    """Every check runs before the first change: a plan whose maps do not fit one layer, a G that
    does not divide the head dim, or a module that is no transformers model leave the earlier
    setting (or none) in place."""
    model = configure(llama(), G2)
    with torch.no_grad():
        before = output(model, text_inputs())
    plan = DistrPlan(PROJECTION.__dict__ | {"candidate_group_sizes": []})
    for i in range(3):
        maps = (torch.randn(4, 16, 8), torch.randn(2 if i < 2 else 4, 16, 8))  # the last layer's B does not fit
        site = distr_compile.guard.SiteDecision(f"model.layers.{i}.self_attn", "sdpa", "", 2, "", "",
                                                grouping="projection", maps=maps)
        plan.sites[site.name] = site
    with pytest.raises(ValueError, match="model.layers.2.self_attn"):
        configure(model, plan)
    with pytest.raises(ValueError, match="head dim 12, not divisible by group_size 8"):
        configure(llama(head_dim=12), DistrConfig(group_size=8, grouping="fixed"))
    assert all(layer.self_attn.distr_layer.config == G2 and not hasattr(layer.self_attn, MAPS[0])
               for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(output(model, text_inputs()), before, atol=0, rtol=0)
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="transformers model"):
        configure(linear, G2)
    assert not hasattr(linear, "distr_layer")


def test_a_model_whose_attention_does_not_call_the_interface_is_an_error():
    """Bloom computes attention in its own code: configured, "distr" would never run in it and the
    model would stay exact without a word."""
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="does not call transformers' attention interface"):
        configure(model, G2)
    assert not any(hasattr(m, LAYER_ATTRIBUTE) for m in model.modules())


def test_gradients_reach_the_weights_and_trainable_maps():
    """Fixed maps are buffers (no gradient, not in ``parameters()``); with ``trainable_maps`` they
    are parameters, in ``state_dict``, and the loss's gradient reaches them."""
    inputs = text_inputs() | {"labels": text_inputs()["input_ids"]}
    for trainable in (False, True):
        model = configure(llama().train(), PROJECTION, calibration=[text_inputs()], trainable_maps=trainable)
        model(**inputs).loss.backward()
        named = dict(model.named_parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
        projection = [name for name in named if "distr_projection" in name]
        assert len(projection) == (6 if trainable else 0)
        assert any("distr_projection" in key for key in model.state_dict()) == trainable


def test_maps_travel_with_the_module(calibrated, monkeypatch):
    """``model.to(float64)`` casts the maps with the weights, ``copy.deepcopy`` copies them,
    ``state_dict`` leaves them out, and removing the setting removes them."""
    model, reference = calibrated
    inputs = text_inputs()
    assert model.state_dict().keys() == reference.state_dict().keys()
    copied = copy.deepcopy(model)
    assert copied.model.layers[1].self_attn.distr_projection_a.data_ptr() != layer_maps(model)[1][0].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(output(copied, inputs), output(model, inputs), atol=0, rtol=0)
    model.to(torch.float64)
    reference.to(torch.float64)
    maps = layer_maps(model)
    assert all(m.dtype == torch.float64 for pair in maps for m in pair)
    with torch.no_grad():
        got = output(model, inputs)
    torch.testing.assert_close(got, projected_reference(reference, maps, inputs, monkeypatch), atol=1e-10, rtol=1e-10)
    configure(model, None)
    assert not any("distr_projection" in name for name, _ in model.named_buffers())
