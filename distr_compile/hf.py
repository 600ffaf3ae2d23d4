"""Hugging Face models without torch.compile: ``attn_implementation="distr"``.

``import distr_compile`` registers "distr" with transformers' attention interface (and SDPA's mask
functions under the same name) as soon as transformers' modeling code is imported, or at once if it
already is: the package itself never imports transformers, so it costs nothing without it.

What each attention layer computes is configured once per model with :func:`configure`: one
:class:`DistrConfig` for every layer, or a :class:`DistrPlan` (``plan_of`` a model compiled with
``backend="distr"``, or ``calibrate``) applied by module path, so one plan serves the compiled and
the eager model. An unconfigured model computes exactly what "sdpa" computes, and says so once.

Every submodule of a configured model holds a :class:`DistrLayer` (its path and config) in the
attribute ``distr_layer``: the attention function receives the attention module and reads it there,
so the setting travels with the model (``copy.deepcopy``, ``torch.compile``) and no global state
maps modules to layers. A layer with ``grouping="projection"`` also holds its maps A and B, as
tensors of the attention module (:data:`MAPS`): non-persistent buffers, or parameters when they are
trained. Being the module's own tensors, they follow ``model.to()`` and ``copy.deepcopy``, stay out
of ``state_dict`` (as buffers), and under ``torch.compile`` they are inputs of the traced graph like
the layer's weights, so one graph compiled for identical layers (``layer.compile()``) runs each
layer with its own maps.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .config import DistrConfig
from .guard import EXACT, DistrPlan, SiteDecision, plan_config
from .guard.calibration import call_batch
from .projection import fit_projection, mask_bias

LAYER_ATTRIBUTE = "distr_layer"
MAPS = ("distr_projection_a", "distr_projection_b")  # the attention module's A and B, for grouping="projection"
Maps = tuple[torch.Tensor, torch.Tensor]
MODELING = "transformers.modeling_utils"  # where AttentionInterface lives (2-3 s to import)

UNCONFIGURED = (
    "attn_implementation='distr' on a model without a DistrAttention setting computes exact attention, what "
    "'sdpa' computes. Set what every layer computes with distr_compile.configure(model, DistrConfig(group_size=2)), "
    "or per layer with a DistrPlan (plan_of a model compiled with backend='distr', or calibrate): "
    "distr_compile.configure(model, plan). See help(distr_compile.configure)."
)
DROPOUT = (
    "attention dropout is active (training mode, dropout > 0): DistrAttention layers run exact attention while it "
    "is, as with backend='distr' (the kernels have no dropout). Set the model's attention dropout to 0 to train "
    "with the approximation in the loop."
)
NEEDS_MAPS = (
    "grouping='projection' needs per-layer maps: fit them on your batches with "
    "distr_compile.configure(model, DistrConfig(group_size=2, grouping='projection'), calibration=batches), "
    "or pass a DistrPlan whose sites carry maps (plan_of a model compiled with grouping='projection', or DistrPlan.load)"
)


@dataclass(frozen=True)
class DistrLayer:
    """What one module computes under ``attn_implementation="distr"``.

    ``path`` is the module's path in the configured model (a plan's site name); ``config`` is its
    DistrConfig (``group_size=1``: exact attention), or None when the plan applied has no decision
    for the module (an error if it computes attention). The projection maps of a layer are not
    here but tensors of the module (:data:`MAPS`), so that they move and compile with it."""

    path: str
    config: DistrConfig | None


def configure(model: nn.Module, setting: DistrConfig | DistrPlan | None, *, calibration: Iterable | None = None,
              trainable_maps: bool = False) -> nn.Module:
    """Set what every attention layer of a transformers model computes, and select "distr" for it.

    ``setting``:

    * a :class:`DistrConfig`: every attention layer runs DistrAttention with it (``group_size=1``:
      exact attention through the op);
    * a :class:`DistrPlan` (``distr_compile.plan_of(compiled)``, ``calibrate(...)`` or
      ``DistrPlan.load(path)``): each site takes its own G, with the knobs the plan was made with,
      matched to the module of the same path (the names the backend gives when ``model`` itself is
      compiled, e.g. ``model.layers.3.self_attn``). A site name that is no module path of ``model``
      is an error, as is a layer the plan does not name when it computes attention: a plan applies
      whole or not at all. Sites with ``grouping="projection"`` bring their maps;
    * None: remove the setting (exact attention, with a reminder).

    ``grouping="projection"`` (exact attention on ``q A`` and ``k B``, rank-d/G maps per layer)
    needs each layer's maps A (Hq, d, d/G) and B (Hkv, d, d/G): from a plan, or fitted here with
    ``calibration``, an iterable of batches (dicts of keyword arguments, tuples of positional
    ones, or tensors) that the model runs with exact attention while each layer's q and k (after
    RoPE) are recorded; each layer's maps are then fitted on its q and k over all batches
    (:func:`distr_compile.projection.fit_projection`). Calibrate on windows as long as those the
    model will run: with RoPE, maps fitted on short windows do not fit later positions. The
    batches must share one sequence length. The maps are stored on the attention modules as
    non-persistent buffers (they follow ``model.to()`` and ``copy.deepcopy``, and stay out of
    ``state_dict``), or as parameters with ``trainable_maps=True`` so that fine-tuning trains them
    too (then they are in ``state_dict`` and ``model.parameters()``). Maps that do not fit a
    layer's heads and head dim are an error. :func:`configured_plan` gives the fitted (or
    trained) maps as a plan to save and apply to another copy of the model.

    Unless ``setting`` is None, the model is switched to ``attn_implementation="distr"`` if it uses
    another (``model.set_attn_implementation``). Active attention dropout (training with
    ``attention_dropout > 0``) runs exact attention, as the backend does. Configure before wrapping
    the model (PEFT, DDP): paths are taken from ``model``. Returns ``model``, configured in place.
    """
    if setting is not None and not isinstance(setting, (DistrConfig, DistrPlan)):
        raise TypeError(f"setting must be a DistrConfig, a DistrPlan or None, got {type(setting).__name__}")
    projecting = isinstance(setting, DistrConfig) and setting.grouping == "projection" and not setting.exact
    if projecting and calibration is None:
        raise ValueError(NEEDS_MAPS)
    if calibration is not None and not projecting:
        raise ValueError("calibration= fits projection maps: it goes with a DistrConfig of grouping='projection' "
                         f"and G > 1, got {setting!r}")
    modules = dict(model.named_modules())
    configs: dict[str, DistrConfig] = {}
    maps: dict[str, Maps] = {}
    if isinstance(setting, DistrPlan):
        configs = plan_configs(setting, modules, type(model).__name__)
        maps = plan_maps(setting)
    elif projecting:
        maps = fit_maps(model, setting, calibration)
    if trainable_maps and not maps:
        raise ValueError("trainable_maps=True trains projection maps, and this setting has none")
    chosen = {path: setting if isinstance(setting, DistrConfig) else configs.get(path) for path in modules}
    if setting is not None:  # every check before the first change: a failing call leaves the model as it was
        _check_selectable(model)
        for path, module in modules.items():
            check_layer(module, path, chosen[path], maps.get(path))
    for path, module in modules.items():
        for name in MAPS:
            if hasattr(module, name):
                delattr(module, name)
        if setting is None:
            module.__dict__.pop(LAYER_ATTRIBUTE, None)
            continue
        setattr(module, LAYER_ATTRIBUTE, DistrLayer(path, chosen[path]))
        if path in maps:
            attach_maps(module, maps[path], trainable_maps)
    if setting is not None:
        select_attention(model, "distr")
    return model


def configured_plan(model: nn.Module) -> DistrPlan:
    """The calibrated projection of a model configured by :func:`configure` (with ``calibration``,
    or maps trained since), as a plan: one site per attention layer holding maps, with its G, maps
    and the config's knobs. ``plan.save(path)`` writes it (the maps as safetensors beside the JSON);
    ``configure(other_copy, DistrPlan.load(path))`` applies it again without refitting."""
    sites, config = {}, None
    for path, module in model.named_modules():
        layer: DistrLayer | None = getattr(module, LAYER_ATTRIBUTE, None)
        if layer is None or layer.config is None or not hasattr(module, MAPS[0]):
            continue
        a, b = (getattr(module, name).detach() for name in MAPS)
        config = config or layer.config
        sites[path] = SiteDecision(path, "attn_implementation='distr'", f"A{tuple(a.shape)} B{tuple(b.shape)}",
                                   layer.config.group_size, "calibrated projection maps", "configured",
                                   grouping="projection", maps=(a, b))
    if not sites:
        raise ValueError("no attention layer of this model holds projection maps: configure it with a DistrConfig of "
                         "grouping='projection' and calibration=batches first")
    return DistrPlan(plan_config(config), sites)


def plan_configs(plan: DistrPlan, modules: dict[str, nn.Module], model_name: str) -> dict[str, DistrConfig]:
    """Each site's DistrConfig (its G and grouping with the plan's knobs; sites the backend left
    alone are exact), checking that every site names a module."""
    base = DistrConfig(**plan.config)
    configs = {name: base.replace(group_size=d.group_size, grouping=d.grouping) for name, d in plan.sites.items()}
    configs |= {name: base.replace(group_size=EXACT) for name in plan.skipped}
    unknown = sorted(set(configs) - set(modules))
    if unknown:
        found = next((p for p in modules if p.endswith("." + unknown[0])), None)
        hint = "" if found is None else (f"; {unknown[0]!r} is at {found!r} here: the plan was made on the "
                                         f"submodule {found.removesuffix('.' + unknown[0])!r}, configure that")
        raise ValueError(f"the plan names {len(unknown)} site(s) that are no module path of this {model_name}: "
                         f"{unknown[:5]}{hint}")
    return configs


def plan_maps(plan: DistrPlan) -> dict[str, Maps]:
    """The maps of the plan's projected sites, by site name; a projected site without maps is an error."""
    missing = [name for name, d in plan.sites.items() if d.projected and d.maps is None]
    if missing:
        raise ValueError(f"the plan's sites {missing[:5]} use grouping='projection' without maps; {NEEDS_MAPS}")
    return {name: d.maps for name, d in plan.sites.items() if d.projected}


def fit_maps(model: nn.Module, config: DistrConfig, batches: Iterable) -> dict[str, Maps]:
    """Each attention layer's projection maps at ``config.group_size``, by module path, fitted on
    its q and k (after RoPE) as ``model`` computes them with exact attention on ``batches``."""
    from .hf_attention import capturing

    paths = {module: path for path, module in model.named_modules()}
    with capturing(model) as calls:
        for batch in batches:
            call_batch(model, batch)
    if not calls:
        raise ValueError("no attention layer of the model ran on the calibration batches")
    return {paths[module]: fit_layer(paths[module], layer_calls, config.group_size)
            for module, layer_calls in calls.items()}


@dataclass(frozen=True)
class AttentionCall:
    """What one attention call saw: q (B, Hq, Lq, d) and k (B, Hkv, Lk, d) as attention reads them
    (after RoPE), SDPA's mask (with a position bias in it) and causal flag, and the softmax scale."""

    q: torch.Tensor
    k: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    scale: float | None


def fit_layer(path: str, calls: list[AttentionCall], group_size: int) -> Maps:
    """(A, B) fitted on one layer's calls, stacked along the batch (float32, autocast off)."""
    if len({(c.q.shape[1:], c.k.shape[1:]) for c in calls}) > 1:
        raise ValueError(f"the calibration batches reach {path!r} with q and k of different shapes "
                         f"{sorted({(tuple(c.q.shape), tuple(c.k.shape)) for c in calls})}: give batches of one "
                         "sequence length")
    q, k = torch.cat([c.q for c in calls]), torch.cat([c.k for c in calls])
    with torch.autocast(q.device.type, enabled=False):
        return fit_projection(q, k, group_size, scale=calls[0].scale, **stacked_masks(calls))


def stacked_masks(calls: list[AttentionCall]) -> dict[str, Any]:
    """``fit_projection``'s mask arguments for the calls stacked along the batch: their common
    ``is_causal`` when none has a mask, else one additive mask (B, 1 or Hq, Lq, Lk) for all (Hq
    where a mask has heads: a position bias)."""
    if all(c.mask is None for c in calls) and len({c.is_causal for c in calls}) == 1:
        return {"is_causal": calls[0].is_causal}
    biases = [mask_bias(c.q.shape[-2], c.k.shape[-2], is_causal=c.is_causal, attn_mask=c.mask, device=c.q.device)
              for c in calls]
    heads = max(b.shape[-3] if b.dim() > 2 else 1 for b in biases)
    return {"attn_mask": torch.cat([b.expand(c.q.shape[0], heads, *b.shape[-2:]) for b, c in zip(biases, calls)])}


def attach_maps(module: nn.Module, maps: Maps, trainable: bool) -> None:
    """Store ``maps`` on the attention ``module`` (float32, on its device) as non-persistent
    buffers, or parameters when ``trainable`` (checked by :func:`check_layer` first)."""
    device = next(module.parameters(), maps[0]).device
    for name, m in zip(MAPS, maps):
        m = m.detach().to(device, torch.float32, copy=True)
        if trainable:
            module.register_parameter(name, nn.Parameter(m))
        else:
            module.register_buffer(name, m, persistent=False)


def check_layer(module: nn.Module, path: str, config: DistrConfig | None, maps: Maps | None) -> None:
    """A ValueError unless ``config``'s G divides the head dim of ``module`` (where it declares
    one) and its maps, if any, fit it."""
    d = getattr(module, "head_dim", None)
    if config is not None and isinstance(d, int) and d % config.group_size:
        raise ValueError(f"{path!r} has head dim {d}, not divisible by group_size {config.group_size}")
    if maps is not None:
        check_maps(module, path, config.group_size, maps)


def check_maps(module: nn.Module, path: str, group_size: int, maps: Maps) -> None:
    """A ValueError unless A is (Hq, d, d/G) and B (Hkv, d, d/G), with Hq, Hkv and d the module's
    own where it declares them (``module.config``'s head counts, ``module.head_dim``)."""
    a, b = maps
    d = getattr(module, "head_dim", a.shape[-2])
    hq = getattr(getattr(module, "config", None), "num_attention_heads", a.shape[0])
    hkv = getattr(getattr(module, "config", None), "num_key_value_heads", b.shape[0])
    want = ((hq, d, d // group_size), (hkv, d, d // group_size))
    if (tuple(a.shape), tuple(b.shape)) != want or d % group_size:
        raise ValueError(f"projection maps A {tuple(a.shape)}, B {tuple(b.shape)} do not fit {path!r} at "
                         f"G={group_size}: expected A {want[0]}, B {want[1]} (heads, head dim, head dim / G)")


def layer_maps(module: nn.Module, config: DistrConfig) -> Maps | None:
    """The maps ``module``'s attention runs with: (A, B) for a projection, else None."""
    if config.grouping != "projection":
        return None
    if not hasattr(module, MAPS[0]):
        raise ValueError(f"attention at {getattr(module, LAYER_ATTRIBUTE).path!r} has no projection maps; {NEEDS_MAPS}")
    return getattr(module, MAPS[0]), getattr(module, MAPS[1])


def _uses_distr(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "distr"


def _check_selectable(model: nn.Module) -> None:
    """A TypeError unless ``model`` is a transformers model, a ValueError where transformers finds
    that its attention does not call the attention interface (Bloom, GPT-Neo): configured, it would
    stay exact without a word. ``_can_set_attn_implementation`` is transformers' own test of that."""
    if not _uses_distr(model) and not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"configure needs a transformers model (set_attn_implementation), got {type(model).__name__}")
    calls_interface = getattr(model, "_can_set_attn_implementation", None)
    if callable(calls_interface) and not calls_interface():
        raise ValueError(f"{type(model).__name__}'s attention does not call transformers' attention interface, so "
                         "attn_implementation='distr' cannot reach it: its attention layers would stay exact")


def select_attention(model: nn.Module, name: str) -> None:
    """Run ``model`` and each of its submodels with the attention implementation ``name``
    (``set_attn_implementation``): transformers 5.17 leaves out the submodels whose config is of
    the model's class, as T5's encoder and decoder, which hold copies of its config."""
    for module in model.modules():
        selected = getattr(getattr(module, "config", None), "_attn_implementation", name)
        if selected != name and callable(getattr(module, "set_attn_implementation", None)):
            module.set_attn_implementation(name)


def layer_config(module: nn.Module, dropout: float) -> DistrConfig | None:
    """The config ``module``'s attention runs DistrAttention with, or None for exact attention
    (unconfigured, G=1, or active dropout; the first two of those say so once)."""
    layer: DistrLayer | None = getattr(module, LAYER_ATTRIBUTE, None)
    if layer is None:
        say_once(UNCONFIGURED)
        return None
    if layer.config is None:
        raise ValueError(f"attention at {layer.path!r} has no decision in the plan given to distr_compile.configure; "
                         "a plan must name every attention layer of the model")
    if layer.config.exact:
        return None
    if dropout > 0.0:
        say_once(DROPOUT)
        return None
    return layer.config


@functools.cache
def say_once(message: str) -> None:
    """Warn with ``message`` once per process (not once per layer and call)."""
    warnings.warn(message, stacklevel=4)


# --------------------------------------------------------------------------- registration


def register_when_imported() -> None:
    """Register "distr" with transformers right after its modeling code is imported (now if it
    is); nothing if transformers is not installed."""
    if MODELING in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _AfterImport(MODELING, _register))


def _register() -> None:
    try:  # the module registers "distr" as its import ends: this hook may run inside that import
        importlib.import_module(".hf_attention", __package__)
    except Exception as e:  # never break transformers' import: "distr" is then just unavailable
        warnings.warn(f"distr_compile could not register attn_implementation='distr' with transformers: {e!r}",
                      stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A post-import hook: finds the module ``name`` with the other finders, runs it with its own
    loader, then calls ``hook``. Removes itself once used."""

    def __init__(self, name: str, hook: Callable[[], None]) -> None:
        self.name, self.hook, self.loader = name, hook, None

    def find_spec(self, fullname: str, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        specs = (f.find_spec(fullname, path, target) for f in sys.meta_path if hasattr(f, "find_spec"))
        spec = next((s for s in specs if s is not None), None)
        if spec is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        self.loader.exec_module(module)
        self.hook()
