"""The report: a table of every attention site of a compiled model (or of a plan), a summary of
what was decided and why, and optionally a bar chart of each site's error."""

from __future__ import annotations

from typing import Any

from .plan import DistrPlan, SiteDecision
from .probe import EXACT
from .store import plan_of


def report(compiled: Any, plot: str | None = None, file: Any = None) -> str:
    """Print (to ``file``, default stdout) and return a table of every attention site of a model
    or function compiled with ``backend="distr"`` (or of a plan), including the sites left alone:
    name, pattern, shapes, decision (G and grouping, or exact), measured error against the
    tolerance, and the reason.
    ``plot`` writes a PNG bar chart of each site's error against the tolerance."""
    from tabulate import tabulate

    plan = compiled if isinstance(compiled, DistrPlan) else plan_of(compiled)
    metric, tol = plan.metric, plan.tolerance
    rows = []
    for d in plan.sites.values():
        err = d.error(metric)
        rows.append([d.name, d.pattern, d.shapes, f"G={d.group_size} {d.grouping}" if d.approximated else "exact",
                     "-" if err is None else f"{err:.3g}", f"{tol:g}", _times(d), d.reason])
    for s in plan.skipped.values():
        rows.append([s.name, s.pattern, "", "left alone", "-", "-", "-", s.reason])
    headers = ["site", "pattern", "shapes", "decision", metric, "tolerance", "ms exact / approx", "reason"]
    text = tabulate(rows, headers=headers) + "\n" + _summary(plan)
    print(text, file=file)
    if plot is not None:
        _plot(plan, plot)
    return text


def _times(d: SiteDecision) -> str:
    """'exact ms / approximated ms' of the chosen G (of the cheapest timed one for an exact site)."""
    timed = sorted((g for g in d.times if g != EXACT), reverse=True)
    g = d.group_size if d.approximated else next(iter(timed), None)
    if EXACT not in d.times or g not in d.times:
        return "-"
    return f"{d.times[EXACT]:.3g} / {d.times[g]:.3g} (G={g})"


def _summary(plan: DistrPlan) -> str:
    total = len(plan.sites) + len(plan.skipped)
    approx = [d for d in plan.sites.values() if d.approximated]
    # Exact although measured within it (too slow, or demoted by the end-to-end guard) is not over it.
    over = [d for d in plan.sites.values()
            if not d.approximated and (err := d.error(plan.metric)) is not None and err > plan.tolerance]
    lines = [f"{len(approx)} of {total} attention sites use DistrAttention; "
             f"{total - len(approx)} keep exact attention."]
    if plan.config.get("guard_reference") == "original":
        tol = plan.config["output_tolerance"]
        lines.append(f"Reference: the original model's output (output_tolerance {tol:g}); "
                     "per-site errors are against exact attention on the adapted weights, for reference only.")
        if plan.output_error is not None:
            lines.append(f"End-to-end error of this plan on the calibration batches: {plan.output_error:.3g}"
                         + (" (over output_tolerance although every site is exact: the adapted weights alone are "
                            "that far from the original)" if plan.output_error > tol else "."))
    elif over:
        lines.append(
            f"{len(over)} site(s) were measured over the tolerance {plan.tolerance:g} ({plan.metric}) "
            "and stay exact: "
            "zero-shot, the approximation is too coarse for them (see the README's results); fine-tuning with it "
            "in the loop, a looser tolerance or a smaller block_m changes that."
        )
    faults = [s for s in plan.skipped.values() if s.fault]
    if len(plan.skipped) > len(faults):
        lines.append(f"{len(plan.skipped) - len(faults)} site(s) could not be rewritten exactly and were left alone "
                     "(see reason).")
    if faults:
        lines.append(f"{len(faults)} site(s) keep exact attention because the backend failed on their graph "
                     f"({', '.join(sorted({s.fault for s in faults}))}), which was compiled as it came. "
                     "That is a bug in distr-compile: the warning has the error.")
    return "\n".join(lines)


def _plot(plan: DistrPlan, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [d for d in plan.sites.values() if d.error(plan.metric) is not None]
    errors = [d.error(plan.metric) for d in sites]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sites) + 2), 4))
    ax.bar(range(len(sites)), errors, color=["tab:green" if d.approximated else "tab:red" for d in sites])
    ax.axhline(plan.tolerance, color="black", linestyle="--", label=f"tolerance {plan.tolerance:g}")
    ax.set_xticks(range(len(sites)), [d.name for d in sites], rotation=90, fontsize=7)
    ax.set_ylabel(f"{plan.metric} (green: approximated, red: exact)")
    ax.set_title("DistrAttention error per attention site")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
