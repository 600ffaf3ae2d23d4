"""The ``distr`` torch.compile backend: Dynamo graph -> attention pass -> guard -> Inductor.

Registered only through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="distr", options={...})`` works without importing this package.

Per graph: find the attention sites, decide each (``guard.decide_graph``: a saved plan, a
decision stored by an earlier compile of the same model, the ``approximate`` setting, or
calibration on the real example inputs), rewrite the approximated sites to ``torch.ops.distr.attention`` and hand the graph to
``torch._inductor.compile_fx.compile_fx``. Sites that stay exact keep their attention; the one
change there is exact (an SDPA mask takes its simpler form where it has one: none, ``is_causal``
or the padding row, passes/masks.py). A graph without attention compiles exactly as with ``backend="inductor"``.

The backend never makes a compile fail where Inductor would not: when a stage of its own work on
a graph raises (matching, the mask rewrite, calibration and its kernel launches, the
rewrite, Inductor on the rewritten graph), the graph is compiled as it came, a warning names the
stage and the error, and ``report`` shows the graph's sites kept exact with it. Errors that are
the user's to fix (unknown options, a plan that does not fit the model) are raised.

Each stage, and Inductor, logs its wall time at INFO on the ``distr_compile`` logger
(``logging.getLogger("distr_compile").setLevel("INFO")`` shows them), so a slow first call can be
told apart: the backend's own work or Inductor's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .config import ConfigError, DistrConfig
from .guard import (
    EXACT, DistrPlan, SiteDecision, SiteProbe, decide_graph, metric_error, probe_module, remember_graph, run_probe,
    site_names, sites_on,
)
from .passes import (
    AttentionSite, SkippedSite, drop_maps, find_attention, register_maps, rewrite_attention, use_simpler_masks,
)

log = logging.getLogger("distr_compile")
INDUCTOR = "Inductor"  # the stage name under which Inductor's compile time is logged (see _timed)


def distr_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                  mode: str | None = None) -> Callable:
    """Compile a Dynamo graph with DistrAttention in place of attention where the guard allows.

    ``options`` are :class:`DistrConfig` fields (unknown keys are an error; a plan's own settings
    apply with it, see :meth:`DistrPlan.settings`); ``mode`` is
    torch.compile's mode (or ``options["mode"]``), passed on to Inductor (``"reduce-overhead"``
    uses CUDA graphs).
    """
    given = DistrConfig.fields_of(options)
    config = DistrConfig(**given)
    plan = DistrPlan.load(config.plan) if config.plan else None
    if plan is not None:
        config = plan.settings(config, given)
    patches = _inductor_patches(mode or config.mode)
    original = copy.deepcopy(gm.graph)
    try:
        return _distr_compile(gm, example_inputs, config, plan, patches, original)
    except BackendFault as fault:
        _record(fault, gm, example_inputs, config)
        _restore(gm, original)
        with _timed(INDUCTOR):
            return compile_fx(gm, example_inputs, config_patches=patches)


def _distr_compile(gm: fx.GraphModule, example_inputs: list, config: DistrConfig, plan: DistrPlan | None,
                   patches: dict, original: fx.Graph) -> Callable:
    """The backend's work on one graph: find the sites, decide each (:func:`decide_graph`), rewrite
    and compile (:func:`_compile`), monitor the approximated sites at run time if asked
    (``original``: an untouched copy of the graph, for the monitor). A failing stage
    (:func:`_stage`) raises :class:`BackendFault`."""
    with _stage("matching"):
        sites, skipped = find_attention(gm.graph, site_names())
    for s in skipped:
        log.info("left alone: %s (%s): %s", s.name, s.pattern, s.reason)
    remember_graph(example_inputs, skipped, config)
    with _stage("calibration", sites):
        decisions = decide_graph(gm, example_inputs, sites, config, plan)
    compiled = _compile(gm, sites, decisions, example_inputs, config, patches)
    if config.monitor_every and any(d.approximated for d in decisions.values()):
        if patches.get("triton.cudagraphs") or torch._inductor.config.triton.cudagraphs:
            warnings.warn("distr: the runtime monitor (monitor_every) is disabled under CUDA graphs", stacklevel=2)
        else:
            compiled = _Monitor(fx.GraphModule(gm, original), sites, decisions, config, patches, compiled)
    fitted = _FittedParameters.sites_of(decisions)
    if not fitted:
        return compiled
    return _FittedParameters(compiled, example_inputs, fitted, any(d.projected for d in decisions.values()))


class BackendFault(Exception):
    """A stage of the backend's own work failed on a graph whose sites (once matched) are ``sites``."""

    def __init__(self, stage: str, error: Exception, sites: list[AttentionSite]) -> None:
        message = next(iter(str(error).splitlines()), "")  # fx.Interpreter appends the graph and a traceback
        super().__init__(f"{stage} failed ({type(error).__name__}: {message})")
        self.stage, self.error, self.sites = stage, error, sites


# Not faults: the user's errors, and Dynamo's own signals (restart the analysis), which Dynamo handles
# itself. The fake-tensor errors Dynamo answers by running the whole graph eagerly ARE faults when our
# work raises them (or Inductor does, on the graph we rewrote): the original graph is compiled with
# Inductor instead, which is what backend="inductor" would run.
_NOT_FAULTS = (ConfigError, BackendFault, torch._dynamo.exc.TorchDynamoException)


@contextlib.contextmanager
def _stage(name: str, sites: Iterable[AttentionSite] = ()) -> Iterator[None]:
    """A stage of the backend's own work: timed (:func:`_timed`), and what it raises becomes a
    :class:`BackendFault` (:func:`_as_fault`)."""
    with _timed(name), _as_fault(name, sites):
        yield


@contextlib.contextmanager
def _timed(stage: str) -> Iterator[None]:
    """Log the wall time of ``stage`` at INFO. The record carries ``distr_stage`` and ``seconds``
    (``extra``), so a tool can add up the backend's own stages against Inductor's (``INDUCTOR``)
    without parsing messages: benchmarks/compile_time.py does."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        log.info("distr: %s took %.3f s", stage, seconds, extra={"distr_stage": stage, "seconds": seconds})


@contextlib.contextmanager
def _as_fault(name: str, sites: Iterable[AttentionSite] = ()) -> Iterator[None]:
    """What the block raises becomes a :class:`BackendFault` of stage ``name``, except what is not a
    fault (``_NOT_FAULTS``)."""
    try:
        yield
    except _NOT_FAULTS:
        raise
    except Exception as error:
        raise BackendFault(name, error, list(sites)) from error


def _record(fault: BackendFault, gm: fx.GraphModule, example_inputs: list, config: DistrConfig) -> None:
    """Warn about ``fault`` and store the graph's sites (or the graph, if matching failed) as left
    alone because of it, for ``report``."""
    reason = f"the backend's {fault}; the graph was compiled as it came"
    warnings.warn(f"distr: {reason}. This is a bug in distr-compile: please report it.", stacklevel=2)
    log.info("distr: %s", reason, exc_info=fault.error)
    left = [SkippedSite(s.name, s.pattern, reason, s.module_id, fault.stage) for s in fault.sites]
    if not left:  # matching failed: the graph stands for its sites
        left = [SkippedSite(f"graph {gm.meta.get('dynamo_compile_id', '?')}", "-", reason, fault=fault.stage)]
    remember_graph(example_inputs, left, config)


def _restore(gm: fx.GraphModule, original: fx.Graph) -> None:
    """Put the untouched copy ``original`` back as ``gm``'s graph. Dynamo gives placeholders their
    source as a node attribute, not in meta, and AOTAutograd reads it; a graph copy drops it, so it
    moves over (the passes never add or remove placeholders). The projection maps the rewrite
    registered go too."""
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), original.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    gm.graph = original
    drop_maps(gm)


def _inductor_patches(mode: str | None) -> dict:
    """Inductor config patches for torch.compile's ``mode``, plus the source key (see SourceKey)."""
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if torch._inductor.config.post_grad_custom_post_pass is None:  # never displace a user's pass
        patches["post_grad_custom_post_pass"] = SOURCE_KEY
    return patches


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


def _compile(gm: fx.GraphModule, sites: list[AttentionSite], decisions: Mapping[str, SiteDecision],
             example_inputs: list, config: DistrConfig, patches: dict) -> Callable:
    """Rewrite the sites to be approximated (every site when forced; a projection with its maps as
    buffers of ``gm``) and the masks of the exact SDPA sites that have a simpler form, and compile
    with Inductor, each a stage (see :func:`_stage`)."""
    configs = {
        name: config.replace(group_size=d.group_size, grouping=d.grouping)
        for name, d in decisions.items()
        if d.approximated or (d.source == "forced" and config.approximate == "always")
    }
    with _stage("mask rewrite", sites):
        folded = use_simpler_masks(s for s in sites if s.name not in configs)
    with _stage("rewrite", sites):
        maps = register_maps(gm, sites, {name: d.maps for name, d in decisions.items() if d.projected})
        rewrite_attention(gm.graph, sites, configs, maps)
        gm.recompile()
    # Inductor failing on a graph we did not change is Inductor's error, as with backend="inductor".
    changed = _as_fault("Inductor on the rewritten graph", sites) if configs or folded else contextlib.nullcontext()
    with _timed(INDUCTOR), changed:
        return compile_fx(gm, example_inputs, config_patches=patches)


class _FittedParameters:
    """A compiled graph whose approximations were fitted to the parameters it was compiled with:
    decisions the guard calibrated on them, and projection maps. Warns once when it is called with
    other parameters. Dynamo reuses a graph for every module that runs the same code under equal
    compile options (it compares backends by value): the identical layers of regional compilation
    (``layer.compile()`` on each), a second model of the same class compiled on its own, or
    ``torch.func.functional_call`` with other weights. The first parameters' decisions and maps
    would then serve the others, unmeasured.

    Like every wrapper here it is called as Dynamo calls what a backend returns: with the graph's
    inputs as positional arguments. (Inductor's callable says ``_boxed_call`` all the same: AOT
    autograd's unboxed wrapper copies the attribute from the boxed function it wraps.)"""

    def __init__(self, compiled: Callable, example_inputs: list, sites: list[str], projected: bool):
        self.compiled, self.sites, self.projected = compiled, sites, projected
        # One parameter tells modules apart (another layer or model owns other storage): checking
        # it alone keeps the per-call cost constant, whatever the model's size.
        self.parameter = next(((i, x.data_ptr()) for i, x in enumerate(example_inputs)
                               if isinstance(x, torch.nn.Parameter)), None)
        self.warned = False

    @staticmethod
    def sites_of(decisions: Mapping[str, SiteDecision]) -> list[str]:
        """The sites whose approximation was fitted to the parameters: calibrated or projected."""
        return [name for name, d in decisions.items()
                if d.projected or (d.approximated and d.source in ("calibrated", "end-to-end"))]

    def __call__(self, *args: Any) -> Any:
        if not self.warned and self.parameter is not None and args[self.parameter[0]].data_ptr() != self.parameter[1]:
            self.warned = True
            fitted = "the guard's decisions and projection maps" if self.projected else "the guard's decisions"
            warnings.warn(
                f"distr: {fitted} of {', '.join(self.sites)} were fitted with the parameters this graph was compiled "
                "with, and it now runs with other parameters (Dynamo reuses a graph for modules that run the same "
                "code under equal options: regional compilation of identical layers, another model of the same "
                "class, functional_call): they were not measured on these. Compile the whole model, give each "
                "model its own plan (options={'plan': path}), or, for a transformers model with projection maps, "
                "keep each layer's maps on its attention module (distr_compile.configure(model, config, "
                "calibration=batches)) and compile the layers with Inductor.",
                stacklevel=2)
        return self.compiled(*args)


class _Monitor:
    """Runtime monitor: every ``monitor_every`` calls, recheck the approximated sites on the
    call's real inputs (the heads reading KV head 0 only) and, if one drifted over the
    tolerance, demote it to exact and recompile the graph. Projection sites are not rechecked."""

    def __init__(self, original: fx.GraphModule, sites: list[AttentionSite], decisions: dict[str, SiteDecision],
                 config: DistrConfig, patches: dict, compiled: Callable):
        self.original, self.decisions, self.config, self.patches = original, decisions, config, patches
        self.sites = sites_on(original.graph, sites)
        self.compiled = compiled
        self.probe = probe_module(original, self.sites)
        self.calls = 0
        self.active = True

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.active and self.calls % self.config.monitor_every == 0:
            try:
                self._check(list(args))
            except Exception as error:  # a bug of ours must not fail the user's call
                warnings.warn(f"distr: the runtime monitor failed ({type(error).__name__}: {error}); it is off for "
                              "this graph, which runs on as compiled. This is a bug in distr-compile: please report it.",
                              stacklevel=2)
                self.active = False
        return self.compiled(*args)

    def _check(self, args: list) -> None:
        approx = {n: self.config.replace(group_size=d.group_size, grouping=d.grouping)
                  for n, d in self.decisions.items()
                  if d.approximated and not d.projected}  # a projection is not rechecked
        probe = SiteProbe(self.probe, {n: [c] for n, c in approx.items()}, sample_heads=True)
        run_probe(probe, list(args))
        drifted = {}
        for name, per_g in probe.errors.items():
            err = metric_error(per_g[self.decisions[name].group_size], self.config.metric)
            if err > self.config.tolerance:
                drifted[name] = (f"demoted at call {self.calls}: {self.config.metric} {err:.3g} "
                                 f"> tolerance {self.config.tolerance:g}")
        if not drifted:
            return
        gm = fx.GraphModule(self.original, copy.deepcopy(self.original.graph))
        exact = {n: dataclasses.replace(self.decisions[n], group_size=EXACT) for n in drifted}
        self.compiled = _compile(gm, sites_on(gm.graph, self.sites), {**self.decisions, **exact}, list(args),
                                 self.config, self.patches)
        for name, reason in drifted.items():  # the stored decisions change once the exact graph is in place
            d = self.decisions[name]
            d.group_size, d.source, d.reason = EXACT, "monitor", reason
            log.warning("distr monitor: %s %s", name, reason)
