"""Plans: what was decided for each site (:class:`SiteDecision`) and the decisions for a model
(:class:`DistrPlan`), saved as JSON and checked against the sites they are applied to."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..config import GROUP_SIZES, ConfigError, DistrConfig
from ..passes import AttentionSite, SkippedSite
from .probe import EXACT, divides_head_dim, metric_error

PLAN_VERSION = 1


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


def plan_config(config: DistrConfig) -> dict[str, Any]:
    """The config fields a plan records (everything but the plan path and the mode)."""
    data = asdict(config)
    data.pop("plan")
    data.pop("mode")
    data["candidate_group_sizes"] = list(config.candidate_group_sizes)
    return data

