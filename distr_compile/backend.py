"""The ``distr`` torch.compile backend: Dynamo graph -> attention pass -> guard -> Inductor.

Registered only through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="distr", options={...})`` works without importing this package.

Per graph: find the attention sites, decide each (a saved plan, a decision stored by an earlier
compile of the same model, the ``approximate`` setting, or calibration on the real example
inputs), rewrite the approximated sites to ``torch.ops.distr.attention`` and hand the graph to
``torch._inductor.compile_fx.compile_fx``. Sites that stay exact keep their attention; the one
change there is exact (an SDPA call whose mask is the constant causal pattern takes ``is_causal``,
passes/causal.py). A graph without attention compiles exactly as with ``backend="inductor"``.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .config import DistrConfig
from .guard import (
    EXACT, STORE, DistrPlan, Owner, SiteDecision, SiteProbe, decide_sites, divides_head_dim, has_real_inputs, log,
    metric_error, owner, probe_module, run_probe,
)
from .passes import AttentionSite, find_attention, rewrite_attention, use_is_causal


def distr_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                  mode: str | None = None) -> Callable:
    """Compile a Dynamo graph with DistrAttention in place of attention where the guard allows.

    ``options`` are :class:`DistrConfig` fields (unknown keys are an error); ``mode`` is
    torch.compile's mode (or ``options["mode"]``), passed on to Inductor (``"reduce-overhead"``
    uses CUDA graphs).
    """
    config = DistrConfig.from_options(options)
    sites, skipped = find_attention(gm.graph)
    for s in skipped:
        log.info("left alone: %s (%s): %s", s.name, s.pattern, s.reason)
        STORE.put(owner(s.module_id, example_inputs), s, config)
    decisions = _decisions(gm, example_inputs, sites, config)
    mode = mode or config.mode
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if torch._inductor.config.post_grad_custom_post_pass is None:  # never displace a user's pass
        patches["post_grad_custom_post_pass"] = SOURCE_KEY
    original = copy.deepcopy(gm.graph) if config.monitor_every else None
    compiled = _compile(gm, sites, decisions, example_inputs, config, patches)
    if original is None or not any(d.approximated for d in decisions.values()):
        return compiled
    if patches.get("triton.cudagraphs") or torch._inductor.config.triton.cudagraphs:
        warnings.warn("distr: the runtime monitor (monitor_every) is disabled under CUDA graphs", stacklevel=2)
        return compiled
    return _Monitor(fx.GraphModule(gm, original), decisions, config, patches, compiled)


class SourceKey(CustomGraphPass):
    """A post-grad pass that does nothing; its ``uuid`` (part of Inductor's cache keys) hashes this
    package's source. Those caches key a graph calling ``distr::attention`` on the op's name and
    Triton kernels, not on its PyTorch code (the CPU path): without this, a graph compiled by an
    earlier distr-compile could be served after an upgrade."""

    def __call__(self, graph: fx.Graph) -> None:
        pass

    @functools.cache
    def uuid(self) -> bytes:  # the source does not change while the process runs: hash it once
        return get_hash_for_files(tuple(sorted(str(p) for p in Path(__file__).parent.rglob("*.py"))))


SOURCE_KEY = SourceKey()


def _decisions(gm: fx.GraphModule, example_inputs: list, sites: list[AttentionSite],
               config: DistrConfig) -> dict[str, SiteDecision]:
    plan = DistrPlan.load(config.plan) if config.plan else None
    decisions: dict[str, SiteDecision] = {}
    todo = []
    for site in sites:
        decision = _known_decision(site, owner(site.module_id, example_inputs), config, plan)
        if decision is None:
            todo.append(site)
        else:
            decisions[site.name] = decision
    if todo and config.guard_reference == "original":
        raise ValueError(
            "guard_reference='original' needs the original model, which the backend does not have: run "
            "distr_compile.calibrate(adapted, batches, original=model, guard_reference='original', ...), save the "
            f"plan and compile with options={{'plan': path}} (sites without a decision: {[s.name for s in todo]})"
        )
    if todo and has_real_inputs(example_inputs):
        decisions.update(decide_sites(gm, [list(example_inputs)], todo, config))
    for site in todo:
        decisions.setdefault(site.name, _decision(site, EXACT, "no real example inputs to calibrate on", "default"))
    for site in sites:
        STORE.put(owner(site.module_id, example_inputs), decisions[site.name], config)
    return decisions


def _known_decision(site: AttentionSite, who: Owner | None, config: DistrConfig,
                    plan: DistrPlan | None) -> SiteDecision | None:
    """A decision that needs no calibration, or None."""
    if plan is not None:
        if site.name in plan.sites:
            return _valid(site, copy.copy(plan.sites[site.name]), config)
        log.warning("site %s is not in plan %s: calibrating it", site.name, config.plan)
    stored = STORE.get(who, site.name, config)
    if stored is not None:
        return _valid(site, stored, config)
    if config.approximate == "always":
        reason = f"forced: approximate='always' (G={config.group_size}, no guard)"
        return _valid(site, _decision(site, config.group_size, reason, "forced"), config)
    if config.approximate == "auto" and not _on_cuda(site):
        return _decision(site, EXACT, "CPU: exact (approximate='auto' approximates on CUDA only)", "device")
    return None


def _valid(site: AttentionSite, decision: SiteDecision, config: DistrConfig) -> SiteDecision | None:
    """``decision`` if its G divides the head dim (it may not after a shape change), else None
    (recalibrate) or, when forced, exact with the reason."""
    if divides_head_dim(site, decision.group_size):
        return decision
    if decision.source == "forced":
        return _decision(site, EXACT, f"head dim not divisible by G={decision.group_size}", "forced")
    return None


def _decision(site: AttentionSite, group_size: int, reason: str, source: str) -> SiteDecision:
    return SiteDecision(site.name, site.pattern, site.shapes, group_size, reason, source)


def _on_cuda(site: AttentionSite) -> bool:
    q = site.q.meta.get("example_value")
    return q is not None and q.is_cuda


def _compile(gm: fx.GraphModule, sites: list[AttentionSite], decisions: Mapping[str, SiteDecision],
             example_inputs: list, config: DistrConfig, patches: dict) -> Callable:
    """Rewrite the sites to be approximated (every site when forced) and compile with Inductor."""
    configs = {
        name: config.replace(group_size=d.group_size)
        for name, d in decisions.items()
        if d.approximated or (d.source == "forced" and config.approximate == "always")
    }
    use_is_causal(s for s in sites if s.name not in configs)
    rewrite_attention(gm.graph, sites, configs)
    gm.recompile()
    return compile_fx(gm, example_inputs, config_patches=patches)


class _Monitor:
    """Runtime monitor: every ``monitor_every`` calls, recheck the approximated sites on the
    call's real inputs (the heads reading KV head 0 only) and, if one drifted over the
    tolerance, demote it to exact and recompile the graph."""

    def __init__(self, original: fx.GraphModule, decisions: dict[str, SiteDecision], config: DistrConfig,
                 patches: dict, compiled: Callable):
        self.original, self.decisions, self.config, self.patches = original, decisions, config, patches
        self.compiled = compiled
        self.probe = probe_module(original)
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        self.calls += 1
        if self.calls % self.config.monitor_every == 0:
            self._check(args)
        return self.compiled(args) if getattr(self.compiled, "_boxed_call", False) else self.compiled(*args)

    def _check(self, args: list) -> None:
        approx = {n: self.config.replace(group_size=d.group_size) for n, d in self.decisions.items() if d.approximated}
        probe = SiteProbe(self.probe, {n: [c] for n, c in approx.items()}, sample_heads=True)
        run_probe(probe, list(args))
        drifted = []
        for name, per_g in probe.errors.items():
            d = self.decisions[name]
            err = metric_error(per_g[d.group_size], self.config.metric)
            if err > self.config.tolerance:
                d.reason = (f"demoted at call {self.calls}: {self.config.metric} {err:.3g} "
                            f"> tolerance {self.config.tolerance:g}")
                d.group_size, d.source = EXACT, "monitor"
                drifted.append(name)
                log.warning("distr monitor: %s %s", name, d.reason)
        if drifted:
            gm = fx.GraphModule(self.original, copy.deepcopy(self.original.graph))
            sites, _ = find_attention(gm.graph)
            self.compiled = _compile(gm, sites, self.decisions, list(args), self.config, self.patches)
