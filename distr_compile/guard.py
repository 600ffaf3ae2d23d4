"""Per-site accuracy guard: calibrate, decide, fall back, remember, report.

For every attention site the guard runs exact attention and DistrAttention on the site's real
q/k/v (captured by running the graph, with every site rewritten to the exact op, through an
``fx.Interpreter`` on real inputs) and measures the error of the attention output. A site is
approximated with the cheapest candidate G whose error is within ``tolerance``; otherwise it keeps
exact attention. Decisions are keyed by the site's module path (``layers.3.self_attn``), stored
per model so recompiles reuse them, and form a :class:`DistrPlan` that saves to JSON.

Zero-shot, DistrAttention errs 0.3-1.0 (relative Frobenius) on pretrained models (BENCHMARKS.md,
"Accuracy zero-shot"), so with the default tolerance most layers stay exact; the report says so.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch._dynamo.eval_frame import innermost_backend
from torch._dynamo.symbolic_convert import InstructionTranslator
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import speed
from .config import GROUP_SIZES, ConfigError, DistrConfig
from .kernels.attention import fixed_config
from .passes import SITE_META, AttentionSite, SkippedSite, find_attention, rewrite_attention

log = logging.getLogger("distr_compile")

PLAN_VERSION = 1
EXACT = 1
_OP = torch.ops.distr.attention.default
_SCHEMA_KNOBS = ("group_size", "block_m", "num_hyperplanes", "representative", "grouping", "seed")


@dataclass
class SiteDecision:
    """What the guard decided for one site and why. ``group_size`` 1 means exact attention;
    ``errors`` maps each measured G to its metrics (``rel_fro``, ``cosine``, ``max_abs``), the
    worst over every calibration call; ``times`` maps G to the site's measured ms on the first
    calibration call (1: exact SDPA), when the guard measured speed (``min_speedup`` > 0)."""

    name: str
    pattern: str
    shapes: str
    group_size: int
    reason: str
    source: str
    errors: dict[int, dict[str, float]] = field(default_factory=dict)
    times: dict[int, float] = field(default_factory=dict)

    @property
    def approximated(self) -> bool:
        return self.group_size != EXACT

    def error(self, metric: str) -> float | None:
        """The error of the chosen G, or of the best measured candidate for an exact site."""
        if self.approximated and self.group_size in self.errors:
            return metric_error(self.errors[self.group_size], metric)
        measured = [metric_error(m, metric) for m in self.errors.values()]
        return min(measured) if measured else None


@dataclass
class DistrPlan:
    """The decisions for a model: per-site G (1 = exact) with evidence, plus the op knobs and
    guard settings they were made with. Saved as JSON (never pickle). ``output_error``: with
    ``guard_reference="original"``, the end-to-end error of these decisions against the original
    model (worst calibration batch); over ``output_tolerance`` only if every site is exact."""

    config: dict[str, Any]
    sites: dict[str, SiteDecision] = field(default_factory=dict)
    skipped: dict[str, SkippedSite] = field(default_factory=dict)
    output_error: float | None = None

    def save(self, path: str) -> str:
        """Write the plan as JSON; returns ``path`` (handy for ``options={"plan": ...}``)."""
        data = {
            "version": PLAN_VERSION,
            "config": self.config,
            "sites": [asdict(d) | {"errors": {str(g): m for g, m in d.errors.items()},
                                   "times": {str(g): t for g, t in d.times.items()}} for d in self.sites.values()],
            "skipped": [{"name": s.name, "pattern": s.pattern, "reason": s.reason, "fault": s.fault}
                        for s in self.skipped.values()],
            "output_error": self.output_error,
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> "DistrPlan":
        """Read a plan written by :meth:`save`."""
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != PLAN_VERSION:
            raise ConfigError(f"{path}: plan version {data.get('version')!r}, expected {PLAN_VERSION}")
        sites = {}
        for d in data["sites"]:
            d["errors"] = {int(g): m for g, m in d["errors"].items()}
            d["times"] = {int(g): t for g, t in d.get("times", {}).items()}  # plans from before speed checks
            sites[d["name"]] = SiteDecision(**d)
        skipped = {s["name"]: SkippedSite(**s) for s in data["skipped"]}
        return cls(data["config"], sites, skipped, data.get("output_error"))

    def decisions_for(self, sites: list[AttentionSite]) -> dict[str, SiteDecision]:
        """Copies of this plan's decisions for ``sites`` (one graph's), checked against them.

        A plan applies to the sites it names or fails loudly, never partly in silence: a site the
        plan does not name gets a warning (it is decided as without a plan); a graph none of whose
        sites the plan names, or a decision that does not fit its site (:data:`SITE_CHECKS`), is a
        :class:`ConfigError` listing every problem. Plan sites missing from this graph are not
        errors: they may be in another graph of the model (after a graph break).
        """
        known = [site for site in sites if site.name in self.sites]
        if sites and self.sites and not known:
            raise ConfigError(f"the plan does not fit this model: it names {sorted(self.sites)}, the graph has "
                              f"{[site.name for site in sites]} (was it made for another model?)")
        problems = [f"{site.name}: {problem}" for site in known for check in SITE_CHECKS
                    if (problem := check(site, self.sites[site.name])) is not None]
        if problems:
            raise ConfigError("the plan does not fit this model:\n  " + "\n  ".join(problems))
        for site in sites:
            if site.name not in self.sites:
                warnings.warn(f"distr: site {site.name} is not in the plan: it is decided without it", stacklevel=2)
        return {site.name: copy.copy(self.sites[site.name]) for site in known}

    @property
    def tolerance(self) -> float:
        return self.config["tolerance"]

    @property
    def metric(self) -> str:
        return self.config["metric"]


def _group_size_fits(site: AttentionSite, decision: SiteDecision) -> str | None:
    g = decision.group_size
    if g not in GROUP_SIZES:
        return f"G={g!r} is not one of {list(GROUP_SIZES)}"
    if not divides_head_dim(site, g):
        q = site.q.meta.get("example_value")
        return f"G={g} does not divide the head dim ({'unknown' if q is None else q.shape[-1]})"
    return None


# Checks of a plan's decision against the site it is applied to: each returns the problem, or None.
SITE_CHECKS: tuple[Callable[[AttentionSite, SiteDecision], str | None], ...] = (_group_size_fits,)


# ------------------------------------------------------------------------------- measuring


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
    on the same inputs and its worst-case metrics are kept in ``self.errors[name][G]``. What
    flows on is the exact output, or the approximated one for sites in ``propagate``. With
    ``sample_heads`` only KV head 0 and the query heads reading it are measured (the runtime
    monitor's cheap sample). With ``timings`` (a cache shared across probes, keyed by the site's
    input shapes, strides, flags and candidates: layers alike are timed once) each site's exact
    SDPA and candidates are also timed (:func:`speed.site_times`) into ``self.times[name]``.
    """

    def __init__(self, gm: fx.GraphModule, candidates: Mapping[str, Iterable[DistrConfig]],
                 propagate: Mapping[str, DistrConfig] | None = None, sample_heads: bool = False,
                 timings: dict[tuple, dict[int, float]] | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.candidates = {name: list(cfgs) for name, cfgs in candidates.items()}
        self.propagate = dict(propagate or {})
        self.sample_heads = sample_heads
        self.timings = timings
        self.errors: dict[str, dict[int, dict[str, float]]] = {}
        self.times: dict[str, dict[int, float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        name = n.meta.get(SITE_META)
        if name is None or n.target is not _OP:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        base = args[:7]
        exact = _OP(*base, EXACT, *args[8:])
        for cfg in self.candidates.get(name, ()):
            sample = _first_kv_group(base) if self.sample_heads else base
            ref = _OP(*sample, EXACT, *args[8:])[0] if self.sample_heads else exact[0]
            got = _OP(*sample, *op_knobs(cfg))[0]
            per_g = self.errors.setdefault(name, {})
            per_g[cfg.group_size] = _worst(per_g.get(cfg.group_size), measure(got, ref))
        if self.timings is not None and self.candidates.get(name):
            self.times[name] = self._time(base, self.candidates[name])
        if name in self.propagate:
            return _OP(*base, *op_knobs(self.propagate[name]))
        return exact

    def _time(self, args: tuple, candidates: list[DistrConfig]) -> dict[int, float]:
        describe = lambda x: (tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        key = (*map(describe, args), *map(op_knobs, candidates))
        if key not in self.timings:
            self.timings[key] = speed.site_times(args, op_knobs, candidates)
        return self.timings[key]


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


def probe_module(gm: fx.GraphModule, names: Iterable[str] | None = None) -> fx.GraphModule:
    """A copy of ``gm`` with the named sites (default: all) rewritten to the exact op."""
    graph = copy.deepcopy(gm.graph)
    sites, _ = find_attention(graph)
    wanted = None if names is None else set(names)
    exact = DistrConfig(group_size=EXACT)
    rewrite_attention(graph, sites, {s.name: exact for s in sites if wanted is None or s.name in wanted})
    return fx.GraphModule(gm, graph)


def run_probe(probe: SiteProbe, inputs: list) -> Any:
    """Run a probe on real inputs without touching the caller's state: no autograd, the RNG state
    restored, and every non-parameter input cloned (so in-place updates of buffers or caches in
    the graph are not applied twice). Kernels run with one fixed config (see
    :func:`kernels.attention.fixed_config`): autotuning them here would only slow the compile."""
    inputs = [x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) else x
              for x in inputs]
    devices = [x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda][:1]
    with torch.no_grad(), torch.random.fork_rng(devices=devices), fixed_config():
        return probe.run(*inputs)


def divides_head_dim(site: AttentionSite, g: int) -> bool:
    """Whether G divides the site's head dim (known at compile time)."""
    q = site.q.meta.get("example_value")
    return q is not None and statically_known_true(q.shape[-1] % g == 0)


def has_real_inputs(example_inputs: list) -> bool:
    return not any(isinstance(x, FakeTensor) for x in example_inputs)


# ------------------------------------------------------------------------------- deciding


def within_tolerance(errors: Mapping[int, Mapping[str, float]], config: DistrConfig) -> list[int]:
    """The measured candidate G whose error is within ``tolerance``, cheapest (largest) first."""
    return [g for g in config.candidates
            if g in errors and metric_error(errors[g], config.metric) <= config.tolerance]


def acceptable(errors: Mapping[int, Mapping[str, float]], times: Mapping[int, float],
               config: DistrConfig) -> list[int]:
    """The candidate G within tolerance and, where timed, at least ``min_speedup`` times faster
    than exact SDPA at the site, cheapest (largest) first."""
    return [g for g in within_tolerance(errors, config) if speed.too_slow(times, g, config.min_speedup) is None]


def decide(errors: Mapping[int, Mapping[str, float]], config: DistrConfig,
           times: Mapping[int, float] | None = None) -> tuple[int, str]:
    """The cheapest candidate G within tolerance (and fast enough, where ``times`` were measured),
    else exact; with the reason."""
    tol, metric = config.tolerance, config.metric
    times = times or {}
    passing = within_tolerance(errors, config)
    fast = acceptable(errors, times, config)
    if fast:
        g = fast[0]
        timed = f"; {times[g]:.3g} ms vs {times[EXACT]:.3g} ms exact" if g in times and EXACT in times else ""
        return g, f"G={g}: {metric} {metric_error(errors[g], metric):.3g} <= tolerance {tol:g}{timed}"
    if passing:
        return EXACT, f"slower than exact: {speed.too_slow(times, passing[0], config.min_speedup)}: keeps exact attention"
    if not errors:
        return EXACT, "no calibration data reached this site"
    shown = ", ".join(f"G={g} {metric_error(errors[g], metric):.3g}" for g in config.candidates if g in errors)
    return EXACT, f"{metric} over tolerance {tol:g} ({shown}): keeps exact attention"


class Calibrator:
    """Measures the sites of one graph on real inputs, one call per input list (the graph's
    positional inputs), keeping the worst case per site and G in ``errors`` (which several
    calibrators may share). A call returns the graph's exact outputs."""

    def __init__(self, gm: fx.GraphModule, sites: list[AttentionSite], config: DistrConfig,
                 errors: dict[str, dict[int, dict[str, float]]] | None = None,
                 times: dict[str, dict[int, float]] | None = None):
        self.probe_gm = probe_module(gm, [s.name for s in sites])
        self.candidates = {
            s.name: [config.replace(group_size=g) for g in config.candidates if divides_head_dim(s, g)] for s in sites
        }
        self.errors = {} if errors is None else errors
        self.times = {} if times is None else times
        self.timings = {} if config.min_speedup > 0 else None

    def __call__(self, inputs: list) -> Any:
        """Measure every site on ``inputs``; time the sites not yet timed (the first call's)."""
        untimed = {name for name in self.candidates if name not in self.times}
        probe = SiteProbe(self.probe_gm, self.candidates, timings=self.timings if untimed else None)
        out = run_probe(probe, inputs)
        for name, per_g in probe.errors.items():
            merged = self.errors.setdefault(name, {})
            for g, m in per_g.items():
                merged[g] = _worst(merged.get(g), m)
        self.times.update({name: t for name, t in probe.times.items() if name in untimed})
        return out


def end_to_end(gm: fx.GraphModule, inputs_list: list[list], decisions: dict[str, SiteDecision],
               config: DistrConfig) -> None:
    """Demote approximated sites (:func:`demote_until_within`) until the graph outputs with the
    approximation agree with exact ones within ``output_tolerance`` on every input list. A demoted
    site may come back at a smaller G that passed the per-site tolerance."""
    probe_gm = probe_module(gm)
    exact_outputs = [run_probe(SiteProbe(probe_gm, {}), inputs) for inputs in inputs_list]

    def error_of(approx: dict[str, DistrConfig]) -> float:
        return max(_output_error(run_probe(SiteProbe(probe_gm, {}, approx), inputs), ref)
                   for inputs, ref in zip(inputs_list, exact_outputs))

    within = {n: [g for g in acceptable(d.errors, d.times, config) if g <= d.group_size] or [d.group_size]
              for n, d in decisions.items() if d.approximated}
    before = {n: decisions[n].group_size for n in within}
    worst = demote_until_within(decisions, within, error_of, config)
    for n, g in before.items():
        if decisions[n].group_size != g:
            decisions[n].source = "end-to-end"
    log.info("end-to-end guard: %d sites approximated, graph output error %.3g",
             sum(decisions[n].approximated for n in within), worst)


def demote_until_within(decisions: dict[str, SiteDecision], choices: dict[str, list[int]],
                        error_of: Callable[[dict[str, DistrConfig]], float], config: DistrConfig) -> float:
    """Move sites to exact, or to a smaller G, until ``error_of(approx)`` (the model's end-to-end
    error with the sites in ``approx`` approximated) is within ``output_tolerance``; return it.

    ``choices[name]`` lists a site's allowed G, largest first; the site starts at the first. The
    order comes from each site's own end-to-end effect, not from its error against exact
    attention (after adaptation that error says little about what a layer does to the output):
    1. if the start is within tolerance it stays; if every site exact is not, every site is exact;
    2. rank the sites by the error with that site alone made exact (one run each), lowest first;
    3. make exact the shortest prefix of that ranking that is within tolerance (bisection);
    4. bring each of those back, least harmful first, at the largest G still within tolerance.
    Every plan this keeps was measured, so the result is within tolerance whenever step 1 allows.
    Each distinct plan runs once (the bisection and step 4 revisit plans steps 2-3 measured).
    """
    tol = config.output_tolerance
    measured: dict[frozenset, float] = {}

    def error_with(groups: dict[str, int]) -> float:
        plan = frozenset((n, g) for n, g in groups.items() if g != EXACT)
        if plan not in measured:
            measured[plan] = error_of({n: config.replace(group_size=g) for n, g in plan})
        return measured[plan]

    groups = {n: gs[0] for n, gs in choices.items()}
    for n, g in groups.items():
        decisions[n].group_size = g
    worst = error_with(groups)
    if worst <= tol or not groups:
        return worst
    all_exact = error_with({})
    if all_exact > tol:
        for n in groups:
            decisions[n].group_size = EXACT
            decisions[n].reason = f"demoted: even with every site exact the error is {all_exact:.3g} > {tol:g}"
        return all_exact
    alone = {n: error_with({**groups, n: EXACT}) for n in groups}
    order = sorted(groups, key=lambda n: (alone[n], -(decisions[n].error(config.metric) or 0.0)))
    prefix_exact = lambda k: {**groups, **dict.fromkeys(order[:k], EXACT)}  # noqa: E731
    lo, hi = 0, len(order)  # the prefix lo made exact is over tolerance, hi is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if error_with(prefix_exact(mid)) <= tol else (mid, hi)
    groups = prefix_exact(hi)
    worst = error_with(groups)
    for n in reversed(order[:hi]):
        tried = []
        for g in choices[n]:
            error = error_with({**groups, n: g})
            if error <= tol:
                groups[n], worst = g, error
                break
            tried.append(f"G={g} {error:.3g}")
        decisions[n].group_size = groups[n]
        if tried:
            to = "exact" if groups[n] == EXACT else f"G={groups[n]}"
            decisions[n].reason = (f"demoted to {to}: the model's error with this site at {', '.join(tried)} "
                                   f"> output_tolerance {tol:g}")
    log.info("end-to-end guard: %d of %d sites made exact, %d of them brought back; error %.3g",
             hi, len(order), sum(groups[n] != EXACT for n in order[:hi]), worst)
    return worst


def _output_error(out: Any, ref: Any) -> float:
    outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    refs = [r for r in torch.utils._pytree.tree_leaves(ref) if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if not outs:
        return 0.0
    flat = lambda ts: torch.cat([t.flatten().double() for t in ts])  # noqa: E731
    return measure(flat(outs), flat(refs))["rel_fro"]


def _progress(items: Iterable, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=None)


# ---------------------------------------------------------------------------------- store


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


def plan_config(config: DistrConfig) -> dict[str, Any]:
    """The config fields a plan records (everything but the plan path)."""
    data = asdict(config)
    data.pop("plan")
    data.pop("mode")
    data["candidate_group_sizes"] = list(config.candidate_group_sizes)
    return data


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


# ------------------------------------------------------------------------- user calibration


def calibrate(model: torch.nn.Module, batches: Iterable, original: torch.nn.Module | None = None,
              output_error: Callable[[Any, Any], float] | None = None, **options: Any) -> DistrPlan:
    """Calibrate every attention site of ``model`` on user batches and return the plan.

    Each batch is a tensor, a tuple of positional arguments or a dict of keyword arguments. The
    model is traced by Dynamo (a measuring backend: nothing is compiled), every site is measured
    on every batch (worst case kept, across recompiles too) and decided as the backend would with
    ``options`` (``approximate`` is taken as "guarded"). The decisions replace the model's stored
    ones; to compile with them, save the plan and pass ``options={"plan": path}``.

    With ``guard_reference="original"`` (an adapted model), ``original`` is the model before
    adaptation and the decisions come from :func:`against_original`; ``output_error(output,
    original_output)`` is the end-to-end error to keep within ``output_tolerance`` (default: the
    relative Frobenius error of the floating-point outputs; a task metric such as a perplexity
    ratio fits too).
    """
    config = DistrConfig.from_options(options).replace(approximate="guarded", plan=None, mode=None)
    if (original is not None) != (config.guard_reference == "original"):
        raise ValueError("pass original=<the model before adaptation> exactly when guard_reference='original'")
    model = getattr(model, "_orig_mod", model)
    batches = list(batches)
    errors: dict[str, dict[int, dict[str, float]]] = {}
    times: dict[str, dict[int, float]] = {}
    graphs: list[tuple[fx.GraphModule, list[AttentionSite], list[SkippedSite], list, list[list]]] = []
    replay: dict[str, dict[str, DistrConfig]] = {}  # set: the traced model runs with these sites approximated

    def measuring_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        sites, skipped = find_attention(gm.graph)
        calibrator = Calibrator(gm, sites, config, errors, times)
        seen: list[list] = []
        graphs.append((gm, sites, skipped, example_inputs, seen))

        def run(*args):
            if "sites" in replay:
                return run_probe(SiteProbe(calibrator.probe_gm, {}, replay["sites"]), list(args))
            if config.output_tolerance is not None and config.guard_reference == "exact":
                seen.append(list(args))
            return calibrator(list(args))
        return run

    traced = torch.compile(model, backend=measuring_backend)
    for batch in _progress(batches, "distr calibration"):
        call_batch(traced, batch)
    plan = DistrPlan(plan_config(config))
    for gm, sites, skipped, example_inputs, seen in graphs:
        for site in sites:
            plan.sites.setdefault(site.name, _decide_site(site, errors, times, config))
        if seen:
            end_to_end(gm, seen, {s.name: plan.sites[s.name] for s in sites}, config)
    if original is not None:
        def run_with(approx: dict[str, DistrConfig]) -> list:
            replay["sites"] = approx
            return [call_batch(traced, batch) for batch in batches]

        references = [call_batch(getattr(original, "_orig_mod", original), batch) for batch in batches]
        plan.output_error = against_original(run_with, references, plan.sites, config, output_error or _output_error)
    for gm, sites, skipped, example_inputs, seen in graphs:
        for s in skipped:
            plan.skipped[s.name] = s
            STORE.put(owners(s.module_id, example_inputs), s, config)
        for site in sites:
            STORE.put(owners(site.module_id, example_inputs), plan.sites[site.name], config)
    return plan


def call_batch(model: Callable, batch: Any) -> Any:
    """``model`` on one batch (a dict of keyword arguments, a tuple of positional ones, or one
    tensor), without autograd."""
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)


def against_original(run_with: Callable[[dict[str, DistrConfig]], list], references: list,
                     decisions: dict[str, SiteDecision], config: DistrConfig,
                     output_error: Callable[[Any, Any], float]) -> float:
    """The guard of an adapted model (``guard_reference="original"``): every measured site starts
    at its cheapest measured G and :func:`demote_until_within` moves sites to smaller G or exact
    until ``output_error(output, reference)`` is within ``output_tolerance`` on every batch.
    ``run_with(approx)`` runs the adapted model on the batches with the sites in ``approx``
    approximated; ``references`` are the original model's outputs on them. Returns the final
    error, which exceeds the tolerance only when the adapted weights alone (every site exact) do."""
    fast = lambda d: [g for g in sorted(d.errors, reverse=True)  # noqa: E731
                      if speed.too_slow(d.times, g, config.min_speedup) is None]
    choices = {n: fast(d) for n, d in decisions.items() if fast(d)}
    for n in choices:
        decisions[n].source = "original"

    def error_of(approx: dict[str, DistrConfig]) -> float:
        return max(output_error(out, ref) for out, ref in zip(run_with(approx), references))

    worst = demote_until_within(decisions, choices, error_of, config)
    tol = config.output_tolerance
    verdict = "<=" if worst <= tol else ">"
    approx = [n for n in choices if decisions[n].approximated]
    for name in approx:
        decisions[name].reason = (f"G={decisions[name].group_size}: model error {worst:.3g} vs the original "
                                  f"model's output {verdict} output_tolerance {tol:g}")
    log.info("original-reference guard: %d sites approximated, error %.3g", len(approx), worst)
    if worst > tol:
        log.warning("original-reference guard: with every site exact the adapted model is still %.3g from the "
                    "original, over output_tolerance %g", worst, tol)
    return worst


def decide_sites(gm: fx.GraphModule, inputs_list: list[list], sites: list[AttentionSite],
                 config: DistrConfig) -> dict[str, SiteDecision]:
    """Calibrate ``sites`` on the inputs, decide each, then run the end-to-end guard if asked."""
    calibrator = Calibrator(gm, sites, config)
    for inputs in inputs_list:
        calibrator(inputs)
    decisions = {site.name: _decide_site(site, calibrator.errors, calibrator.times, config) for site in sites}
    if config.output_tolerance is not None:
        end_to_end(gm, inputs_list, decisions, config)
    return decisions


def _decide_site(site: AttentionSite, errors: Mapping[str, dict], times: Mapping[str, dict],
                 config: DistrConfig) -> SiteDecision:
    measured, timed = errors.get(site.name, {}), times.get(site.name, {})
    g, reason = decide(measured, config, timed)
    log.info("%s: %s", site.name, reason)
    return SiteDecision(site.name, site.pattern, site.shapes, g, reason, "calibrated", measured, timed)

# --------------------------------------------------------------------------------- report


def report(compiled: Any, plot: str | None = None, file: Any = None) -> str:
    """Print (to ``file``, default stdout) and return a table of every attention site of a model
    or function compiled with ``backend="distr"`` (or of a plan), including the sites left alone:
    name, pattern, shapes, decision, measured error against the tolerance, and the reason.
    ``plot`` writes a PNG bar chart of each site's error against the tolerance."""
    from tabulate import tabulate

    plan = compiled if isinstance(compiled, DistrPlan) else plan_of(compiled)
    metric, tol = plan.metric, plan.tolerance
    rows = []
    for d in plan.sites.values():
        err = d.error(metric)
        rows.append([d.name, d.pattern, d.shapes, f"G={d.group_size}" if d.approximated else "exact",
                     "-" if err is None else f"{err:.3g}", f"{tol:g}", _times(d), d.reason])
    for s in plan.skipped.values():
        rows.append([s.name, s.pattern, "", "left alone", "-", "-", "-", s.reason])
    headers = ["site", "pattern", "shapes", "decision", metric, "tolerance", "ms exact / approx", "reason"]
    text = tabulate(rows, headers=headers) + "\n" + _summary(plan)
    print(text, file=file)
    if plot is not None:
        _plot(plan, plot)
    return text


def _times(d: SiteDecision) -> str:
    """'exact ms / approximated ms' of the chosen G (of the cheapest timed one for an exact site)."""
    timed = sorted((g for g in d.times if g != EXACT), reverse=True)
    g = d.group_size if d.approximated else next(iter(timed), None)
    if EXACT not in d.times or g not in d.times:
        return "-"
    return f"{d.times[EXACT]:.3g} / {d.times[g]:.3g} (G={g})"


def _summary(plan: DistrPlan) -> str:
    total = len(plan.sites) + len(plan.skipped)
    approx = [d for d in plan.sites.values() if d.approximated]
    measured = [d for d in plan.sites.values() if d.errors and not d.approximated]
    lines = [f"{len(approx)} of {total} attention sites use DistrAttention; "
             f"{total - len(approx)} keep exact attention."]
    if plan.config.get("guard_reference") == "original":
        tol = plan.config["output_tolerance"]
        lines.append(f"Reference: the original model's output (output_tolerance {tol:g}); "
                     "per-site errors are against exact attention on the adapted weights, for reference only.")
        if plan.output_error is not None:
            lines.append(f"End-to-end error of this plan on the calibration batches: {plan.output_error:.3g}"
                         + (" (over output_tolerance although every site is exact: the adapted weights alone are "
                            "that far from the original)" if plan.output_error > tol else "."))
    elif measured:
        lines.append(
            f"{len(measured)} site(s) were measured over the tolerance {plan.tolerance:g} ({plan.metric}) "
            "and stay exact: "
            "zero-shot, the approximation is too coarse for them (see the README's results); fine-tuning with it "
            "in the loop, a looser tolerance or a smaller block_m changes that."
        )
    faults = [s for s in plan.skipped.values() if s.fault]
    if len(plan.skipped) > len(faults):
        lines.append(f"{len(plan.skipped) - len(faults)} site(s) could not be rewritten exactly and were left alone "
                     "(see reason).")
    if faults:
        lines.append(f"{len(faults)} site(s) keep exact attention because the backend failed on their graph "
                     f"({', '.join(sorted({s.fault for s in faults}))}), which was compiled as it came. "
                     "That is a bug in distr-compile: the warning has the error.")
    return "\n".join(lines)


def _plot(plan: DistrPlan, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [d for d in plan.sites.values() if d.error(plan.metric) is not None]
    errors = [d.error(plan.metric) for d in sites]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sites) + 2), 4))
    ax.bar(range(len(sites)), errors, color=["tab:green" if d.approximated else "tab:red" for d in sites])
    ax.axhline(plan.tolerance, color="black", linestyle="--", label=f"tolerance {plan.tolerance:g}")
    ax.set_xticks(range(len(sites)), [d.name for d in sites], rotation=90, fontsize=7)
    ax.set_ylabel(f"{plan.metric} (green: approximated, red: exact)")
    ax.set_title("DistrAttention error per attention site")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
