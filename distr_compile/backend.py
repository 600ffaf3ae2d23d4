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
        return _inductor(gm, example_inputs, patches)


def _distr_compile(gm: fx.GraphModule, example_inputs: list, config: DistrConfig, plan: DistrPlan | None,
                   patches: dict, original: fx.Graph) -> Callable:
    """The backend's work on one graph: find the sites, decide each (:func:`decide_graph`), rewrite
    and compile (:func:`_compile`); monitor the approximated sites at run time if asked
    (:class:`_Monitor`), and run exact attention at the sites fitted to the graph's parameters when
    it is called with others (:class:`_FittedParameters`). Both compile the graph again from
    ``original``, an untouched copy of it. A failing stage (:func:`_stage`) raises
    :class:`BackendFault`."""
    with _stage("matching"):
        sites, skipped = find_attention(gm.graph, site_names())
    for s in skipped:
        log.info("left alone: %s (%s): %s", s.name, s.pattern, s.reason)
    remember_graph(example_inputs, skipped, config)
    with _stage("calibration", sites):
        decisions = decide_graph(gm, example_inputs, sites, config, plan)
    compiled = _compile(gm, sites, decisions, example_inputs, config, patches)
    monitored = _monitored(decisions, config, patches)
    parameter = _first_parameter(example_inputs)  # without one, callers cannot be told apart
    fitted = _FittedParameters.sites_of(decisions) if parameter is not None else []
    if not monitored and not fitted:
        return compiled
    recompiler = _Recompiler(_dynamo_copy(gm, original), sites, config, patches)
    if monitored:
        compiled = _Monitor(recompiler, decisions, compiled)
    if fitted:
        compiled = _FittedParameters(compiled, recompiler, decisions, fitted, parameter)
    return compiled


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
    moves over (:func:`_keep_dynamo_sources`). The projection maps the rewrite registered go too."""
    _keep_dynamo_sources(gm.graph, original)
    gm.graph = original
    drop_maps(gm)


def _keep_dynamo_sources(graph: fx.Graph, copied: fx.Graph) -> None:
    """Give the placeholders of ``copied``, a copy of ``graph``, the sources Dynamo gave those of
    ``graph`` (the passes never add or remove placeholders, so they pair up in order)."""
    for old, new in zip(graph.find_nodes(op="placeholder"), copied.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source


def _dynamo_copy(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A module of ``gm``'s attributes running ``graph`` (a copy of ``gm``'s graph, which it takes),
    with the Dynamo metadata AOTAutograd reads from ``gm``: the module's meta, its parameters'
    sources and the placeholders'. With them Inductor compiles the copy as a Dynamo graph, whose
    parameters are static inputs under CUDA graphs (not copied into the graph's memory each call)."""
    copied = fx.GraphModule(gm, graph)
    copied.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = dict(gm._param_name_to_source)  # its own: register_maps adds to it
    _keep_dynamo_sources(gm.graph, graph)
    return copied


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
    with changed:
        return _inductor(gm, example_inputs, patches)


def _inductor(gm: fx.GraphModule, example_inputs: list, patches: dict) -> Callable:
    """Compile ``gm`` with Inductor, timed as its stage (:data:`INDUCTOR`)."""
    with _timed(INDUCTOR):
        return compile_fx(gm, example_inputs, config_patches=patches)


def _monitored(decisions: Mapping[str, SiteDecision], config: DistrConfig, patches: dict) -> bool:
    """Whether the runtime monitor watches this graph: asked for, with a site approximated, and not
    under CUDA graphs (where it is off, with a warning)."""
    if not config.monitor_every or not any(d.approximated for d in decisions.values()):
        return False
    if patches.get("triton.cudagraphs") or torch._inductor.config.triton.cudagraphs:
        warnings.warn("distr: the runtime monitor (monitor_every) is disabled under CUDA graphs", stacklevel=3)
        return False
    return True


def _first_parameter(example_inputs: list) -> tuple[int, int] | None:
    """The position and ``data_ptr`` of the graph's first parameter input, or None without one.
    One parameter tells modules apart (another layer or model owns other storage): checking it
    alone keeps the per-call cost constant, whatever the model's size."""
    return next(((i, x.data_ptr()) for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)), None)


class _Recompiler:
    """A graph as Dynamo gave it (``module``: an untouched copy, see :func:`_dynamo_copy`) with its
    sites and compile settings, to compile again after the first compile with some sites made exact:
    the runtime monitor's demotions, the exact graph for other parameters.

    That compile runs at call time, outside Dynamo: it takes the graph's own example values (fake
    tensors and symbolic sizes from Dynamo's trace) as example inputs, so that it generalises over
    the shapes the first compile did (a call's real inputs would specialise a dynamic graph to
    that call's shapes). Shape guards Inductor adds in that compile are not installed (Dynamo
    installed the graph's guards at its first compile)."""

    def __init__(self, module: fx.GraphModule, sites: list[AttentionSite], config: DistrConfig, patches: dict):
        self.module, self.config, self.patches = module, config, patches
        self.sites = sites_on(module.graph, sites)
        self.example_inputs = [n.meta["example_value"] for n in module.graph.find_nodes(op="placeholder")]

    def compile_exact(self, decisions: Mapping[str, SiteDecision], exact: Iterable[str], source: str) -> Callable:
        """Compile a fresh copy as the backend does (:func:`_compile`) with ``decisions``, but the sites
        named in ``exact`` made exact attention, their source ``source``: no longer forced, since a
        forced site keeps the op (at G=1). ``decisions`` themselves do not change."""
        made_exact = {name: dataclasses.replace(decisions[name], group_size=EXACT, source=source) for name in exact}
        gm = self._fresh()
        return _compile(gm, sites_on(gm.graph, self.sites), {**decisions, **made_exact}, self.example_inputs,
                        self.config, self.patches)

    def compile_unchanged(self) -> Callable:
        """Compile a fresh copy as it came, with Inductor: what ``backend="inductor"`` would run."""
        return _inductor(self._fresh(), self.example_inputs, self.patches)

    def _fresh(self) -> fx.GraphModule:
        return _dynamo_copy(self.module, copy.deepcopy(self.module.graph))


class _FittedParameters:
    """A compiled graph whose approximations were fitted to the parameters it was compiled with:
    decisions the guard calibrated on them, and projection maps. Dynamo reuses a graph for every
    module that runs the same code under equal compile options (it compares backends by value):
    the identical layers of regional compilation (``layer.compile()`` on each), a second model of
    the same class compiled on its own, or ``torch.func.functional_call`` with other weights. The
    first parameters' decisions and maps were never measured on the others, so calls with other
    parameters (told apart by one parameter's storage, see :func:`_first_parameter`) run the graph
    with those sites exact instead, compiled on the first such call; a warning says so once. Calls
    with the first parameters run ``compiled`` (the runtime monitor, if any, watches only these:
    its decisions are theirs).

    Like every wrapper here it is called as Dynamo calls what a backend returns: with the graph's
    inputs as positional arguments. (Inductor's callable says ``_boxed_call`` all the same: AOT
    autograd's unboxed wrapper copies the attribute from the boxed function it wraps.)"""

    def __init__(self, compiled: Callable, recompiler: _Recompiler, decisions: Mapping[str, SiteDecision],
                 sites: list[str], parameter: tuple[int, int]):
        self.compiled, self.recompiler, self.decisions, self.sites = compiled, recompiler, decisions, sites
        self.index, self.data_ptr = parameter
        self.exact: Callable | None = None

    @staticmethod
    def sites_of(decisions: Mapping[str, SiteDecision]) -> list[str]:
        """The sites whose approximation was fitted to the parameters: calibrated or projected."""
        return [name for name, d in decisions.items()
                if d.projected or (d.approximated and d.source in ("calibrated", "end-to-end"))]

    def __call__(self, *args: Any) -> Any:
        if args[self.index].data_ptr() == self.data_ptr:
            return self.compiled(*args)
        if self.exact is None:
            self.exact = self._compile_exact()
        return self.exact(*args)

    def _compile_exact(self) -> Callable:
        """The graph with the fitted sites exact, after a warning that says why. Should its compile
        fail (a bug of ours), the graph as it came, compiled with Inductor: exact too."""
        names = ", ".join(self.sites)
        projected = any(self.decisions[name].projected for name in self.sites)
        fitted = "decisions and projection maps" if projected else "decisions"
        warnings.warn(
            f"distr: the guard's {fitted} of {names} were fitted to the parameters this graph was compiled with, and "
            "it now runs with others (Dynamo reuses a graph for modules that run the same code under equal options: "
            "identical layers compiled one by one, another model of the same class, functional_call): calls with "
            f"other parameters run exact attention at {names}. For approximations fitted to each model or layer, "
            "compile the whole model, give each model its own plan (options={'plan': path}), or, for a transformers "
            "model, keep each layer's projection maps on its attention module with distr_compile.configure(model, "
            "config, calibration=batches) and compile it with Inductor.",
            stacklevel=3)
        try:
            return self.recompiler.compile_exact(self.decisions, self.sites, "other parameters")
        except Exception as error:  # a bug of ours must not fail the user's call, nor run the approximation
            warnings.warn(f"distr: compiling the graph with {names} exact failed ({type(error).__name__}: {error}); "
                          "calls with other parameters run the graph as it came, compiled with Inductor. This is a "
                          "bug in distr-compile: please report it.", stacklevel=3)
            log.info("distr: compiling the exact graph failed", exc_info=error)
            return self.recompiler.compile_unchanged()


class _Monitor:
    """Runtime monitor: every ``monitor_every`` calls, recheck the approximated sites on the
    call's real inputs (the heads reading KV head 0 only) and, if one drifted over the
    tolerance, demote it to exact and recompile the graph. Projection sites are not rechecked."""

    def __init__(self, recompiler: _Recompiler, decisions: dict[str, SiteDecision], compiled: Callable):
        self.recompiler, self.decisions, self.config = recompiler, decisions, recompiler.config
        self.compiled = compiled
        self.probe = probe_module(recompiler.module, recompiler.sites)
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
        self.compiled = self.recompiler.compile_exact(self.decisions, drifted, "monitor")
        for name, reason in drifted.items():  # the stored decisions change once the exact graph is in place
            d = self.decisions[name]
            d.group_size, d.source, d.reason = EXACT, "monitor", reason
            log.warning("distr monitor: %s %s", name, reason)
