"""Measuring: run a graph whose sites were rewritten to the exact op through an ``fx.Interpreter``
on real inputs, and at every site measure each candidate G against exact attention (the error of
the attention output and, when asked, the time)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from .. import speed
from ..config import DistrConfig
from ..kernels.attention import fixed_config
from ..passes import SITE_META, AttentionSite, rewrite_attention
from ..projection import fit_projection, project

EXACT = 1  # the group size of exact attention
_OP = torch.ops.distr.attention.default
_SCHEMA_KNOBS = ("group_size", "block_m", "num_hyperplanes", "representative", "grouping", "seed")
Maps = tuple[torch.Tensor, torch.Tensor]  # a site's projection maps: A (Hq, E, E/G), B (Hkv, E, E/G)


def measure(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error, cosine similarity and max abs error of ``out`` against ``ref``."""
    o, r = out.detach().double(), ref.detach().double()
    diff = (o - r).norm().item()
    ref_norm, out_norm = r.norm().item(), o.norm().item()
    return {
        "rel_fro": diff / ref_norm if ref_norm > 0 else (0.0 if diff == 0 else math.inf),
        "cosine": (o * r).sum().item() / (out_norm * ref_norm) if out_norm * ref_norm > 0 else float(diff == 0),
        "max_abs": (o - r).abs().max().item() if o.numel() else 0.0,
    }


def metric_error(metrics: Mapping[str, float], metric: str) -> float:
    """The error under ``metric`` (cosine similarity becomes 1 - cosine)."""
    return 1.0 - metrics["cosine"] if metric == "cosine" else metrics[metric]


def within_tolerance(errors: Mapping[int, Mapping[str, float]], config: DistrConfig) -> list[int]:
    """The measured candidate G whose error is within ``tolerance``, cheapest (largest) first."""
    return [g for g in config.candidates
            if g in errors and metric_error(errors[g], config.metric) <= config.tolerance]


def _worst(a: Mapping[str, float] | None, b: Mapping[str, float]) -> dict[str, float]:
    if a is None:
        return dict(b)
    return {"rel_fro": max(a["rel_fro"], b["rel_fro"]), "cosine": min(a["cosine"], b["cosine"]),
            "max_abs": max(a["max_abs"], b["max_abs"])}


def op_knobs(config: DistrConfig) -> tuple:
    """The op's trailing knob arguments for ``config``."""
    return tuple(getattr(config, k) for k in _SCHEMA_KNOBS)


class SiteProbe(fx.Interpreter):
    """Runs a graph whose sites were rewritten to the op, measuring candidates at every site.

    At a site the exact output is computed; each candidate config in ``candidates[name]`` is run
    on the same inputs (:meth:`approximate`) and its worst-case metrics are kept in
    ``self.errors[name][G]``. What flows on is the exact output, or the approximated one for
    sites in ``propagate``. A projection candidate uses the site's maps at its G from ``maps``
    (shared across probes, ``maps[name][G]``), fitted on the site's arguments the first time the
    site is reached. With ``sample_heads`` only KV head 0 and the query heads reading it are
    measured (the runtime monitor's cheap sample; not for projections, whose maps cover every
    head). With ``timings`` (a cache shared across probes, keyed by the site's input shapes,
    strides, flags and candidates: layers alike are timed once) each site's exact SDPA and
    candidates are also timed (:func:`speed.site_times`) into ``self.times[name]``, where
    ``worth_timing`` says the site's errors leave a candidate to time (timing autotunes and
    compiles kernels: no use where every candidate is over the tolerance anyway).
    """

    def __init__(self, gm: fx.GraphModule, candidates: Mapping[str, Iterable[DistrConfig]],
                 propagate: Mapping[str, DistrConfig] | None = None, sample_heads: bool = False,
                 timings: dict[tuple, dict[int, float]] | None = None, maps: dict[str, dict[int, Maps]] | None = None,
                 worth_timing: Callable[[Mapping[int, Mapping[str, float]]], bool] = lambda errors: True):
        super().__init__(gm, garbage_collect_values=True)
        self.candidates = {name: list(cfgs) for name, cfgs in candidates.items()}
        if sample_heads and any(c.grouping == "projection" for cfgs in self.candidates.values() for c in cfgs):
            raise ValueError("sample_heads does not take projection candidates (their maps cover every head)")
        self.propagate = dict(propagate or {})
        self.sample_heads = sample_heads
        self.timings = timings
        self.worth_timing = worth_timing
        self.maps = {} if maps is None else maps
        self.errors: dict[str, dict[int, dict[str, float]]] = {}
        self.times: dict[str, dict[int, float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        name = n.meta.get(SITE_META)
        if name is None or n.target is not _OP:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        exact = exact_attention(args)
        if self.candidates.get(name):
            self._measure(name, args, exact[0], self.candidates[name])
        if name in self.propagate:
            return self.approximate(name, args, self.propagate[name])
        return exact

    def _measure(self, name: str, args: tuple, exact: torch.Tensor, candidates: list[DistrConfig]) -> None:
        """Keep each candidate's worst-case metrics against exact attention at site ``name`` (and
        its times, when timing)."""
        measured = _first_kv_group(args) if self.sample_heads else args
        ref = _OP(*measured[:7], EXACT, *args[8:])[0] if self.sample_heads else exact
        per_g = self.errors.setdefault(name, {})
        for cfg in candidates:
            got = self.approximate(name, measured, cfg)[0]
            per_g[cfg.group_size] = _worst(per_g.get(cfg.group_size), measure(got, ref))
        if self.timings is not None and self.worth_timing(per_g):
            self.times[name] = self._time(name, args, candidates)

    def approximate(self, name: str, args: tuple, config: DistrConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The op on site ``name``'s arguments with ``config``, as the rewrite emits it. A projection
        runs with the site's maps at that G, fitted on ``args`` if the site has none yet."""
        if config.grouping != "projection":
            return _OP(*args[:7], *op_knobs(config))
        per_g = self.maps.setdefault(name, {})
        if config.group_size not in per_g:
            per_g[config.group_size] = fit_site_maps(args, config.group_size)
        return projected_op(args, per_g[config.group_size])

    def _time(self, name: str, args: tuple, candidates: list[DistrConfig]) -> dict[int, float]:
        describe = lambda x: (tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        key = (*map(describe, args[:7]), *map(op_knobs, candidates))
        if key not in self.timings:
            runs = {cfg.group_size: functools.partial(self.approximate, name, args, cfg) for cfg in candidates}
            self.timings[key] = speed.site_times(args[:7], runs)
        return self.timings[key]


def exact_attention(args: tuple) -> tuple[torch.Tensor, None]:
    """A site's exact output from the op's arguments, as the compiled model computes it where the
    site stays exact: SDPA (not our exact kernel, which would cost a Triton compile the compiled
    model may never use). The op's log-sum-exp is None: the rewrite reads only the output."""
    q, k, v, mask, is_causal, scale, enable_gqa = args[:7]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    return out, None


def _first_kv_group(args: tuple) -> tuple:
    """The op's (q, k, v, mask, ...) narrowed to KV head 0 and the query heads that read it."""
    q, k, v, mask, *rest = args
    if q.dim() < 3:
        return args
    hq, hkv = q.shape[-3], k.shape[-3]
    rq = hq // hkv
    q, k, v = q.narrow(-3, 0, rq), k.narrow(-3, 0, 1), v.narrow(-3, 0, 1)
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] == hq:
        mask = mask.narrow(-3, 0, rq)
    return (q, k, v, mask, *rest)


def probe_module(gm: fx.GraphModule, sites: Iterable[AttentionSite]) -> fx.GraphModule:
    """A copy of ``gm`` with ``sites`` (of its graph) rewritten to the exact op."""
    graph = copy.deepcopy(gm.graph)
    moved = sites_on(graph, sites)
    rewrite_attention(graph, moved, dict.fromkeys((s.name for s in moved), DistrConfig(group_size=EXACT)))
    return fx.GraphModule(gm, graph)


def sites_on(graph: fx.Graph, sites: Iterable[AttentionSite]) -> list[AttentionSite]:
    """``sites``, of a graph that ``graph`` is a copy of, on ``graph``'s nodes (a copy keeps the
    node names). Matching the copy again would not do: its sites would be named as those of one
    graph, not with the names of their model's (:class:`~distr_compile.passes.SiteNames`)."""
    nodes = {n.name: n for n in graph.nodes}
    move = functools.partial(pytree.tree_map_only, fx.Node, lambda n: nodes[n.name])
    return [dataclasses.replace(s, **{f.name: move(getattr(s, f.name)) for f in dataclasses.fields(s)}) for s in sites]


def run_probe(probe: SiteProbe, inputs: list) -> Any:
    """Run a probe on real inputs without touching the caller's state: no autograd, the RNG state
    restored, and every non-parameter input cloned (so in-place updates of buffers or caches in
    the graph are not applied twice). Kernels run with one fixed config (see
    :func:`kernels.attention.fixed_config`): autotuning them here would only slow the compile."""
    inputs = [_probe_input(x) for x in inputs]
    devices = [x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda][:1]
    with torch.no_grad(), torch.random.fork_rng(devices=devices), fixed_config():
        return probe.run(*inputs)


def _probe_input(x: Any) -> Any:
    """A non-parameter tensor cloned; a symbolic size (a dynamic dimension Dynamo passes as a graph
    input) replaced by the value it has on these inputs."""
    if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
        return x.clone()
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) and x.node.hint is not None:
        return x.node.hint
    return x


def divides_head_dim(site: AttentionSite, g: int) -> bool:
    """Whether G divides the site's head dim (known at compile time)."""
    return head_dim_problem(site, g) is None


def head_dim_problem(site: AttentionSite, g: int) -> str | None:
    """Why G cannot split the site's head dim at compile time, or None if it can."""
    q = site.q.meta.get("example_value")
    if q is None:
        return "the head dim is unknown at compile time"
    if statically_known_true(q.shape[-1] % g == 0):
        return None
    if isinstance(q.shape[-1], torch.SymInt):
        return f"the head dim is dynamic ({q.shape[-1]}): G={g} must divide a head dim known at compile time"
    return f"G={g} does not divide the head dim ({q.shape[-1]})"


def runs(site: AttentionSite, config: DistrConfig) -> bool:
    """Whether ``config`` can approximate ``site``: its G divides the head dim and, for a
    projection, q and k have the shapes maps need (:func:`projection_shapes`)."""
    if config.grouping == "projection":
        return projection_shapes(site, config.group_size) is not None
    return divides_head_dim(site, config.group_size)


def projection_shapes(site: AttentionSite, g: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """The shapes of the site's projection maps at G, A (Hq, E, E/G) and B (Hkv, E, E/G), or None
    when q and k are not (B, H, L, E) with static heads and head dim divisible by G."""
    q, k = (x.meta.get("example_value") for x in (site.q, site.k))
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return None
    hq, e, hkv = q.shape[1], q.shape[3], k.shape[1]
    if not all(isinstance(x, int) for x in (hq, e, hkv)) or e % g:
        return None
    return (hq, e, e // g), (hkv, e, e // g)


def fit_site_maps(args: tuple, g: int) -> Maps:
    """Projection maps at G fitted on a site's op arguments: its q and k (in float32) with its
    masks and scale, as attention sees them there."""
    q, k, _, mask, is_causal, scale = args[:6]
    return fit_projection(q.float(), k.float(), g, is_causal=is_causal, attn_mask=mask, scale=scale)


def projected_op(args: tuple, maps: Maps) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on a site's arguments (q, k, v, mask, is_causal, scale, enable_gqa, *knobs) with the
    projection ``maps``: exact attention on (q A, k B, v) at the scale of the original head dim,
    as the rewrite emits it."""
    q, k, v, mask, is_causal, scale, enable_gqa = args[:7]
    qp, kp = project(q, k, *maps)
    return _OP(qp, kp, v, mask, is_causal, q.shape[-1] ** -0.5 if scale is None else scale, enable_gqa, EXACT,
               *args[8:])



class Calibrator:
    """Measures the sites of one graph on real inputs, one call per input list (the graph's
    positional inputs), keeping the worst case per site and G in ``errors`` (which several
    calibrators may share). With ``grouping="projection"`` each site's maps per G are fitted on
    the first call that reaches it and kept in ``maps`` (shared likewise): later calls measure
    those maps on new inputs. A call returns the graph's exact outputs."""

    def __init__(self, gm: fx.GraphModule, sites: list[AttentionSite], config: DistrConfig,
                 errors: dict[str, dict[int, dict[str, float]]] | None = None,
                 times: dict[str, dict[int, float]] | None = None, maps: dict[str, dict[int, Maps]] | None = None):
        self.probe_gm = probe_module(gm, sites)
        configs = [config.replace(group_size=g) for g in config.candidates]
        self.candidates = {s.name: [c for c in configs if runs(s, c)] for s in sites}
        self.errors = {} if errors is None else errors
        self.times = {} if times is None else times
        self.maps = {} if maps is None else maps
        self.timings = {} if config.min_speedup > 0 else None
        # Against the original model every measured G is a candidate, whatever its own error.
        self.worth_timing = lambda errors: config.guard_reference == "original" or bool(within_tolerance(errors, config))

    def __call__(self, inputs: list) -> Any:
        """Measure every site on ``inputs``; time the sites not yet timed (the first call's) where a
        candidate is within the tolerance (or any, against the original model)."""
        untimed = {name for name in self.candidates if name not in self.times}
        probe = SiteProbe(self.probe_gm, self.candidates, timings=self.timings if untimed else None, maps=self.maps,
                          worth_timing=self.worth_timing)
        out = run_probe(probe, inputs)
        for name, per_g in probe.errors.items():
            merged = self.errors.setdefault(name, {})
            for g, m in per_g.items():
                merged[g] = _worst(merged.get(g), m)
        self.times.update({name: t for name, t in probe.times.items() if name in untimed})
        return out

