"""Calibration on user batches (:func:`calibrate`): every site of a model measured and decided as
the backend would, without compiling anything."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch._dynamo.symbolic_convert import InstructionTranslator

from ..config import DistrConfig
from ..passes import AttentionSite, SiteNames, SkippedSite, find_attention
from .plan import DistrPlan, plan_config
from .policy import against_original, attach_maps, decide_site, end_to_end, relative_output_error
from .probe import Calibrator, Maps, SiteProbe, run_probe
from .store import STORE, owners


def calibrate(model: torch.nn.Module, batches: Iterable, original: torch.nn.Module | None = None,
              output_error: Callable[[Any, Any], float] | None = None, **options: Any) -> DistrPlan:
    """Calibrate every attention site of ``model`` on user batches and return the plan.

    Each batch is a tensor, a tuple of positional arguments or a dict of keyword arguments. The
    model is traced by Dynamo (a measuring backend: nothing is compiled), every site is measured
    on every batch (worst case kept, across recompiles too) and decided as the backend would with
    ``options`` (``approximate`` is taken as "guarded"). The decisions replace the model's stored
    ones; to compile with them, save the plan and pass ``options={"plan": path}``. With
    ``grouping="projection"`` each site's maps per candidate G are fitted on the first batch that
    reaches it; every batch measures them, and the plan keeps the chosen G's maps. ``batches`` is
    read once (a generator will do); it must hold at least one batch. Calibration leaves no
    compiled code behind: it drops Dynamo's entries for the code it traced, so a model of the same
    class compiled before recompiles on its next call.

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
    if isinstance(batches, (torch.Tensor, dict)):
        raise TypeError(f"batches must be an iterable of batches, got one {type(batches).__name__}: wrap it in a list")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch: a plan measured on none would decide nothing")
    errors: dict[str, dict[int, dict[str, float]]] = {}
    times: dict[str, dict[int, float]] = {}
    maps: dict[str, dict[int, Maps]] = {}
    graphs: list[tuple[Calibrator, list[AttentionSite], list[SkippedSite], list, list[list]]] = []
    replay: dict[str, dict[str, DistrConfig]] = {}  # set: the traced model runs with these sites approximated
    names = SiteNames()  # every graph of the model in one namespace, as the backend names them

    traced_codes: set = set()  # the code objects Dynamo compiled for us, whose cache entries we drop

    def measuring_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        traced_codes.add(InstructionTranslator.current_tx().f_code)
        sites, skipped = find_attention(gm.graph, names)
        calibrator = Calibrator(gm, sites, config, errors, times, maps)
        seen: list[list] = []
        graphs.append((calibrator, sites, skipped, example_inputs, seen))

        def run(*args):
            if "sites" in replay:
                return run_probe(SiteProbe(calibrator.probe_gm, {}, replay["sites"], maps=maps), list(args))
            if config.output_tolerance is not None and config.guard_reference == "exact":
                seen.append(list(args))
            return calibrator(list(args))
        return run

    traced = torch.compile(model, backend=measuring_backend)
    try:
        for batch in _progress(batches, "distr calibration"):
            call_batch(traced, batch)
        plan = DistrPlan(plan_config(config))
        for calibrator, sites, skipped, example_inputs, seen in graphs:
            for site in sites:
                plan.sites.setdefault(site.name, decide_site(site, errors, times, config))
            if seen:
                end_to_end(calibrator, seen, {s.name: plan.sites[s.name] for s in sites}, config)
        if original is not None:
            def run_with(approx: dict[str, DistrConfig]) -> list:
                replay["sites"] = approx
                return [call_batch(traced, batch) for batch in batches]

            references = [call_batch(getattr(original, "_orig_mod", original), batch) for batch in batches]
            plan.output_error = against_original(run_with, references, plan.sites, config,
                                                 output_error or relative_output_error)
    finally:
        _forget(traced_codes)
    attach_maps(plan.sites, maps)
    for _, sites, skipped, example_inputs, seen in graphs:
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


def _forget(codes: Iterable) -> None:
    """Drop Dynamo's compiled entries of ``codes``. Each calibration compiles with a new backend,
    which Dynamo does not match to an earlier one: kept, the entries would pile up per code
    object until the recompile limit, after which Dynamo runs the model eagerly and calibration
    (and a later ``torch.compile`` of the same model class) silently measures nothing."""
    for code in codes:
        torch._dynamo.reset_code(code)


def _progress(items: Iterable, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=None)

