"""Attention masks the graph can do without, and constant mask fill values given as tensors.

Under torch.compile, Hugging Face models build their SDPA mask as a (B, 1, Lq, Lk) bool tensor even
where eager runs pass none (transformers 5.17: every ViT, and every decoder without a cache: the
causal pattern; with a padding mask, the padding row broadcast over queries). A fused kernel then
has to read B x Lq x Lk booleans, and on CUDA a mask of that shape rules out flash and cuDNN
(Inductor falls back to the unfused math path for ViT-base at 518 px). :func:`simplify_mask`
finds the exact simpler form:

* a mask that is a constant of the graph and all True (or all zero, additive) is no mask;
* a constant mask equal to SDPA's ``is_causal`` pattern becomes ``is_causal=True``;
* otherwise, for a bool mask, ``expand``, a same-dtype ``to`` and ``&`` with a constant all-True
  operand are peeled off while the rest still broadcasts to the original shape: HF's padding mask
  reaches the kernel as the (B, 1, 1, Lk) row it was made from (SDPA broadcasts masks), unless
  something writes to that row in place. Additive masks are not peeled: one may be a learned bias
  whose gradient has the expanded shape.

For sites that stay SDPA, :func:`additive_row` then turns such a bool row into the equivalent
additive row, which SDPA's fastest CUDA kernel (cuDNN) takes.

A node is a constant only when no placeholder (input, parameter, buffer, symbolic size) and no
``get_attr`` is among its ancestors, no random or uninitialised op, and no op outside those
ancestors writes to their memory (``mask.triu_(-2)``, ``m[1, ..., 5:] = -inf``, ``out=m``, through a
view or not): its value is then computed once, here, by replaying the ancestors. A fill value
qualifies on the same terms.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

MAX_ELEMENTS = 1 << 28  # larger masks are not evaluated (256M booleans, e.g. B=4 at 8k tokens)
log = logging.getLogger("distr_compile")
_UNSAFE = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty", "poisson")
_AND_FUNCS = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "__rand__", "logical_and", "bitwise_and"}
# Python's in-place operators: ``m += 1`` is ``operator.iadd`` in a Dynamo graph, ``m[i] = x`` is
# ``operator.setitem``.
_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow",
                                             "lshift", "rshift", "and", "or", "xor")} | {"__setitem__"}
_INPLACE_OPERATORS = {getattr(operator, name.strip("_")) for name in _INPLACE_DUNDERS}
_OPERATORS = {f for f in vars(operator).values() if callable(f)}


class SimplerMask(NamedTuple):
    """What an SDPA call can take instead of its mask: ``mask`` (None: no mask) and ``is_causal``;
    ``how`` says what changed, for reports."""

    mask: fx.Node | None
    is_causal: bool
    how: str


def simplify_mask(mask: fx.Node) -> SimplerMask | None:
    """The exact simpler form of the SDPA ``attn_mask`` node ``mask`` (an SDPA call without
    ``is_causal``), or None if there is none."""
    value = _example(mask)
    if value is None or value.dim() < 2:
        return None
    computed = _checked_constant(mask, value)
    if computed is not None:
        if _is_neutral(computed):
            return SimplerMask(None, False, "constant all-attend mask dropped")
        lq, lk = computed.shape[-2:]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=computed.device).tril()
        if computed.dtype == torch.bool and torch.equal(computed, causal.expand_as(computed)):
            return SimplerMask(None, True, "constant causal mask as is_causal")
        return None
    peeled = _peel(mask, value) if value.dtype == torch.bool else mask
    if peeled is mask:
        return None
    return SimplerMask(peeled, False, f"mask {tuple(value.shape)} read as {tuple(_example(peeled).shape)}")


def additive_row(mask: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    """For a bool mask that is one row per query block (shape (..., 1, Lk), e.g. a padding row), an
    additive mask of ``dtype`` (0 where True, -inf where False) computed once after it; None for
    other masks. SDPA computes the same with either (a query whose keys are all masked gets SDPA's
    result for such a row either way), but on CUDA its fastest kernel (cuDNN) takes additive masks
    only: with the bool row SDPA runs a slower one (BERT-base, 512 tokens, H200: 0.080 vs 0.116 ms
    per attention)."""
    value = _example(mask)
    if value is None or value.dtype != torch.bool or value.dim() < 2 or value.shape[-2] != 1:
        return None
    graph = mask.graph
    with graph.inserting_after(mask):
        fill = graph.call_function(torch.full_like, (mask, float("-inf")), {"dtype": dtype})
    with graph.inserting_after(fill):
        row = graph.call_method("masked_fill", (fill, mask, 0.0))
    fill.meta["example_value"] = torch.full_like(value, float("-inf"), dtype=dtype)
    row.meta["example_value"] = fill.meta["example_value"].masked_fill(value, 0.0)
    return row


def _checked_constant(mask: fx.Node, value: torch.Tensor) -> torch.Tensor | None:
    """``mask``'s value if it is a graph constant small enough to evaluate (logged when too large)."""
    if value.numel() > MAX_ELEMENTS:
        if _constant_ancestors(mask) is not None:
            log.info("constant mask %s of shape %s is not evaluated (over %d elements): it stays a mask",
                     mask.name, tuple(value.shape), MAX_ELEMENTS)
        return None
    return constant_value(mask)


def _is_neutral(value: torch.Tensor) -> bool:
    """Whether the mask value changes nothing: all True (bool) or all zero (additive)."""
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())


def _peel(mask: fx.Node, value: torch.Tensor) -> fx.Node:
    """The innermost ancestor of ``mask`` reached through ``expand``, same-dtype ``to`` and ``&`` with
    a constant all-True operand, that has ``mask``'s dtype and device and broadcasts to its shape
    (so SDPA computes the same with it), and whose memory no other node writes to (SDPA reads it
    later than ``&`` did)."""
    node = mask
    while (inner := _peel_one(node)) is not None:
        have = _example(inner)
        if (have is None or have.dtype != value.dtype or have.device != value.device
                or _broadcast(have.shape, value.shape) != tuple(value.shape) or _written_elsewhere({inner})):
            break
        node = inner
    return node


def _peel_one(node: fx.Node) -> fx.Node | None:
    if node.op == "call_method" and node.target in ("expand", "to"):
        return node.args[0]
    is_and = (node.op == "call_function" and node.target in _AND_FUNCS
              or node.op == "call_method" and node.target in _AND_METHODS)
    if not is_and or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    for keep, drop in ((a, b), (b, a)):
        if isinstance(keep, fx.Node) and _all_true(drop):
            return keep
    return None


def _all_true(x) -> bool:
    if isinstance(x, bool):
        return x
    if not isinstance(x, fx.Node):
        return False
    value = constant_value(x)
    return value is not None and value.dtype == torch.bool and bool(value.all())


def _broadcast(a, b) -> tuple | None:
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


def constant_value(node: fx.Node) -> torch.Tensor | None:
    """The value of ``node``, computed here on real tensors, if it is a tensor graph constant of
    static shape and at most ``MAX_ELEMENTS`` elements; else None."""
    value = _example(node)
    if value is None or value.numel() > MAX_ELEMENTS:
        return None
    nodes = _constant_ancestors(node)
    if nodes is None:
        return None
    try:
        return _evaluate(nodes, node)
    except Exception:  # an op that cannot run outside its graph: not a constant we can use
        return None


def _example(node: fx.Node) -> torch.Tensor | None:
    """The node's example tensor if its shape is static."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor) or not all(isinstance(s, int) for s in value.shape):
        return None
    return value


def _constant_ancestors(node: fx.Node) -> list[fx.Node] | None:
    """``node`` and its ancestors in graph order, or None if one of them makes it non-constant."""
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n.op not in ("call_function", "call_method") or any(word in str(n.target) for word in _UNSAFE):
            return None
        for parent in n.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    if _written_elsewhere(seen):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _written_elsewhere(nodes: set[fx.Node]) -> bool:
    """Whether a node outside ``nodes`` may write to the memory of one of them: to it or to an alias
    (a neighbour in the graph, input or user, whose example value shares a storage with it, and so
    on). Writes by ``nodes`` themselves are fine: a closure evaluated replays them in order. A
    neighbour whose value was not recorded counts as a write, since its aliases cannot be told."""
    storages = set()
    for n in nodes:
        if (found := _storages(n)) is None:
            return True
        storages |= found
    aliases, todo = set(nodes), list(nodes)
    while todo:
        n = todo.pop()
        for other in (*n.all_input_nodes, *n.users):
            if other in nodes or other.op == "output":
                continue
            if n in _written(other) or (found := _storages(other)) is None:
                return True
            if found & storages and other not in aliases:
                aliases.add(other)
                todo.append(other)
    return False


def _storages(node: fx.Node) -> set[StorageWeakRef] | None:
    """The storages of the tensors in ``node``'s example value, None if it has none recorded."""
    for key in ("example_value", "val"):
        if key in node.meta:
            leaves = tree_leaves(node.meta[key])
            return {StorageWeakRef(t.untyped_storage()) for t in leaves if isinstance(t, torch.Tensor)}
    return None


def _written(node: fx.Node) -> list[fx.Node]:
    """The inputs ``node`` may write to: its ``out=`` and, if it works in place, its first input;
    for an ATen op, the arguments its schema marks as written; every input of a submodule."""
    if node.op == "call_module":
        return node.all_input_nodes
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        schemas = ([target._schema] if isinstance(target, torch._ops.OpOverload)  # a packet: any of its overloads
                   else [getattr(target, overload)._schema for overload in target.overloads()])
        return _nodes([node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                       for schema in schemas for i, arg in enumerate(schema.arguments)
                       if arg.alias_info is not None and arg.alias_info.is_write])
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return _nodes((first if _in_place(node) else None, node.kwargs.get("out")))


def _in_place(node: fx.Node) -> bool:
    """Whether a call writes to its first input, by PyTorch's conventions: a name ending in ``_``
    (``mask.triu_(-2)``, ``torch.relu_``), an in-place operator or setitem, ``inplace=True``."""
    target = node.target
    if target in _OPERATORS:  # operator.and_ is ``a & b``: the suffix means nothing there
        return target in _INPLACE_OPERATORS
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name in _INPLACE_DUNDERS or _inplace_flag(node)


def _inplace_flag(node: fx.Node) -> bool:
    """Whether a Python function is called with ``inplace`` set (``F.relu(x, inplace=True)``,
    ``F.dropout(x, 0.1, False, True)``)."""
    if node.op != "call_function":
        return False
    try:
        arguments = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):  # a builtin without a signature, or not a call it accepts
        arguments = node.kwargs
    return arguments.get("inplace", False) is not False


def _nodes(arg) -> list[fx.Node]:
    """The nodes in a (nested) argument."""
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def _evaluate(nodes: list[fx.Node], out: fx.Node) -> torch.Tensor:
    """Run ``nodes`` (closed under inputs) as their own graph, on real tensors."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[out])
    with unset_fake_temporarily(), torch.no_grad():
        return fx.GraphModule(torch.nn.Module(), graph)()
