"""Graph constants: attention masks that are exactly causal (so a site can take ``is_causal=True``)
and constant mask fill values given as tensors (``torch.tensor(-inf)``).

Under torch.compile, Hugging Face decoders build their causal mask as a (B, 1, L, L) bool tensor
(eager runs pass ``is_causal`` instead). Handed to ``distr::attention`` as is, the kernel would
read B x L x L booleans and visit every key tile, twice the causal work. A mask qualifies only when
it is a constant of the graph: no placeholder (input, parameter, buffer, symbolic size) and no
``get_attr`` among its ancestors, and no random or uninitialised op. Its value is then computed
once, here, and must equal SDPA's ``is_causal`` pattern (top-left aligned lower triangle) at every
broadcast index. Anything else is left as it is. A fill value qualifies on the same terms.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

MAX_ELEMENTS = 1 << 28  # larger masks are not evaluated (256M booleans, e.g. B=4 at 8k tokens)
log = logging.getLogger("distr_compile")
_UNSAFE = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty", "poisson")


def is_constant_causal_mask(mask: fx.Node) -> bool:
    """Whether ``mask`` (an SDPA ``attn_mask`` node) is a bool graph constant equal to the causal
    pattern, so that ``attn_mask=mask`` can become ``is_causal=True`` without changing the result."""
    value = _example(mask)
    if value is None or value.dtype != torch.bool or value.dim() < 2:
        return False
    if value.numel() > MAX_ELEMENTS:
        log.info("mask %s of shape %s is not checked for the causal pattern (over %d elements): it stays a mask",
                 mask.name, tuple(value.shape), MAX_ELEMENTS)
        return False
    computed = constant_value(mask)
    if computed is None:
        return False
    lq, lk = computed.shape[-2:]
    causal = torch.ones(lq, lk, dtype=torch.bool, device=computed.device).tril()
    return computed.dtype == torch.bool and torch.equal(computed, causal.expand_as(computed))


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
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _evaluate(nodes: list[fx.Node], out: fx.Node) -> torch.Tensor:
    """Run ``nodes`` (closed under inputs) as their own graph, on real tensors."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[out])
    with unset_fake_temporarily(), torch.no_grad():
        return fx.GraphModule(torch.nn.Module(), graph)()
