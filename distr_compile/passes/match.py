"""Find attention sites in a Dynamo FX graph.

Two anchors:

* an SDPA node (``torch._C._nn.scaled_dot_product_attention``, what ``F.scaled_dot_product_attention``
  is in a Dynamo graph) with all its arguments, positional or keyword;
* a softmax over the last dim. From it the matcher walks *up* through casts, scales (multiply or
  divide by a constant, a symbolic or a 0-dim tensor), additive masks, ``masked_fill`` and
  ``torch.where`` (filling a number or a constant 0-dim tensor) to a ``Q K^T`` product
  (``@``/matmul, bmm, einsum), and *down* through casts and inactive dropout to the ``P V``
  product. Every intermediate must feed only the next step, so the attention weights are not
  used anywhere else.

K/V copies made for grouped-query attention (``repeat_interleave`` on the head dim, or HF's
``x[:, :, None].expand(...).reshape(...)``) are unwrapped: the site reads the shared heads and sets
``enable_gqa``. A softmax that reaches a ``Q K^T`` product but cannot be expressed exactly as
``softmax(q k^T * scale + mask) v`` is reported as skipped with the reason; a softmax that is not
attention at all (a classifier head) is ignored silently.

An SDPA ``attn_mask`` takes its exact simpler form where it has one (Hugging Face builds
(B, 1, L, L) masks under torch.compile): none for a constant all-attend mask, ``is_causal=True``
for the constant causal pattern, the (B, 1, 1, L) padding row it was broadcast from; see
``masks.py``.

Matching only reads the graph; ``rewrite.py`` changes it.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .masks import constant_value, simplify_mask

SDPA = torch._C._nn.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)

# A finite masked_fill value behaves as an additive mask exactly only when adding any realistic
# score to it leaves it unchanged in float32 (ulp of 1e30 is ~7e22).
NEG_INF_LIKE = -1e30

_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.special.softmax}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type_as", "type"}
_MUL_FUNCS, _DIV_FUNCS = {operator.mul, torch.mul}, {operator.truediv, torch.div}
_ADD_FUNCS = {operator.add, torch.add}
_WHERE_FUNCS = {torch.where}
_DROPOUT_FUNCS = {F.dropout, torch.dropout}


@dataclass
class AttentionSite:
    """One attention, as the arguments of ``distr::attention`` expressed over existing nodes.

    ``k_transposed``: ``k`` holds k^T (the rewrite transposes it back). ``scale_factors`` are
    non-constant factors (``("mul" | "div", node)``) the scores were scaled by; the rewrite applies
    them to q. ``neg_inf_fills`` are ``(bool node, fill_where_true)``: scores set to -inf where the
    node equals ``fill_where_true``; ``finite_fills`` add a value there instead;
    ``additive_masks`` are ``(node, multiplier)`` terms added to the scores. ``erase`` lists the
    nodes that become dead once ``output`` is replaced. ``original_mask`` is the SDPA ``attn_mask``
    as the graph passed it, when ``attn_mask`` / ``is_causal`` hold its simpler form instead.
    """

    name: str
    pattern: str
    module_id: int | None
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    is_causal: bool = False
    scale: float | None = 1.0
    enable_gqa: bool = False
    k_transposed: bool = False
    attn_mask: fx.Node | None = None
    scale_factors: list[tuple[str, fx.Node]] = field(default_factory=list)
    neg_inf_fills: list[tuple[fx.Node, bool]] = field(default_factory=list)
    additive_masks: list[tuple[fx.Node, float]] = field(default_factory=list)
    finite_fills: list[tuple[fx.Node, float, bool]] = field(default_factory=list)
    erase: list[fx.Node] = field(default_factory=list)
    original_mask: fx.Node | None = None

    @property
    def shapes(self) -> str:
        """q/k/v shapes as a short string, for reports."""
        return " ".join(f"{n}{_shape(x)}" for n, x in (("q", self.q), ("k", self.k), ("v", self.v)))


@dataclass
class SkippedSite:
    """An attention left unchanged, with the reason. ``fault`` is set when the reason is a failure
    of the backend itself: the stage that failed on the site's graph, which was then compiled as
    it came (exact)."""

    name: str
    pattern: str
    reason: str
    module_id: int | None = field(default=None, compare=False, repr=False)
    fault: str | None = None


class _NoMatch(Exception):
    """The softmax is not attention (silently ignored)."""


class _Skip(Exception):
    """Attention that cannot be rewritten exactly (reported)."""


def find_attention(graph: fx.Graph, names: SiteNames | None = None) -> tuple[list[AttentionSite], list[SkippedSite]]:
    """All attention sites of ``graph`` in node order, and the ones left alone with reasons, named
    by ``names`` (those of the other graphs of its model or function; default: this graph's own)."""
    sites: list[AttentionSite] = []
    skipped: list[SkippedSite] = []
    name = (SiteNames() if names is None else names).for_graph()
    simpler = functools.cache(simplify_mask)  # one mask node often serves every layer
    for node in list(graph.nodes):
        if _is_sdpa(node):
            matcher, pattern = _match_sdpa, "sdpa"
        elif _is_softmax(node):
            matcher, pattern = _match_softmax, "softmax"
        else:
            continue
        try:
            site = matcher(node)
        except _NoMatch:
            continue
        except _Skip as why:
            skipped.append(SkippedSite(name(node), pattern, str(why), _module_id(node)))
            continue
        site.name = name(node)
        if site.attn_mask is not None and not site.is_causal and (simple := simpler(site.attn_mask)):
            site.original_mask, site.attn_mask, site.is_causal = site.attn_mask, simple.mask, simple.is_causal
            site.pattern += f", {simple.how}"
        sites.append(site)
    return sites, skipped


# ----------------------------------------------------------------------------------- SDPA


def sdpa_arguments(node: fx.Node) -> dict:
    """An SDPA call's arguments by name, positional or keyword, defaults filled in."""
    args = dict(zip(SDPA_ARGS, SDPA_DEFAULTS))
    args.update(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _match_sdpa(node: fx.Node) -> AttentionSite:
    args = sdpa_arguments(node)
    dropout_p, is_causal, enable_gqa = args["dropout_p"], args["is_causal"], args["enable_gqa"]
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise _Skip(f"dropout_p={_show(dropout_p)} is active (SDPA applies it in eval mode too)")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise _Skip("is_causal/enable_gqa are not compile-time constants")
    mask = args["attn_mask"]
    if mask is not None and not isinstance(mask, fx.Node):
        raise _Skip(f"attn_mask of type {type(mask).__name__} is not a tensor")
    site = AttentionSite("", "sdpa", _module_id(node), node, args["query"], args["key"], args["value"],
                         is_causal=is_causal, enable_gqa=enable_gqa, attn_mask=mask, erase=[node])
    scale = args["scale"]
    if isinstance(scale, fx.Node):
        site.scale, site.scale_factors = 1.0, [("mul", scale)]
    else:
        site.scale = scale
    _unwrap_gqa(site)
    return site


# -------------------------------------------------------------------------------- softmax


def _match_softmax(node: fx.Node) -> AttentionSite:
    scores = _softmax_input(node)
    site = AttentionSite("", "softmax", _module_id(node), node, node, node, node)
    qk = _walk_scores(scores, site)
    site.erase.append(node)
    pv, weights = _walk_weights(node, site)
    site.output = pv
    site.q, k_t, k_is_transposed = _qk_operands(qk, site)
    site.v = _pv_value(pv, weights, site)
    site.k = _untranspose(k_t, site) if k_is_transposed else k_t
    _check_shapes(site)
    _unwrap_gqa(site)
    return site


def _softmax_input(node: fx.Node) -> fx.Node:
    x, dim = _args(node, "input", "dim")
    rank = _rank(x)
    if not isinstance(dim, int) or rank is None or dim not in (-1, rank - 1):
        raise _NoMatch
    return x


def _walk_scores(x: fx.Node, site: AttentionSite) -> fx.Node:
    """From the softmax input up to the Q K^T product, recording scales and masks (outermost
    first while walking, reversed at the end so they read in computation order)."""
    ops: list[tuple] = []
    while True:
        if not isinstance(x, fx.Node):
            raise _NoMatch
        if _is_matmul(x) or _is_einsum(x):
            break
        if "out" in x.kwargs:  # erasing it would lose the write to ``out``
            raise _NoMatch
        site.erase.append(x)
        if _is_cast(x):
            x = x.args[0]
        elif _is_call(x, _MUL_FUNCS, {"mul", "__mul__"}) or _is_call(x, _DIV_FUNCS, {"div", "__truediv__"}):
            kind = "div" if _is_call(x, _DIV_FUNCS, {"div", "__truediv__"}) else "mul"
            a, b = _args(x, "input", "other")
            if kind == "div" and x.kwargs.get("rounding_mode") is not None:
                raise _NoMatch
            if _is_scalar(b):
                ops.append((kind, b))
                x = a
            elif kind == "mul" and _is_scalar(a):
                ops.append((kind, a))
                x = b
            else:
                raise _NoMatch
        elif _is_call(x, _ADD_FUNCS, {"add", "__add__"}) and set(x.kwargs) <= {"input", "other"}:  # no alpha=
            x = _split_add(x, ops)
        elif _is_call(x, {torch.masked_fill}, {"masked_fill"}):
            x, mask, value = _args(x, "input", "mask", "value")
            ops.append(("fill", mask, value, True))
        elif _is_call(x, _WHERE_FUNCS, set()):
            cond, a, b = _args(x, "condition", "input", "other")
            if _leads_to_scores(a):
                ops.append(("fill", cond, b, False))
                x = a
            else:
                ops.append(("fill", cond, a, True))
                x = b
        else:
            raise _NoMatch
    for node in site.erase:
        if len(node.users) != 1:
            raise _Skip(f"intermediate {node.name} of the attention scores is used elsewhere")
    _fold_ops(reversed(ops), site)
    return x


def _split_add(x: fx.Node, ops: list) -> fx.Node:
    a, b = _args(x, "input", "other")
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and _rank(a) is not None and _rank(b) is not None:
        scores, mask = (a, b) if _leads_to_scores(a) else (b, a)
        if _same_shape(scores, x) and _is_floating(mask):
            ops.append(("add", mask))
            return scores
    raise _NoMatch


def _leads_to_scores(x) -> bool:
    """Whether ``x`` is a matmul under casts, scales, adds and fills: which operand of an add
    (or of a where) carries the scores."""
    while isinstance(x, fx.Node):
        if _is_matmul(x) or _is_einsum(x):
            return True
        if not (_is_cast(x) or _is_call(x, _MUL_FUNCS | _DIV_FUNCS | _ADD_FUNCS | {torch.masked_fill},
                                         {"mul", "div", "add", "masked_fill", "__mul__", "__truediv__", "__add__"})):
            return False
        x = next((a for a in _args(x, "input", "other") if isinstance(a, fx.Node) and not _is_scalar(a)), None)
    return False


def _fold_ops(ops, site: AttentionSite) -> None:
    """Rewrite the score ops, in computation order, as scale * (q k^T) + masks."""
    scale = 1.0
    for op in ops:
        kind = op[0]
        if kind in ("mul", "div"):
            factor = op[1]
            if isinstance(factor, (int, float)) and not isinstance(factor, bool):
                if factor == 0 or not math.isfinite(factor):
                    raise _Skip(f"scores scaled by {factor}")
                factor = 1.0 / factor if kind == "div" else float(factor)
                if factor < 0 and (site.neg_inf_fills or site.finite_fills):
                    raise _Skip("a negative scale after a -inf mask flips the mask")
                scale *= factor
                site.additive_masks = [(m, c * factor) for m, c in site.additive_masks]
                site.finite_fills = [(c, v * factor, on_true) for c, v, on_true in site.finite_fills]
            else:
                if site.neg_inf_fills or site.additive_masks or site.finite_fills:
                    raise _Skip("scores scaled by a non-constant after masking")
                site.scale_factors.append((kind, factor))
        elif kind == "add":
            site.additive_masks.append((op[1], 1.0))
        else:
            _, cond, value, fill_where_true = op
            if not isinstance(cond, fx.Node) or not _is_bool(cond):
                raise _Skip("mask condition is not a bool tensor")
            value = _fill_constant(value)
            if value is None:
                raise _Skip(f"mask fill value {_show(op[2])} is not a constant")
            if value == -math.inf:
                site.neg_inf_fills.append((cond, fill_where_true))
            elif value <= NEG_INF_LIKE:
                site.finite_fills.append((cond, value, fill_where_true))
            else:
                raise _Skip(f"mask fill value {value} is not -inf or <= {NEG_INF_LIKE:g}: softmax would differ")
    site.scale = scale


def _fill_constant(value) -> float | None:
    """A mask fill value as a float: a Python number, or a 0-dim floating tensor that is a graph
    constant (``torch.tensor(-inf)``, ``torch.full((), finfo.min)``); None for anything else. A
    0-dim tensor takes part in type promotion exactly as a Python number does."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and _is_floating(value) and _rank(value) == 0:
        tensor = constant_value(value)
        if tensor is not None:
            return tensor.item()
    return None


def _walk_weights(softmax: fx.Node, site: AttentionSite) -> tuple[fx.Node, fx.Node]:
    """From the softmax down to the P V product: returns (pv node, the node that is P)."""
    x = softmax
    while True:
        if len(x.users) != 1:
            raise _Skip(f"attention weights ({x.name}) are used outside the attention (e.g. returned)")
        user = next(iter(x.users))
        if _is_cast(user) and user.args[0] is x:
            site.erase.append(user)
            x = user
        elif _is_call(user, _DROPOUT_FUNCS, set()) and _args(user, "input")[0] is x:
            _check_dropout_inactive(user)
            site.erase.append(user)
            x = user
        elif (_is_matmul(user) or _is_einsum(user)) and _operands(user)[0] is x:
            return user, x
        else:
            raise _Skip(f"attention weights feed {user.name}, not a P @ V product")


def _check_dropout_inactive(node: fx.Node) -> None:
    """Dropout is the identity in eval mode or with p = 0 (both constants in a Dynamo graph)."""
    names = ("p", "train") if node.target is torch.dropout else ("p", "training", "inplace")
    given = {"p": 0.5, names[1]: True}
    given.update(zip(names, node.args[1:]))
    given.update(node.kwargs)
    p, training = given["p"], given[names[1]]
    if training is False or (isinstance(p, (int, float)) and p == 0):
        return
    raise _Skip(f"dropout on the attention weights is active (p={_show(p)}, training={_show(training)})")


def _qk_operands(qk: fx.Node, site: AttentionSite) -> tuple[fx.Node, fx.Node, bool]:
    """(q, k or k^T, whether it is k^T) of the scores product."""
    site.erase.append(qk)
    if len(qk.users) != 1:
        raise _Skip(f"attention scores ({qk.name}) are used elsewhere")
    if _is_matmul(qk):
        return (*_operands(qk), True)
    a, b = _operands(qk)
    (ta, tb), out = _einsum_terms(qk)
    n = len(out) - 2
    batch, i, j = out[:n], out[n], out[n + 1]
    if len(ta) == len(tb) == n + 2 and ta[:n] == tb[:n] == batch and ta[n] == i and ta[n + 1] not in out:
        c = ta[n + 1]
        if tb[n:] == [j, c]:
            return a, b, False
        if tb[n:] == [c, j]:
            return a, b, True
    raise _Skip(f"einsum {qk.args[0]!r} is not a batched q k^T")


def _pv_value(pv: fx.Node, weights: fx.Node, site: AttentionSite) -> fx.Node:
    a, b = _operands(pv)
    if _is_einsum(pv):
        (ta, tb), out = _einsum_terms(pv)
        n = len(out) - 2
        if not (len(ta) == len(tb) == n + 2 and ta[:n] == tb[:n] == out[:n] and ta[n] == out[n]
                and tb[n] == ta[n + 1] and tb[n + 1] == out[n + 1] and ta[n + 1] not in out):
            raise _Skip(f"einsum {pv.args[0]!r} is not a batched P @ V")
    return b


def _untranspose(k_t: fx.Node, site: AttentionSite) -> fx.Node:
    """k from k^T: unwraps a transpose of the last two dims; anything else is kept as k^T and
    transposed back by the rewrite."""
    rank = _rank(k_t)
    if _is_last_two_swap(k_t, rank) and len(k_t.users) == 1:
        site.erase.append(k_t)
        return k_t.args[0]
    site.k_transposed = True
    return k_t


def _is_last_two_swap(x: fx.Node, rank: int | None) -> bool:
    if rank is None or rank < 2:
        return False
    if _is_call(x, {torch.transpose}, {"transpose"}) and len(x.args) == 3:
        dims = {d % rank for d in x.args[1:] if isinstance(d, int)}
        return dims == {rank - 2, rank - 1}
    if _is_call(x, {torch.permute}, {"permute"}):
        perm = x.args[1] if len(x.args) == 2 and isinstance(x.args[1], (tuple, list)) else x.args[1:]
        return [d % rank for d in perm] == [*range(rank - 2), rank - 1, rank - 2]
    if x.op == "call_function" and x.target is getattr and x.args[1] == "mT":
        return True
    return _is_call(x, set(), {"t"}) and rank == 2


def _check_shapes(site: AttentionSite) -> None:
    q, k, v = _val(site.q), _val(site.k), _val(site.v)
    if site.k_transposed and k is not None:
        k = k.transpose(-2, -1)
    if any(t is None for t in (q, k, v)) or not (q.dim() == k.dim() == v.dim() >= 2):
        raise _Skip("q, k, v are not tensors of one rank")
    if q.dim() >= 3:
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if statically_known_true(hk == 1) and statically_known_true(hv == 1) and not statically_known_true(hq == 1):
            site.enable_gqa = True
        elif not (statically_known_true(hq == hk) and statically_known_true(hk == hv)):
            raise _Skip(f"head counts q {hq}, k {hk}, v {hv} do not line up")
    if q.dim() > 3 and not all(statically_known_true(a == b) for a, b in zip(q.shape[:-3], k.shape[:-3])):
        raise _Skip("q and k have different batch dims (broadcasting matmul)")


# ------------------------------------------------------------------------------------ GQA


def _unwrap_gqa(site: AttentionSite) -> None:
    """Replace repeated K/V copies by the shared heads and set ``enable_gqa``."""
    k0, v0 = _repeated_heads(site.k), _repeated_heads(site.v)
    if k0 is None or v0 is None or k0[1] != v0[1]:
        return
    site.erase += [site.k, site.v]
    site.k, site.v, site.enable_gqa = k0[0], v0[0], True


def _repeated_heads(x: fx.Node) -> tuple[fx.Node, object] | None:
    """(source, repeats) when ``x`` repeats the heads (dim -3) of a 4-d source in
    ``repeat_interleave`` order (query head h reads key head h // repeats), else None."""
    if not isinstance(x, fx.Node) or len(x.users) != 1 or _rank(x) != 4:
        return None
    if _is_call(x, {torch.repeat_interleave}, {"repeat_interleave"}):
        src, repeats, dim = _args(x, "input", "repeats", "dim")
        if isinstance(repeats, int) and dim in (1, -3) and _rank(src) == 4 and not x.kwargs.get("output_size"):
            return src, repeats
        return None
    if not _is_call(x, {torch.reshape}, {"reshape", "view"}):
        return None
    (expand,) = _args(x, "input")
    if not (_is_call(expand, set(), {"expand"}) and len(expand.users) == 1 and _rank(expand) == 5):
        return None
    unsq = expand.args[0]
    if not (isinstance(unsq, fx.Node) and len(unsq.users) == 1 and _rank(unsq) == 5):
        return None
    src = _unsqueezed_at_2(unsq)
    if src is None:
        return None
    s, e, o = _val(src).shape, _val(expand).shape, _val(x).shape
    same = all(statically_known_true(a == b) for a, b in zip((*s[:2], 1, *s[2:]), _val(unsq).shape))
    kept = all(statically_known_true(a == b) for a, b in zip((*s[:2], *s[2:]), (*e[:2], *e[3:])))
    merged = statically_known_true(o[1] == e[1] * e[2]) and all(
        statically_known_true(a == b) for a, b in zip((o[0], *o[2:]), (e[0], *e[3:]))
    )
    return (src, e[2]) if same and kept and merged else None


def _unsqueezed_at_2(u: fx.Node) -> fx.Node | None:
    src, dim = _args(u, "input", "dim")
    if not isinstance(src, fx.Node) or _rank(src) != 4:
        return None
    if _is_call(u, {torch.unsqueeze}, {"unsqueeze"}) and dim in (2, -3):
        return src
    if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], tuple):
        index = u.args[1]
        if all(i is None or i is Ellipsis or i == slice(None) for i in index) and index.count(None) == 1:
            return src
    return None


# ---------------------------------------------------------------------------------- names


class SiteNames:
    """Names for the attention sites of every graph of one model or function: the anchor's module
    path (``layers.3.self_attn``; ``<root>`` for the compiled root module's own code), then ``#1``,
    ``#2``... for each further site of that path, in one graph or another (a second attention in
    one module, or attention on both sides of a graph break), in the order they are first seen.

    A site seen again keeps its name, so decisions and plans made under it apply: in a copy of its
    graph, or in a recompile of it for new shapes. It is known by its path, its source location
    (the anchor's stack trace) and how many sites of its graph came before it with both the same
    (a loop calls one line several times)."""

    def __init__(self) -> None:
        self._names: dict[tuple, str] = {}

    def for_graph(self) -> Callable[[fx.Node], str]:
        """The name of each anchor of one graph, asked for in node order."""
        seen: collections.Counter = collections.Counter()

        def name(node: fx.Node) -> str:
            place = (_module_path(node), node.meta.get("stack_trace"))
            key = (*place, seen[place])
            seen[place] += 1
            if key not in self._names:
                taken, path = set(self._names.values()), place[0]
                candidates = (f"{path}#{i}" if i else path for i in itertools.count())
                self._names[key] = next(n for n in candidates if n not in taken)
            return self._names[key]

        return name


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return _clean_path(list(stack.values())[-1][0]) if stack else "<root>"


def _clean_path(path: str) -> str:
    # The root is the compiled module: ``L['self']``, or ``L['args'][0]`` when its forward is a
    # ``(*args, **kwargs)`` wrapper (transformers' output-handling decorators).
    path = re.sub(r"^L\['args'\]\[0\]|^L\['[^']+'\]", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.lstrip(".") or "<root>"


def _module_id(node: fx.Node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    return int(list(stack)[-1]) if stack and list(stack)[-1].isdigit() else None


# -------------------------------------------------------------------------------- helpers


def _args(node: fx.Node, *names: str) -> tuple:
    """The call's first ``len(names)`` arguments, each given by position or by keyword: ``names``
    are its parameters in order (a method's ``self`` is always positional); None for one not given."""
    return tuple(node.args[i] if i < len(node.args) else node.kwargs.get(name) for i, name in enumerate(names))


def _is_call(node, funcs: set, methods: set) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is SDPA


def _is_softmax(node: fx.Node) -> bool:
    return _is_call(node, _SOFTMAX_FUNCS, {"softmax"})


def _is_matmul(node: fx.Node) -> bool:
    return _is_call(node, _MATMUL_FUNCS, _MATMUL_METHODS) and len(node.args) == 2


def _is_einsum(node: fx.Node) -> bool:
    return _is_call(node, {torch.einsum}, set()) and len(_operands(node)) == 2


def _operands(node: fx.Node) -> list:
    if _is_call(node, {torch.einsum}, set()):
        ops = node.args[1:]
        return list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else list(ops)
    return list(node.args[:2])


def _einsum_terms(node: fx.Node) -> tuple[list[list[str]], list[str]]:
    """Operand and output subscripts as token lists ('...' is one token)."""
    eq = node.args[0].replace(" ", "")
    if "->" not in eq:
        raise _Skip(f"einsum {eq!r} has no explicit output")
    lhs, out = eq.split("->")
    tokens = lambda s: re.findall(r"\.\.\.|[a-zA-Z]", s)  # noqa: E731
    return [tokens(t) for t in lhs.split(",")], tokens(out)


def _is_cast(node: fx.Node) -> bool:
    """A cast to a floating dtype (``.float()``, ``.to(torch.bfloat16)``, ``.type_as(q)``...)."""
    if node.op != "call_method" or node.target not in _CAST_METHODS:
        return False
    if node.target == "type_as":
        return _is_floating(_args(node, "self", "other")[1])
    if node.target in ("to", "type"):
        dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
        return isinstance(dtype, torch.dtype) and dtype.is_floating_point and set(node.kwargs) <= {"dtype"}
    return len(node.args) == 1 and not node.kwargs


def _is_scalar(x) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if not isinstance(x, fx.Node):
        return False
    v = x.meta.get("example_value")
    return isinstance(v, (torch.SymFloat, torch.SymInt)) or (isinstance(v, torch.Tensor) and v.dim() == 0)


def _val(x) -> torch.Tensor | None:
    v = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _rank(x) -> int | None:
    v = _val(x)
    return None if v is None else v.dim()


def _shape(x) -> tuple:
    v = _val(x)
    return () if v is None else tuple(v.shape)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = _shape(a), _shape(b)
    return len(sa) == len(sb) and all(statically_known_true(x == y) for x, y in zip(sa, sb))


def _is_floating(x) -> bool:
    v = _val(x)
    return v is not None and v.is_floating_point()


def _is_bool(x) -> bool:
    v = _val(x)
    return v is not None and v.dtype == torch.bool


def _show(x) -> str:
    return x.name if isinstance(x, fx.Node) else repr(x)
