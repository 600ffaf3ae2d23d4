"""Replace matched attention sites by ``torch.ops.distr.attention``.

Each rewritten site becomes ``getitem(distr.attention(q, k, v, mask, is_causal, scale, enable_gqa,
*knobs), 0)``, with a few small nodes in front when the scores were spelled out by hand: the mask
terms combined into one mask, non-constant scales applied to q, a k^T transposed back. The op
node carries ``meta["distr_site"]`` (the site name) so calibration can find it; every new node
carries the site's module path and stack trace. Nodes of the old spelling that become dead are
erased. Sites may be chained (one's output is the next one's q, k, v or mask): a later site reads
the new output of the one before. An SDPA site that stays exact is left as it is, except that its
mask takes the exact simpler form the matcher found (``masks.py``; :func:`use_simpler_masks`): no
mask, ``is_causal=True`` or the padding row, so that Inductor picks a fused kernel instead of
reading an L x L mask or falling back to the unfused math path.

A site with ``grouping="projection"`` becomes ``q @ A`` and ``k @ B`` (the maps are buffers of the
GraphModule, read by ``get_attr``: :func:`register_maps`), then the op at G = 1 on the projected
q, k with the softmax scale of the original head dim.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Iterable, Mapping

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource

from .. import ops  # noqa: F401  (registers torch.ops.distr.attention)
from ..config import DistrConfig
from .masks import additive_row
from .match import SDPA_ARGS, AttentionSite, sdpa_arguments

SITE_META = "distr_site"
PROVENANCE = ("nn_module_stack", "stack_trace")  # meta the nodes of a rewrite take from the site's output
MAPS_PREFIX = "distr_projection_"  # the buffers register_maps adds


def rewrite_attention(graph: fx.Graph, sites: list[AttentionSite], configs: Mapping[str, DistrConfig],
                      maps: Mapping[str, tuple[str, str]] | None = None) -> list[fx.Node]:
    """Rewrite each site whose name is in ``configs`` to the op with that config (G = 1 gives
    exact attention through the op); other sites are not touched. A site with
    ``grouping="projection"`` reads its maps from the attributes ``maps[name]`` names (A, B; see
    :func:`register_maps`). Returns the new op nodes."""
    rewritten = []
    replaced: dict[fx.Node, fx.Node] = {}  # old site output -> its new output, for sites chained on it
    for site in sites:
        config = configs.get(site.name)
        if config is None:
            continue
        if config.grouping == "projection" and not config.exact and site.name not in (maps or {}):
            raise ValueError(f"site {site.name}: grouping='projection' needs its maps")
        site = _follow(site, replaced)
        op, replaced[site.output] = _emit(graph, site, config, (maps or {}).get(site.name))
        _erase_dead(graph, site)
        rewritten.append(op)
    graph.lint()
    return rewritten


def register_maps(gm: fx.GraphModule, sites: list[AttentionSite],
                  maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[str, str]]:
    """Register each site's projection maps (A, B) on ``gm`` as buffers, in the dtype and on the
    device of the site's q; returns their attribute names per site, for :func:`rewrite_attention`.
    Buffers are constants to Inductor; in a Dynamo graph they get a constant source, as AOTAutograd
    asks of every buffer it lifts."""
    names = {}
    sources = getattr(gm, "_param_name_to_source", None)
    for i, site in enumerate(sites):
        if site.name not in maps:
            continue
        like = site.q.meta["example_value"]
        names[site.name] = (f"{MAPS_PREFIX}{i}_a", f"{MAPS_PREFIX}{i}_b")
        for name, m in zip(names[site.name], maps[site.name]):
            gm.register_buffer(name, m.detach().to(like.dtype).to(like.device))
            if sources is not None:
                sources[name] = ConstantSource(name)
    return names


def drop_maps(gm: fx.GraphModule) -> None:
    """Remove the buffers :func:`register_maps` added (after the graph was put back as it came)."""
    sources = getattr(gm, "_param_name_to_source", {})
    for name in [n for n in gm._buffers if n.startswith(MAPS_PREFIX)]:
        del gm._buffers[name]
        sources.pop(name, None)


def use_simpler_masks(sites: Iterable[AttentionSite]) -> int:
    """Call each SDPA site whose mask has a simpler form with that form (mask and ``is_causal``; a
    bool padding row as its additive equivalent, see ``masks.additive_row``), leaving it SDPA
    (exact). Returns how many sites changed."""
    changed = [site for site in sites if site.original_mask is not None]
    additive: dict[tuple[fx.Node, torch.dtype], fx.Node | None] = {}  # one mask often serves every layer
    for site in changed:
        mask, dtype = site.attn_mask, _dtype(site.q)
        if mask is not None and dtype is not None and dtype.is_floating_point:
            if (mask, dtype) not in additive:
                additive[mask, dtype] = additive_row(mask, dtype)
            mask = additive[mask, dtype] or mask
        args = sdpa_arguments(site.output) | {"attn_mask": mask, "is_causal": site.is_causal}
        site.output.args = tuple(args.pop(name) for name in SDPA_ARGS[:3])
        site.output.kwargs = args
    return len(changed)


def _dtype(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dtype if isinstance(value, torch.Tensor) else None


def _follow(site: AttentionSite, replaced: Mapping[fx.Node, fx.Node]) -> AttentionSite:
    """``site`` reading the replacement of every node an earlier rewrite replaced (the match saw
    the graph before any rewrite, so a site chained on another still names the old output)."""
    if not replaced:
        return site
    new = lambda x: replaced.get(x, x) if isinstance(x, fx.Node) else x  # noqa: E731
    return dataclasses.replace(site, **{f.name: fx.node.map_aggregate(getattr(site, f.name), new)
                                        for f in dataclasses.fields(site)})


def _emit(graph: fx.Graph, site: AttentionSite, config: DistrConfig,
          maps: tuple[str, str] | None) -> tuple[fx.Node, fx.Node]:
    """Insert the op for ``site`` before its output and move the output's users to it; returns
    (op node, new output node)."""
    first_new = site.output.prev
    with graph.inserting_before(site.output):
        op, out = _emit_op(graph, site, config, maps)
    meta = {k: v for k, v in site.output.meta.items() if k in PROVENANCE}
    node = first_new.next
    while node is not site.output:
        node.meta.update(meta)
        node = node.next
    site.output.replace_all_uses_with(out)
    return op, out


def _emit_op(graph: fx.Graph, site: AttentionSite, config: DistrConfig,
             maps: tuple[str, str] | None) -> tuple[fx.Node, fx.Node]:
    q = site.q
    for kind, factor in site.scale_factors:
        q = graph.call_function(operator.mul if kind == "mul" else operator.truediv, (q, factor))
    k = graph.call_method("transpose", (site.k, -2, -1)) if site.k_transposed else site.k
    qk, scale = (q, k), site.scale
    if maps is not None:  # exact attention on (q A, k B) at the scale of the original head dim
        qk = tuple(graph.call_function(torch.matmul, (x, graph.get_attr(m))) for x, m in zip(qk, maps))
        scale = site.q.meta["example_value"].shape[-1] ** -0.5 if scale is None else scale
        config = config.replace(group_size=1)
    args = (
        *qk, site.v, _mask(graph, site), site.is_causal, scale, site.enable_gqa,
        config.group_size, config.block_m, config.num_hyperplanes, config.representative,
        config.grouping, config.seed,
    )
    op = graph.call_function(torch.ops.distr.attention.default, args)
    op.meta[SITE_META] = site.name
    out = graph.call_function(operator.getitem, (op, 0))
    want = site.output.meta.get("example_value")
    have = q.meta.get("example_value") if isinstance(q, fx.Node) else None
    if isinstance(want, torch.Tensor) and isinstance(have, torch.Tensor) and want.dtype != have.dtype:
        out = graph.call_method("to", (out, want.dtype))
    return op, out


def _mask(graph: fx.Graph, site: AttentionSite) -> fx.Node | None:
    """One mask from the site's terms: bool (True = attend) when there are only -inf fills,
    else additive (float)."""
    if site.attn_mask is not None:
        return site.attn_mask
    keep = None
    for cond, fill_where_true in site.neg_inf_fills:
        term = graph.call_function(operator.invert, (cond,)) if fill_where_true else cond
        keep = term if keep is None else graph.call_function(operator.and_, (keep, term))
    additive = None
    for node, multiplier in site.additive_masks:
        term = node if multiplier == 1.0 else graph.call_function(operator.mul, (node, multiplier))
        additive = term if additive is None else graph.call_function(operator.add, (additive, term))
    for cond, value, fill_where_true in site.finite_fills:
        where = (value, 0.0) if fill_where_true else (0.0, value)
        term = graph.call_function(torch.where, (cond, *where))
        additive = term if additive is None else graph.call_function(operator.add, (additive, term))
    if additive is None:
        return keep
    if keep is None:
        return additive
    return graph.call_function(torch.where, (keep, additive, -math.inf))


def _erase_dead(graph: fx.Graph, site: AttentionSite) -> None:
    """Erase the old spelling's nodes, consumers first, where nothing uses them any more."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    pending = sorted({n for n in (*site.erase, site.output) if n in order}, key=order.get, reverse=True)
    for node in pending:
        if not node.users:
            graph.erase_node(node)
