"""``torch.export`` support: exported programs with ``distr::attention`` where the guard allows.

``export(model, args)`` is ``torch.export.export`` followed by :func:`rewrite_exported`, so a model
that does not export fails with PyTorch's own error, untouched. :func:`rewrite_exported` works on
any program from ``torch.export.export`` (before ``run_decompositions``):

1. unlift it (``program.module()``: the model's call signature, weights at their FQNs);
2. give the attention-related aten nodes the targets they have in a Dynamo graph
   (``aten.softmax.int`` -> ``torch.softmax``, same arguments), so the backend's matcher, guard and
   rewrite run unchanged and name the sites as the backend does (``layers.3.self_attn``, the keys of a
   saved ``DistrPlan``);
3. decide each site exactly as the ``distr`` backend does (plan, ``approximate``, calibration on the
   real example inputs) and rewrite the approximated ones to ``torch.ops.distr.attention``;
4. export that module again with the program's own dynamic shapes, which turns it back into a clean
   ATen program. A program with no approximated site is returned as it came.

The op survives ``run_decompositions()`` (it is not CompositeImplicit, so no table decomposes it),
``torch.export.save``/``load`` (the loading process must ``import distr_compile`` first, which
registers the op) and AOTInductor, which compiles the op's Triton kernels into the package.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
from typing import Any, Mapping

import sympy
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from .config import ConfigError, DistrConfig
from .guard import DistrPlan, decide_graph
from .passes import AttentionSite, find_attention, rewrite_attention
from .passes.match import SDPA
from .passes.rewrite import PROVENANCE

aten = torch.ops.aten

# aten overload -> (fx op, target) of the same call in a Dynamo graph; arguments are identical.
_DYNAMO_SPELLING: dict[torch._ops.OpOverload, tuple[str, Any]] = {
    aten.scaled_dot_product_attention.default: ("call_function", SDPA),
    aten.softmax.int: ("call_function", torch.softmax),
    aten.matmul.default: ("call_function", torch.matmul),
    aten.bmm.default: ("call_function", torch.bmm),
    aten.einsum.default: ("call_function", torch.einsum),
    aten.mul.Tensor: ("call_function", torch.mul),
    aten.mul.Scalar: ("call_function", torch.mul),
    aten.div.Tensor: ("call_function", torch.div),
    aten.div.Scalar: ("call_function", torch.div),
    aten.div.Tensor_mode: ("call_function", torch.div),
    aten.add.Tensor: ("call_function", torch.add),
    aten.masked_fill.Scalar: ("call_function", torch.masked_fill),
    aten.masked_fill.Tensor: ("call_function", torch.masked_fill),
    aten.where.self: ("call_function", torch.where),
    aten.where.ScalarSelf: ("call_function", torch.where),
    aten.where.ScalarOther: ("call_function", torch.where),
    aten.where.Scalar: ("call_function", torch.where),
    aten.dropout.default: ("call_function", torch.dropout),
    aten.transpose.int: ("call_function", torch.transpose),
    aten.permute.default: ("call_function", torch.permute),
    aten.unsqueeze.default: ("call_function", torch.unsqueeze),
    aten.repeat_interleave.self_int: ("call_function", torch.repeat_interleave),
    aten.reshape.default: ("call_function", torch.reshape),
    aten.view.default: ("call_method", "view"),
    aten.t.default: ("call_method", "t"),
    aten.to.dtype: ("call_method", "to"),
    aten.type_as.default: ("call_method", "type_as"),
}
# expand's optional third argument (implicit) has no Tensor.expand spelling: only (self, size).
_EXPAND = aten.expand.default
# Dtype checks export adds after ``.to``; as extra users they would hide the attention chain.
_METADATA_ASSERT = aten._assert_tensor_metadata.default


def export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    *,
    config: DistrConfig | Mapping[str, Any] | None = None,
    plan: DistrPlan | str | os.PathLike | None = None,
    dynamic_shapes: Any = None,
) -> ExportedProgram:
    """``torch.export.export(model, args, kwargs, dynamic_shapes=...)`` with DistrAttention.

    The attention sites the guard approximates (the same decisions as
    ``torch.compile(model, backend="distr", options=config)``: from ``plan``, from
    ``config.approximate``, or calibrated on ``args``/``kwargs``) become
    ``torch.ops.distr.attention`` nodes; everything else is exactly what ``torch.export`` gives.
    ``config`` is a :class:`DistrConfig` or its options dict. To calibrate on several batches,
    make the plan with ``distr_compile.calibrate(model, batches)`` and pass it as ``plan``.

    Errors of ``torch.export`` itself (a model that does not export) are raised unchanged.
    """
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    return rewrite_exported(program, args, kwargs, config=config, plan=plan)


def rewrite_exported(
    program: ExportedProgram,
    args: tuple | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    config: DistrConfig | Mapping[str, Any] | None = None,
    plan: DistrPlan | str | os.PathLike | None = None,
) -> ExportedProgram:
    """A copy of ``program`` (from ``torch.export.export``) with the attention sites the guard
    approximates rewritten to ``torch.ops.distr.attention``; ``program`` itself is not changed.

    ``args``/``kwargs`` are real inputs to calibrate on; by default the program's own example
    inputs. Dynamic dimensions of ``program`` stay dynamic. A program without an approximated
    site is returned as is. Pass the program before ``run_decompositions()``: decomposed
    attention is no longer recognised and is left alone. With a plan, the settings it was made
    with apply, as in the backend (:meth:`DistrPlan.settings`; of a :class:`DistrConfig`, the
    fields other than the defaults count as set).
    """
    config, given = _as_config(config)
    plan = _as_plan(config.plan if plan is None else plan)
    if plan is not None:
        config = plan.settings(config, given)
    if args is None and kwargs is None:
        if program.example_inputs is None:
            raise ValueError("rewrite_exported: this program has no example inputs; pass args/kwargs to calibrate on")
        args, kwargs = program.example_inputs
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    module = program.module()
    _to_dynamo_spelling(module.graph)
    flat_inputs = torch.fx._pytree.tree_flatten_spec((args, kwargs), program.call_spec.in_spec)
    sites, _ = find_attention(module.graph)
    decisions = decide_graph(module, flat_inputs, sites, config, plan)
    projected = [name for name, d in decisions.items() if d.projected]
    if projected:
        raise ConfigError(f"export does not take grouping='projection' sites yet ({projected}): compile with "
                          "torch.compile(backend='distr') instead")
    approximated = {name: config.replace(group_size=d.group_size, grouping=d.grouping)
                    for name, d in decisions.items() if d.approximated}
    if not approximated:
        return program
    chosen = [site for site in sites if site.name in approximated]
    for site in chosen:
        _keep_layout(module.graph, site)
    rewrite_attention(module.graph, chosen, approximated)
    module.recompile()
    return _reexport(module, _dynamic_shapes(program, module), args, kwargs)


def _as_config(config: DistrConfig | Mapping[str, Any] | None) -> tuple[DistrConfig, set[str]]:
    """The config and the fields the user set (an options dict's, a DistrConfig's other than the
    defaults), which a plan's settings must not contradict (:meth:`DistrPlan.settings`)."""
    if config is None:
        return DistrConfig(), set()
    if isinstance(config, DistrConfig):
        return config, {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
    if isinstance(config, Mapping):
        given = DistrConfig.fields_of(config)
        return DistrConfig(**given), set(given)
    raise TypeError(f"config must be a DistrConfig or a dict of its options, got {type(config).__name__}")


def _as_plan(plan: DistrPlan | str | os.PathLike | None) -> DistrPlan | None:
    if plan is None or isinstance(plan, DistrPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return DistrPlan.load(os.fspath(plan))
    raise TypeError(f"plan must be a DistrPlan or the path of a saved one, got {type(plan).__name__}")


def _to_dynamo_spelling(graph: fx.Graph) -> None:
    """Retarget, in place, the aten nodes the attention matcher reads to their Dynamo-graph
    spelling, give every node the ``example_value`` meta the matcher reads, and drop export's
    dtype assertions. The graph computes the same; :func:`rewrite_exported` re-exports it."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _METADATA_ASSERT and not node.users:
            graph.erase_node(node)
            continue
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
        if node.op != "call_function":
            continue
        if node.target in _DYNAMO_SPELLING:
            node.op, node.target = _DYNAMO_SPELLING[node.target]
        elif node.target is _EXPAND and len(node.args) == 2 and not node.kwargs:
            node.op, node.target = "call_method", "expand"


def _keep_layout(graph: fx.Graph, site: AttentionSite) -> None:
    """Make the site's output keep the memory layout the exported graph was traced with.

    Export drops a ``.contiguous()`` that was a no-op on SDPA's output (whose layout is
    (B, L, H, D) on most backends), so a later ``.view`` relies on that layout; the op returns
    another. A dense copy in the original dimension order, inserted between the output and its
    users, restores it (and export drops it again where it is a no-op).
    """
    val = site.output.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    order = sorted(range(val.dim()), key=lambda d: -val.stride(d))
    users = list(site.output.users)
    with graph.inserting_after(site.output):
        if order == sorted(order):
            created = [graph.call_method("contiguous", (site.output,))]
        else:
            inverse = sorted(range(len(order)), key=order.__getitem__)
            permuted = graph.call_method("permute", (site.output, order))
            with graph.inserting_after(permuted):
                packed = graph.call_method("contiguous", (permuted,))
            with graph.inserting_after(packed):
                created = [permuted, packed, graph.call_method("permute", (packed, inverse))]
    for node in created:  # the site's module path and stack trace, as the rewrite gives its nodes
        node.meta.update({k: site.output.meta[k] for k in PROVENANCE if k in site.output.meta})
    for user in users:
        user.replace_input_with(site.output, created[-1])


def _reexport(module: fx.GraphModule, dynamic_shapes: dict[str, Any], args: tuple, kwargs: dict) -> ExportedProgram:
    """Export the rewritten unlifted program again, replaying it node by node with each node's
    meta current, so the new program keeps the module paths (``nn_module_stack``) and stack
    traces of the original instead of those of one flat GraphModule."""
    signature = inspect.signature(module.forward)

    def replay(self: fx.GraphModule, *call_args: Any, **call_kwargs: Any) -> Any:
        # The program's placeholders are the leaves of its arguments in signature order.
        values = signature.bind(*call_args, **call_kwargs).arguments.values()
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(self).run(*values)

    replay.__signature__ = inspect.signature(type(module).forward)
    module.forward = types.MethodType(replay, module)
    return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)


def _dynamic_shapes(program: ExportedProgram, module: fx.GraphModule) -> dict[str, Any]:
    """The ``dynamic_shapes`` (by argument name of ``module``, the unlifted program) that export its user
    inputs with the program's dynamic dimensions: one :class:`Dim` per symbol, with the
    program's range; a dimension that is an expression of symbols is ``Dim.AUTO``."""
    dims: dict[sympy.Symbol, Any] = {}
    specs = []
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    # Every user input is a leaf of in_spec, constants too (a float kwarg has no placeholder).
    for spec in program.graph_signature.input_specs:
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT:
            continue
        node = placeholders.get(getattr(spec.arg, "name", None))
        val = node.meta.get("val") if node is not None else None
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        specs.append({i: _dim(s, program, dims) for i, s in enumerate(shape) if isinstance(s, torch.SymInt)} or None)
    spec_args, spec_kwargs = pytree.tree_unflatten(specs, program.call_spec.in_spec)
    names = module.graph._codegen.pytree_info.orig_args
    return {**dict(zip(names, spec_args)), **spec_kwargs}


def _dim(size: torch.SymInt, program: ExportedProgram, dims: dict[sympy.Symbol, Any]) -> Any:
    expr = size.node.expr
    if not isinstance(expr, sympy.Symbol):
        return Dim.AUTO
    if expr not in dims:
        bounds = program.range_constraints.get(expr)
        low = int(bounds.lower) if bounds is not None and bounds.lower.is_finite else 0
        high = int(bounds.upper) if bounds is not None and bounds.upper.is_finite else None
        dims[expr] = Dim(str(expr), min=low, max=high)
    return dims[expr]
