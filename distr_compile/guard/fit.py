"""Fitting the projection maps (``grouping="projection"``) of a graph's sites on its example inputs."""

from __future__ import annotations

from typing import Mapping

import torch.fx as fx

from ..config import DistrConfig
from ..passes import AttentionSite
from .plan import SiteDecision
from .probe import EXACT, SiteProbe, probe_module, run_probe


def fit_maps(gm: fx.GraphModule, example_inputs: list, sites: list[AttentionSite],
             decisions: Mapping[str, SiteDecision], real_inputs: bool) -> None:
    """Give every projected decision without maps its maps, fitted on ``example_inputs``; without
    ``real_inputs`` (fake tensors: nothing to fit on) such a site keeps exact attention instead.

    The graph runs with those sites projected (:class:`SiteProbe` propagating them), so each site
    is fitted on the inputs it sees in the compiled graph, after the sites before it."""
    todo = {s.name: DistrConfig(group_size=decisions[s.name].group_size, grouping="projection") for s in sites
            if decisions[s.name].projected and decisions[s.name].maps is None}
    if not todo:
        return
    if not real_inputs:
        for name in todo:
            d = decisions[name]
            d.group_size, d.reason = EXACT, "grouping='projection': no real example inputs to fit the maps on"
        return
    probe = SiteProbe(probe_module(gm, [s for s in sites if s.name in todo]), {}, propagate=todo)
    run_probe(probe, list(example_inputs))
    for name, config in todo.items():
        decisions[name].maps = probe.maps[name][config.group_size]
