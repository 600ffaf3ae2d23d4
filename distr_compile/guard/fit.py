"""Fitting the projection maps (``grouping="projection"``) of a graph's sites on its example inputs."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx as fx

from ..passes import SITE_META, AttentionSite
from ..projection import fit_projection
from .plan import SiteDecision
from .probe import EXACT, probe_module, projected_op, run_probe

_OP = torch.ops.distr.attention.default


class MapFitter(fx.Interpreter):
    """Runs a graph whose sites were rewritten to the exact op (:func:`probe_module`) and fits the
    maps of each site in ``group_sizes`` on the q and k it sees (float32, with its masks and
    scale) into ``self.maps``. A fitted site passes on its projected output, so each later site is
    fitted on the inputs it sees in the compiled graph."""

    def __init__(self, gm: fx.GraphModule, group_sizes: Mapping[str, int]):
        super().__init__(gm, garbage_collect_values=True)
        self.group_sizes = dict(group_sizes)
        self.maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        name = n.meta.get(SITE_META)
        if name not in self.group_sizes or n.target is not _OP:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        q, k, _, mask, is_causal, scale = args[:6]
        self.maps[name] = fit_projection(q.float(), k.float(), self.group_sizes[name], is_causal=is_causal,
                                         attn_mask=mask, scale=scale)
        return projected_op(args, self.maps[name])


def fit_maps(gm: fx.GraphModule, example_inputs: list, sites: list[AttentionSite],
             decisions: Mapping[str, SiteDecision], real_inputs: bool) -> None:
    """Give every projected decision without maps its maps, fitted on ``example_inputs``; without
    ``real_inputs`` (fake tensors: nothing to fit on) such a site keeps exact attention instead."""
    todo = {s.name: decisions[s.name].group_size for s in sites
            if decisions[s.name].projected and decisions[s.name].maps is None}
    if not todo:
        return
    if not real_inputs:
        for name in todo:
            d = decisions[name]
            d.group_size, d.reason = EXACT, "grouping='projection': no real example inputs to fit the maps on"
        return
    fitter = MapFitter(probe_module(gm, todo), todo)
    run_probe(fitter, list(example_inputs))
    for name, maps in fitter.maps.items():
        decisions[name].maps = maps
