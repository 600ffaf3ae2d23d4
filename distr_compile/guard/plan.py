"""Plans: what was decided for each site (:class:`SiteDecision`) and the decisions for a model
(:class:`DistrPlan`), saved as JSON (and the projection maps beside it as safetensors) and checked
against the sites they are applied to."""

from __future__ import annotations

import copy
import json
import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..config import GROUP_SIZES, ConfigError, DistrConfig
from ..passes import AttentionSite, SkippedSite
from .probe import EXACT, head_dim_problem, metric_error, projection_shapes

PLAN_VERSION = 1
# The settings a plan's decisions were made and measured with, which a compile applying the plan
# takes from it (:meth:`DistrPlan.settings`): the op knobs and the guard's. Not ``approximate`` and
# ``monitor_every``: what the backend does with this compile, not how the plan was made.
PLAN_SETTINGS = ("group_size", "block_m", "num_hyperplanes", "representative", "grouping", "seed", "tolerance",
                 "metric", "min_speedup", "candidate_group_sizes", "output_tolerance", "guard_reference")


@dataclass
class SiteDecision:
    """What the guard decided for one site and why. ``group_size`` 1 means exact attention;
    ``errors`` maps each measured G to its metrics (``rel_fro``, ``cosine``, ``max_abs``), the
    worst over every calibration call; ``times`` maps G to the site's measured ms on the first
    calibration call (1: exact SDPA), when the guard measured speed (``min_speedup`` > 0).
    ``grouping`` is the approximation's grouping; with "projection", ``maps`` holds the site's
    (A (Hq, E, E/G), B (Hkv, E, E/G)), fitted on its inputs (saved beside the plan's JSON)."""

    name: str
    pattern: str
    shapes: str
    group_size: int
    reason: str
    source: str
    errors: dict[int, dict[str, float]] = field(default_factory=dict)
    times: dict[int, float] = field(default_factory=dict)
    grouping: str = DistrConfig.grouping
    maps: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def approximated(self) -> bool:
        return self.group_size != EXACT

    @property
    def projected(self) -> bool:
        """Approximated by a calibrated projection (which needs ``maps``)."""
        return self.approximated and self.grouping == "projection"

    def error(self, metric: str) -> float | None:
        """The error of the chosen G, or of the best measured candidate for an exact site."""
        if self.approximated and self.group_size in self.errors:
            return metric_error(self.errors[self.group_size], metric)
        measured = [metric_error(m, metric) for m in self.errors.values()]
        return min(measured) if measured else None


@dataclass
class DistrPlan:
    """The decisions for a model: per-site G (1 = exact) with evidence, plus the op knobs and
    guard settings they were made with. Saved as JSON, and the projection maps of its sites
    beside it as safetensors (:func:`maps_path`; never pickle). ``output_error``: with
    ``guard_reference="original"``, the end-to-end error of these decisions against the original
    model (worst calibration batch); over ``output_tolerance`` only if every site is exact."""

    config: dict[str, Any]
    sites: dict[str, SiteDecision] = field(default_factory=dict)
    skipped: dict[str, SkippedSite] = field(default_factory=dict)
    output_error: float | None = None

    def save(self, path: str | os.PathLike) -> str:
        """Write the plan as JSON and, if a site has projection maps, the maps as safetensors at
        :func:`maps_path` (keys ``"<site>.A"``, ``"<site>.B"``), tagged with an id the JSON records
        so that :meth:`load` never pairs a plan with another save's maps; a plan without maps
        removes a maps file left there by an earlier save. Returns ``path`` (handy for
        ``options={"plan": ...}``)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        maps = {f"{d.name}.{key}": m.detach().float().cpu().contiguous()
                for d in self.sites.values() if d.maps is not None for key, m in zip("AB", d.maps)}
        maps_id = uuid.uuid4().hex if maps else None
        data = {
            "version": PLAN_VERSION,
            "config": self.config,
            "sites": [_as_json(d) for d in self.sites.values()],
            "skipped": [{"name": s.name, "pattern": s.pattern, "reason": s.reason, "fault": s.fault}
                        for s in self.skipped.values()],
            "output_error": self.output_error,
            "maps_id": maps_id,
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        if maps:
            save_file(maps, maps_path(path), metadata={"maps_id": maps_id})
        else:
            Path(maps_path(path)).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistrPlan":
        """Read a plan written by :meth:`save`, with the maps of its projection sites. A file that is
        not such a plan is a :class:`ConfigError` naming the file and what is wrong with it."""
        path = os.fspath(path)
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not a plan (invalid JSON: {e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a plan (a JSON {type(data).__name__}, not an object)")
        if data.get("version") != PLAN_VERSION:
            raise ConfigError(f"{path}: plan version {data.get('version')!r}, expected {PLAN_VERSION}")
        try:
            sites = {}
            for d in data["sites"]:
                d["errors"] = {int(g): m for g, m in d["errors"].items()}
                d["times"] = {int(g): t for g, t in d.get("times", {}).items()}  # plans from before speed checks
                d.setdefault("grouping", data["config"]["grouping"])  # plans from before per-site groupings
                sites[d["name"]] = SiteDecision(**d)
            skipped = {s["name"]: SkippedSite(**s) for s in data["skipped"]}
            plan = cls(data["config"], sites, skipped, data.get("output_error"))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ConfigError(f"{path}: a malformed plan ({type(e).__name__}: {e}); save plans with "
                              "DistrPlan.save") from None
        _load_maps(path, [d for d in sites.values() if d.projected], data.get("maps_id"))
        return plan

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

    def settings(self, config: DistrConfig, given: Iterable[str] = ()) -> DistrConfig:
        """``config`` with the settings this plan was made with (:data:`PLAN_SETTINGS`): the op
        knobs, so each approximated site computes what calibration measured, and the guard's, so
        the sites the plan does not name are decided as its own were and the report and the
        runtime monitor judge by its tolerance. One of ``given`` (the fields the user set) that
        differs from the plan's is a :class:`ConfigError`: either the plan's measurements or the
        user's choice would silently not hold. A setting the plan predates keeps ``config``'s."""
        planned = config.replace(**{k: v for k, v in self.config.items() if k in PLAN_SETTINGS})
        conflicts = [f"{k}={getattr(config, k)!r} (the plan's: {getattr(planned, k)!r})"
                     for k in PLAN_SETTINGS if k in given and getattr(config, k) != getattr(planned, k)]
        if conflicts:
            raise ConfigError(f"options {', '.join(conflicts)} differ from the settings the plan was made with, "
                              "which it applies: leave them out, or calibrate a plan with them")
        return planned

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
    return head_dim_problem(site, g)


def _maps_fit(site: AttentionSite, decision: SiteDecision) -> str | None:
    if not decision.projected:
        return None
    want = projection_shapes(site, decision.group_size)
    if want is None:
        return f"grouping='projection' needs q and k of shape (B, H, L, E) with static H and E, got {site.shapes}"
    have = tuple(tuple(m.shape) for m in decision.maps)
    if have != want:
        return (f"projection maps A {have[0]}, B {have[1]} do not fit {site.shapes} at G={decision.group_size}: "
                f"expected A {want[0]}, B {want[1]} (heads, head dim, head dim / G)")
    return None


# Checks of a plan's decision against the site it is applied to: each returns the problem, or None.
SITE_CHECKS: tuple[Callable[[AttentionSite, SiteDecision], str | None], ...] = (_group_size_fits, _maps_fit)


def maps_path(path: str) -> str:
    """Where the projection maps of the plan saved at ``path`` live: beside it, ``.json`` replaced
    by ``.safetensors`` (appended to another name: plans ``run.1`` and ``run.2`` must not share
    ``run.safetensors``)."""
    file = Path(path)
    return str(file.with_suffix(".safetensors") if file.suffix == ".json" else file.with_name(file.name + ".safetensors"))


def _as_json(d: SiteDecision) -> dict[str, Any]:
    """``d`` as JSON data: every field but the maps, the G keys as strings."""
    data = {f.name: getattr(d, f.name) for f in fields(d) if f.name != "maps"}
    return data | {"errors": {str(g): m for g, m in d.errors.items()}, "times": {str(g): t for g, t in d.times.items()}}


def _load_maps(path: str, projected: list[SiteDecision], maps_id: str | None) -> None:
    """Set the maps of the ``projected`` decisions of the plan at ``path`` from its safetensors file,
    which must carry the plan's ``maps_id`` (plans saved before it was recorded have none)."""
    if not projected:
        return
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = maps_path(path)
    names = [d.name for d in projected]
    if not Path(file).exists():
        raise ConfigError(f"{path}: sites {names} use grouping='projection' but their maps file {file} is missing "
                          "(DistrPlan.save writes it beside the plan's JSON)")
    if maps_id is not None:
        with safe_open(file, "pt") as f:
            found = (f.metadata() or {}).get("maps_id")
        if found != maps_id:
            raise ConfigError(f"{file} holds the maps of another save than plan {path} (maps id {found!r}, the plan's "
                              f"{maps_id!r}): save the plan and its maps together with DistrPlan.save")
    tensors = load_file(file)
    missing = [f"{name}.{key}" for name in names for key in "AB" if f"{name}.{key}" not in tensors]
    if missing:
        raise ConfigError(f"{file} lacks the projection maps {missing} of plan {path}")
    for d in projected:
        d.maps = (tensors[f"{d.name}.A"], tensors[f"{d.name}.B"])


def plan_config(config: DistrConfig) -> dict[str, Any]:
    """The config fields a plan records (everything but the plan path and the mode)."""
    data = asdict(config)
    data.pop("plan")
    data.pop("mode")
    data["candidate_group_sizes"] = list(config.candidate_group_sizes)
    return data

