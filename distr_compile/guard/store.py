"""The decision store: decisions and left-alone sites per owner (a model, or the ``torch.compile``
call its graphs come from), so recompiles reuse them and :func:`plan_of` finds them."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch._dynamo.eval_frame import innermost_backend
from torch._dynamo.symbolic_convert import InstructionTranslator

from ..config import DistrConfig
from ..passes import SiteNames, SkippedSite
from .plan import DistrPlan, SiteDecision, plan_config


@dataclass(frozen=True)
class Owner:
    """Who stored decisions belong to, by ``id``; they count only while every object ``refs``
    (weak references) point to is alive, since ids are reused after an object dies. See
    :func:`owners`."""

    id: int
    refs: tuple[weakref.ref, ...]

    @property
    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


def owners(module_id: int | None, example_inputs: list) -> list[Owner]:
    """The owners of a site of a graph with these inputs, each of which keeps its decisions:

    * the model: the site's module (the ``id`` in Dynamo's ``nn_module_stack``) or, for code of
      the compiled root module itself, the first parameter among the graph inputs, valid while
      the graph's parameters live. Recompiles and :func:`calibrate` share decisions through it.
    * the ``torch.compile`` call the graph comes from (:func:`compile_call`), which every graph of
      a compiled model or function shares, whatever owns the attention: a root module without
      parameters, code after a graph break, a plain function.
    """
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    model_id = module_id if module_id is not None else (id(params[0]) if params else None)
    found = [] if model_id is None else [Owner(model_id, tuple(weakref.ref(p) for p in params))]
    call = compile_call()
    if call is not None:
        found.append(Owner(id(call), (weakref.ref(call),)))
    return found


def compile_call() -> Any | None:
    """The ``torch.compile`` call whose graph the backend is compiling (Dynamo's wrapper of the
    backend and its options, one per call, kept alive by the compiled object), or None outside
    Dynamo (``torch.export``, a direct call)."""
    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:  # never set in this thread: not inside Dynamo
        return None
    backend = getattr(getattr(tx, "output", None), "compiler_fn", None)
    return None if backend is None else _as_compile_call(innermost_backend(backend))


_SITE_NAMES: dict[int, SiteNames] = {}  # by id of a live torch.compile call (which is not hashable)


def site_names() -> SiteNames:
    """The site names of the ``torch.compile`` call being compiled (:func:`compile_call`), shared
    by every graph of its model or function (:class:`SiteNames`), so that sites of different
    graphs never share a name, and with it a decision; fresh ones outside such a call."""
    call = compile_call()
    if call is None:
        return SiteNames()
    if id(call) not in _SITE_NAMES:
        _SITE_NAMES[id(call)] = SiteNames()
        weakref.finalize(call, _SITE_NAMES.pop, id(call), None)
    return _SITE_NAMES[id(call)]


def compile_call_of(compiled: Any) -> Any | None:
    """The ``torch.compile`` call behind ``compiled`` (see :func:`compile_call`), or None if it is
    not the result of one. A compiled module keeps Dynamo's context as ``dynamo_ctx``, a compiled
    function only in the closure of its ``get_compiler_config``."""
    context = getattr(compiled, "dynamo_ctx", None)
    if context is None:
        cells = getattr(getattr(compiled, "get_compiler_config", None), "__closure__", None) or ()
        context = next((c.cell_contents for c in cells if hasattr(c.cell_contents, "callback")), None)
    callback = getattr(context, "callback", None)
    return None if callback is None else _as_compile_call(innermost_backend(callback))


def _as_compile_call(backend: Any) -> Any | None:
    # A backend passed to torch._dynamo.optimize directly is shared by every model: not an owner.
    return backend if isinstance(backend, torch._TorchCompileWrapper) else None


_Entry = tuple[Owner, SiteDecision | SkippedSite]


class DecisionStore:
    """Decisions and left-alone sites per (owner, site name, config), see :func:`owners`:
    recompiles of the same model with the same options reuse them, and :func:`plan_of` finds them
    from the model or the compiled object. Also the config each owner's graphs were last compiled
    with, so a model without attention has an (empty) plan too."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, DistrConfig], _Entry] = {}
        self._configs: dict[int, tuple[Owner, DistrConfig]] = {}

    def get(self, whos: Iterable[Owner], name: str, config: DistrConfig) -> SiteDecision | None:
        """The first live decision for site ``name`` under ``config`` of one of ``whos``."""
        for who in whos:
            entry = self._entries.get((who.id, name, config))
            if entry and entry[0].alive and isinstance(entry[1], SiteDecision):
                return entry[1]
        return None

    def put(self, whos: Iterable[Owner], item: SiteDecision | SkippedSite, config: DistrConfig) -> None:
        """Remember a decision or a left-alone site for each of ``whos`` (replacing what they had
        for that site and config)."""
        whos = list(whos)
        self.compiled_with(whos, config)
        keys = {(who.id, item.name, config) for who in whos}
        self._entries = {k: e for k, e in self._entries.items() if e[0].alive and k not in keys}
        self._entries.update({(who.id, item.name, config): (who, item) for who in whos})

    def compiled_with(self, whos: Iterable[Owner], config: DistrConfig) -> None:
        """Note that a graph of ``whos`` was compiled with ``config`` (the latest one makes plans)."""
        whos = list(whos)
        ids = {who.id for who in whos}
        self._configs = {k: c for k, c in self._configs.items() if c[0].alive and k not in ids}
        self._configs.update({who.id: (who, config) for who in whos})

    def plan_for(self, owner_ids: set[int]) -> DistrPlan | None:
        """The entries of ``owner_ids`` under the config they last compiled with, as a plan."""
        configs = [cfg for oid, (who, cfg) in self._configs.items() if oid in owner_ids and who.alive]
        if not configs:
            return None
        config = configs[-1]
        plan = DistrPlan(plan_config(config))
        for (oid, _, cfg), (who, item) in self._entries.items():
            if oid in owner_ids and cfg == config and who.alive:
                (plan.sites if isinstance(item, SiteDecision) else plan.skipped)[item.name] = item
        return plan


STORE = DecisionStore()


def remember_graph(example_inputs: list, left_alone: Iterable[SkippedSite], config: DistrConfig) -> None:
    """Note that the graph with ``example_inputs`` compiles with ``config`` (so a model without
    attention has a plan too) and store the sites it leaves alone, each for its owners."""
    STORE.compiled_with(owners(None, example_inputs), config)
    for item in left_alone:
        STORE.put(owners(item.module_id, example_inputs), item, config)



def owner_ids(compiled: Any) -> set[int]:
    """Every owner id (:func:`owners`) a site of ``compiled`` can have: a module (compiled or not)
    or a function compiled with ``backend="distr"``."""
    call = compile_call_of(compiled)
    ids = set() if call is None else {id(call)}
    model = getattr(compiled, "_orig_mod", compiled)
    if isinstance(model, torch.nn.Module):
        return ids | {id(m) for m in model.modules()} | {id(p) for p in model.parameters()}
    if not ids:
        raise TypeError(f"expected a module, or a module or function compiled with backend='distr', "
                        f"got {type(compiled).__name__}")
    return ids


def plan_of(compiled: Any) -> DistrPlan:
    """The plan of a module or function compiled with ``backend="distr"`` (after at least one
    call): every site of every graph compiled so far, decided or left alone."""
    plan = STORE.plan_for(owner_ids(compiled))
    if plan is None:
        raise ValueError("no distr decisions for this model: compile it with backend='distr' and call it first")
    return plan

