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
maps modules to layers.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch.nn as nn

from .config import DistrConfig
from .guard import EXACT, DistrPlan

LAYER_ATTRIBUTE = "distr_layer"
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


@dataclass(frozen=True)
class DistrLayer:
    """What one module computes under ``attn_implementation="distr"``.

    ``path`` is the module's path in the configured model (a plan's site name); ``config`` is its
    DistrConfig (``group_size=1``: exact attention), or None when the plan applied has no decision
    for the module (an error if it computes attention). A per-layer payload that a config cannot
    hold (calibrated projections, say) belongs here as a further field."""

    path: str
    config: DistrConfig | None


def configure(model: nn.Module, setting: DistrConfig | DistrPlan | None) -> nn.Module:
    """Set what every attention layer of a transformers model computes, and select "distr" for it.

    ``setting``:

    * a :class:`DistrConfig`: every attention layer runs DistrAttention with it (``group_size=1``:
      exact attention through the op);
    * a :class:`DistrPlan` (``distr_compile.plan_of(compiled)``, ``calibrate(...)`` or
      ``DistrPlan.load(path)``): each site takes its own G, with the knobs the plan was made with,
      matched to the module of the same path (the names the backend gives when ``model`` itself is
      compiled, e.g. ``model.layers.3.self_attn``). A site name that is no module path of ``model``
      is an error, as is a layer the plan does not name when it computes attention: a plan applies
      whole or not at all;
    * None: remove the setting (exact attention, with a reminder).

    Unless ``setting`` is None, the model is switched to ``attn_implementation="distr"`` if it uses
    another (``model.set_attn_implementation``). Active attention dropout (training with
    ``attention_dropout > 0``) runs exact attention, as the backend does. Configure before wrapping
    the model (PEFT, DDP): paths are taken from ``model``. Returns ``model``, configured in place.
    """
    if setting is not None and not isinstance(setting, (DistrConfig, DistrPlan)):
        raise TypeError(f"setting must be a DistrConfig, a DistrPlan or None, got {type(setting).__name__}")
    modules = dict(model.named_modules())
    configs = plan_configs(setting, modules, type(model).__name__) if isinstance(setting, DistrPlan) else {}
    for path, module in modules.items():
        if setting is None:
            module.__dict__.pop(LAYER_ATTRIBUTE, None)
        else:
            config = setting if isinstance(setting, DistrConfig) else configs.get(path)
            setattr(module, LAYER_ATTRIBUTE, DistrLayer(path, config))
    if setting is not None:
        _select_distr(model)
    return model


def plan_configs(plan: DistrPlan, modules: dict[str, nn.Module], model_name: str) -> dict[str, DistrConfig]:
    """Each site's DistrConfig (its G with the plan's knobs; sites the backend left alone are
    exact), checking that every site names a module."""
    base = DistrConfig(**plan.config)
    configs = {name: base.replace(group_size=d.group_size) for name, d in plan.sites.items()}
    configs |= {name: base.replace(group_size=EXACT) for name in plan.skipped}
    unknown = sorted(set(configs) - set(modules))
    if unknown:
        found = next((p for p in modules if p.endswith("." + unknown[0])), None)
        hint = "" if found is None else (f"; {unknown[0]!r} is at {found!r} here: the plan was made on the "
                                         f"submodule {found.removesuffix('.' + unknown[0])!r}, configure that")
        raise ValueError(f"the plan names {len(unknown)} site(s) that are no module path of this {model_name}: "
                         f"{unknown[:5]}{hint}")
    return configs


def _select_distr(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "distr":
        return
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"configure needs a transformers model (set_attn_implementation), got {type(model).__name__}")
    model.set_attn_implementation("distr")


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
    try:
        from .hf_attention import register
        register()
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
