"""The per-site accuracy guard: measure, decide, remember, report.

For every attention site the guard runs exact attention and DistrAttention on the site's real
q/k/v and measures the error of the attention output (``probe``); a site is approximated with the
cheapest candidate G within ``tolerance`` (and fast enough), else it keeps exact attention
(``policy``). Decisions are keyed by the site's module path (``layers.3.self_attn``), stored per
model so recompiles reuse them (``store``), and form a :class:`DistrPlan` that saves to JSON
(``plan``). ``decisions`` is the backend's one call per graph: a saved plan, a stored decision, the
``approximate`` setting or calibration; ``calibration`` decides a model on user batches;
``report`` shows the decisions.

Zero-shot, DistrAttention errs 0.3-1.0 (relative Frobenius) on pretrained models (BENCHMARKS.md,
"Accuracy zero-shot"), so with the default tolerance most layers stay exact; the report says so.
"""

from .. import speed  # noqa: F401  (guard.speed: the timing the probe calls, patched by tests)
from .calibration import calibrate, call_batch
from .decisions import decide_graph, has_real_inputs
from .plan import PLAN_SETTINGS, SITE_CHECKS, DistrPlan, SiteDecision, plan_config
from .policy import (
    acceptable, against_original, decide, decide_sites, demote_until_within, end_to_end, within_tolerance,
)
from .probe import (
    EXACT, Calibrator, SiteProbe, divides_head_dim, measure, metric_error, op_knobs, probe_module, run_probe, sites_on,
)
from .report import report
from .store import STORE, DecisionStore, Owner, owners, plan_of, remember_graph, site_names

__all__ = [
    "EXACT", "PLAN_SETTINGS", "SITE_CHECKS", "STORE", "Calibrator", "DecisionStore", "DistrPlan", "Owner",
    "SiteDecision", "SiteProbe", "acceptable", "against_original", "calibrate", "call_batch", "decide", "decide_graph",
    "decide_sites", "demote_until_within", "divides_head_dim", "end_to_end", "has_real_inputs", "measure",
    "metric_error", "op_knobs", "owners", "plan_config", "plan_of", "probe_module", "remember_graph", "report",
    "run_probe", "site_names", "sites_on", "within_tolerance",
]
