"""Deciding from measurements: per site, the cheapest candidate G within ``tolerance`` (and fast
enough); then, with ``output_tolerance``, the end-to-end search that demotes sites until the
output is close enough to exact attention's or, for an adapted model, to the original model's."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from .. import speed
from ..config import DistrConfig
from ..passes import AttentionSite
from .plan import SiteDecision
from .probe import (
    EXACT, Calibrator, Maps, SiteProbe, measure, metric_error, run_probe, within_tolerance,
)

log = logging.getLogger("distr_compile")


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


def decide_sites(gm: fx.GraphModule, inputs_list: list[list], sites: list[AttentionSite],
                 config: DistrConfig) -> dict[str, SiteDecision]:
    """Calibrate ``sites`` on the inputs, decide each, then run the end-to-end guard if asked."""
    calibrator = Calibrator(gm, sites, config)
    for inputs in inputs_list:
        calibrator(inputs)
    decisions = {site.name: decide_site(site, calibrator.errors, calibrator.times, config) for site in sites}
    if config.output_tolerance is not None:
        end_to_end(calibrator, inputs_list, decisions, config)
    attach_maps(decisions, calibrator.maps)
    return decisions


def attach_maps(decisions: Mapping[str, SiteDecision], maps: Mapping[str, Mapping[int, Maps]]) -> None:
    """Give each projected decision the maps calibration fitted and measured at its final G."""
    for d in decisions.values():
        if d.projected:
            d.maps = maps[d.name][d.group_size]


def decide_site(site: AttentionSite, errors: Mapping[str, dict], times: Mapping[str, dict],
                config: DistrConfig) -> SiteDecision:
    """``site``'s calibrated decision from the errors and times measured per site name."""
    measured, timed = errors.get(site.name, {}), times.get(site.name, {})
    g, reason = decide(measured, config, timed)
    log.info("%s: %s", site.name, reason)
    return SiteDecision(site.name, site.pattern, site.shapes, g, reason, "calibrated", measured, timed, config.grouping)


def end_to_end(calibrator: Calibrator, inputs_list: list[list], decisions: dict[str, SiteDecision],
               config: DistrConfig) -> None:
    """Demote approximated sites (:func:`demote_until_within`) until the graph outputs with the
    approximation agree with exact ones within ``output_tolerance`` on every input list, running
    the graph that ``calibrator`` measured the decided sites in. A demoted site may come back at a
    smaller G that passed the per-site tolerance. Projected sites run with the maps calibration
    fitted for them."""
    probe_gm, maps = calibrator.probe_gm, calibrator.maps
    exact_outputs = [run_probe(SiteProbe(probe_gm, {}), inputs) for inputs in inputs_list]

    def error_of(approx: dict[str, DistrConfig]) -> float:
        return max(relative_output_error(run_probe(SiteProbe(probe_gm, {}, approx, maps=maps), inputs), ref)
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


def relative_output_error(out: Any, ref: Any) -> float:
    """The relative Frobenius error of the floating-point tensors of ``out`` against ``ref``."""
    outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    refs = [r for r in torch.utils._pytree.tree_leaves(ref) if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if not outs:
        return 0.0
    flat = lambda ts: torch.cat([t.flatten().double() for t in ts])  # noqa: E731
    return measure(flat(outs), flat(refs))["rel_fro"]


