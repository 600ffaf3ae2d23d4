"""Where a site's decision comes from: :func:`decide_graph`, called once per graph by the backend
and by :func:`distr_compile.export.rewrite_exported`."""

from __future__ import annotations

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ..config import ConfigError, DistrConfig
from ..passes import AttentionSite
from .fit import fit_maps
from .plan import DistrPlan, SiteDecision
from .policy import decide_sites
from .probe import EXACT, head_dim_problem, projection_shapes
from .store import STORE, Owner, owners


def decide_graph(gm: fx.GraphModule, example_inputs: list, sites: list[AttentionSite], config: DistrConfig,
                 plan: DistrPlan | None) -> dict[str, SiteDecision]:
    """Decide every site of one graph and store the decisions for the model's later compiles.

    A site takes the first of: the saved ``plan``'s decision; one stored by an earlier compile of
    the same model with the same options (if its G still divides the head dim); the
    ``approximate`` setting ("always": ``group_size`` unguarded, "auto": exact on CPU); the
    decision calibrated on ``example_inputs`` (:func:`decide_sites`; a projection's maps are
    fitted and measured there); exact attention, when the inputs are fake and there is nothing to
    calibrate on. With ``guard_reference="original"`` a site left to calibrate is a
    :class:`ConfigError`: that guard needs the original model. A site approximated by a projection
    without maps (``approximate="always"``) gets them fitted on ``example_inputs`` (:func:`fit_maps`).
    """
    decisions = plan.decisions_for(sites) if plan is not None else {}
    todo = []
    for site in sites:
        if site.name in decisions:
            continue
        decision = _known_decision(site, owners(site.module_id, example_inputs), config)
        if decision is None:
            todo.append(site)
        else:
            decisions[site.name] = decision
    if todo and config.guard_reference == "original":
        raise ConfigError(
            "guard_reference='original' needs the original model, which the backend does not have: run "
            "distr_compile.calibrate(adapted, batches, original=model, guard_reference='original', ...), save the "
            f"plan and compile with options={{'plan': path}} (sites without a decision: {[s.name for s in todo]})"
        )
    if todo and has_real_inputs(example_inputs):
        decisions.update(decide_sites(gm, [list(example_inputs)], todo, config))
    for site in todo:
        decisions.setdefault(site.name, _decision(site, EXACT, "no real example inputs to calibrate on", "default"))
    fit_maps(gm, example_inputs, sites, decisions, has_real_inputs(example_inputs))
    for site in sites:
        STORE.put(owners(site.module_id, example_inputs), decisions[site.name], config)
    return decisions


def has_real_inputs(example_inputs: list) -> bool:
    """Whether the graph's example inputs are real tensors (not fake ones) that calibration can run on."""
    return not any(isinstance(x, FakeTensor) for x in example_inputs)


def _known_decision(site: AttentionSite, whos: list[Owner], config: DistrConfig) -> SiteDecision | None:
    """A decision that needs no calibration (stored, forced or by device), or None."""
    stored = STORE.get(whos, site.name, config)
    if stored is not None:
        return _valid(site, stored)
    if config.approximate == "always":
        reason = f"forced: approximate='always' (G={config.group_size}, no guard)"
        return _valid(site, _decision(site, config.group_size, reason, "forced", config.grouping))
    if config.approximate == "auto" and not _on_cuda(site):
        return _decision(site, EXACT, "CPU: exact (approximate='auto' approximates on CUDA only)", "device")
    return None


def _valid(site: AttentionSite, decision: SiteDecision) -> SiteDecision | None:
    """``decision`` if its G divides the head dim (it may not after a shape change) and, for a
    projection, the site has the shapes maps need, else None (recalibrate) or, when forced, exact
    with the reason."""
    g = decision.group_size
    problem = head_dim_problem(site, g)
    if problem is None and decision.projected and projection_shapes(site, g) is None:
        problem = f"grouping='projection' needs q and k of shape (B, H, L, E) with static H and E, got {site.shapes}"
    if problem is None:
        return decision
    return _decision(site, EXACT, problem, "forced") if decision.source == "forced" else None


def _decision(site: AttentionSite, group_size: int, reason: str, source: str,
              grouping: str = DistrConfig.grouping) -> SiteDecision:
    return SiteDecision(site.name, site.pattern, site.shapes, group_size, reason, source, grouping=grouping)


def _on_cuda(site: AttentionSite) -> bool:
    q = site.q.meta.get("example_value")
    return q is not None and q.is_cuda

