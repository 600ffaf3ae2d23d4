"""DistrConfig: every knob of DistrAttention, validated, with defaults that measured best.

Defaults come from the per-layer accuracy study on real activations (BENCHMARKS.md,
"Accuracy zero-shot"): LSH grouping, "mean" representatives and blocks of 64 query rows at G=2 give the
lowest error among the settings the kernel runs fast; "sample" (the paper's choice) errs 20-30%
more. The kernel's query tile is the grouping block, so ``block_m`` is also a speed knob.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

GROUP_SIZES = (1, 2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
REPRESENTATIVES = ("mean", "sample", "lstsq", "lstsq-visible")
GROUPINGS = ("lsh", "random", "fixed", "projection")
MAX_HYPERPLANES = 16
APPROXIMATE = ("auto", "guarded", "always")
METRICS = ("rel_fro", "cosine", "max_abs")
GUARD_REFERENCES = ("exact", "original")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """Options or a plan that do not fit the model: the user's to fix. The backend raises it as is,
    whereas a failure of its own work falls back to compiling the graph unchanged."""


@dataclass(frozen=True)
class DistrConfig:
    """Knobs of DistrAttention.

    Attributes:
        group_size: G, how many embedding columns share one representative in Q K^T. The inner
            dimension of Q K^T shrinks from d to d/G; d must be divisible by G. 1 means exact.
        block_m: query rows per grouping block (and the kernel's query tile): each block of
            ``block_m`` rows picks its own column grouping. Smaller is more accurate, larger faster.
        num_hyperplanes: random hyperplanes of the angular LSH that hashes each column of a block.
        representative: what stands for each group of Q columns: "mean" (default), "sample" (the
            paper's: the group's first column in sorted order), "lstsq" (a weighted sum whose
            weights, from the head's key Gram, make the group's product with its fused keys
            closest to the exact one) or "lstsq-visible" (the same, but under causal attention
            each block's weights are fitted on the keys it sees: a better zero-shot fit, at the
            cost of a prefix sum of per-key-block Grams; see ``reference.representative_weights``).
        grouping: "lsh" sorts columns by their LSH code (the paper); "random" groups columns by a
            seeded random permutation per block (the baseline LSH is measured against); "fixed"
            groups G consecutive columns in every block: q_tilde is then a fixed linear map of q,
            for models fine-tuned with it (zero-shot it is the worst: SmolLM2 perplexity 684).
            Training cannot adapt to LSH's grouping, which moves with the data and has no
            gradient; it can to this one. Adapted at block 64, SmolLM2 reaches 9.02-9.06 (original
            8.60, 6000-7000 steps), below LSH's best at block 16 (9.14-9.15, which more steps did
            not improve) at block 64's speed (BENCHMARKS.md; H100, 2026-11-22). "projection": a
            calibrated map per head, q' = q A (A per query head) and k' = k B (B per KV head), of
            rank d/G, fitted on the activations a site sees (``distr_compile.projection``); the
            most accurate zero-shot (SmolLM2 1.49x exact perplexity at G=2 where LSH is 23x).
            "fixed" and "projection" run the static path (one exact kernel on q', k'). A
            projection needs its maps: ``distr_attention(..., maps=(A, B))``.
        seed: seeds the hyperplanes (or the random permutation); same seed, same result.

    Compiler and guard knobs (``torch.compile(..., backend="distr", options={...})``):

        approximate: where the backend approximates. "auto" (default): the guard decides per
            site on CUDA; on CPU every site stays exact (the approximation does not pay there).
            "guarded": the guard decides on any device. "always": every matched site is
            approximated with ``group_size``, no guard (testing and benchmarks).
        tolerance: a site is approximated only if its measured error (``metric``) on the
            calibration inputs is at most this. The default is strict because zero-shot errors on
            pretrained models are 0.3-1.0 (BENCHMARKS.md): most layers stay exact.
        metric: "rel_fro" (relative Frobenius error of the attention output, default), "cosine"
            (1 - cosine similarity) or "max_abs" (max absolute error).
        min_speedup: a site is approximated only if, on the calibration inputs, exact SDPA's time
            over DistrAttention's is at least this (1.05: 5% faster, above the timing noise of a
            few percent); otherwise it stays exact, and the report says so with both times. 0
            turns the speed check off (the decision is then on accuracy alone).
        candidate_group_sizes: the G values the guard may pick per site, tried cheapest
            (largest) first; empty means just ``group_size``. ``group_size=[4, 2]`` in options
            sets this (and ``group_size`` to the largest, used when ``approximate="always"``).
        output_tolerance: if set, the end-to-end guard compares the graph outputs (relative
            Frobenius error) with and without the approximation and moves the layers that hurt
            the output most (each measured on its own) back to exact until they agree within this.
        guard_reference: what the guard compares with. "exact" (default): each site against exact
            attention on the same weights (and, with ``output_tolerance``, the graph's outputs
            against the same graph with every site exact). "original": for a model adapted by
            fine-tuning with DistrAttention in the loop, whose layers no longer agree with exact
            attention on the same weights although the model is good: every site starts
            approximated and those that hurt most go back to exact until the model's outputs agree with
            the ORIGINAL (pre-adaptation) model's within ``output_tolerance`` (or a task metric).
            Needs ``output_tolerance`` and the original model, so it runs through
            ``distr_compile.calibrate(adapted, batches, original=model, ...)``; compile with the
            saved plan.
        monitor_every: if > 0, every N calls the runtime monitor rechecks a sample of heads of
            each approximated site and demotes a site whose error drifted over ``tolerance``
            (disabled, with a warning, under CUDA graphs).
        plan: path of a saved ``DistrPlan`` (JSON): its decisions are used instead of calibrating,
            with the settings it was made with (``guard.PLAN_SETTINGS``: the op knobs, so each
            site computes what was measured, and the guard's); an option that sets one of them
            differently is an error.
        mode: torch.compile's ``mode`` for Inductor, given here because torch.compile refuses
            ``mode`` and ``options`` together (e.g. ``{"mode": "reduce-overhead", "group_size": 4}``).
    """

    group_size: int = 2
    block_m: int = 64
    num_hyperplanes: int = 16
    representative: str = "mean"
    grouping: str = "lsh"
    seed: int = 0
    approximate: str = "auto"
    tolerance: float = 0.05
    metric: str = "rel_fro"
    min_speedup: float = 1.05
    candidate_group_sizes: tuple[int, ...] = ()
    output_tolerance: float | None = None
    guard_reference: str = "exact"
    monitor_every: int = 0
    plan: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        _check_choice("group_size", self.group_size, GROUP_SIZES)
        _check_choice("block_m", self.block_m, BLOCK_SIZES)
        _check_choice("representative", self.representative, REPRESENTATIVES)
        _check_choice("grouping", self.grouping, GROUPINGS)
        if not isinstance(self.num_hyperplanes, int) or not 1 <= self.num_hyperplanes <= MAX_HYPERPLANES:
            raise ConfigError(
                f"num_hyperplanes must be an int in [1, {MAX_HYPERPLANES}], got {self.num_hyperplanes!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {self.seed!r}")
        _check_choice("approximate", self.approximate, APPROXIMATE)
        _check_choice("metric", self.metric, METRICS)
        for name in ("tolerance", "output_tolerance", "min_speedup"):
            value = getattr(self, name)
            if value is None and name == "output_tolerance":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        _check_choice("guard_reference", self.guard_reference, GUARD_REFERENCES)
        if self.guard_reference == "original" and self.output_tolerance is None:
            raise ConfigError("guard_reference='original' needs output_tolerance (how far the model's outputs "
                              "may be from the original model's)")
        if not isinstance(self.candidate_group_sizes, (list, tuple)):
            raise ConfigError(f"candidate_group_sizes must be a list of G values, got {self.candidate_group_sizes!r}")
        object.__setattr__(self, "candidate_group_sizes", tuple(self.candidate_group_sizes))
        for g in self.candidate_group_sizes:
            _check_choice("candidate_group_sizes entry", g, GROUP_SIZES)
        if not isinstance(self.monitor_every, int) or isinstance(self.monitor_every, bool) or self.monitor_every < 0:
            raise ConfigError(f"monitor_every must be a non-negative int, got {self.monitor_every!r}")
        if self.mode is not None:
            _check_choice("mode", self.mode, MODES)
        if self.plan is not None and not isinstance(self.plan, str):
            raise ConfigError(f"plan must be a path (str), got {type(self.plan).__name__}")
        if self.plan == "":
            raise ConfigError("plan must be the path of a saved plan, got an empty string")

    @property
    def candidates(self) -> tuple[int, ...]:
        """The G values the guard may pick, cheapest (largest) first."""
        return tuple(sorted(set(self.candidate_group_sizes or (self.group_size,)), reverse=True))

    @property
    def exact(self) -> bool:
        """True when the config computes exact attention (G = 1)."""
        return self.group_size == 1

    def replace(self, **changes: Any) -> "DistrConfig":
        """A copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "DistrConfig":
        """Build a config from a ``torch.compile(..., options=...)`` dict; unknown keys are an error."""
        return cls(**cls.fields_of(options))

    @classmethod
    def fields_of(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The fields a ``torch.compile(..., options=...)`` dict sets (``group_size`` as a list sets
        ``candidate_group_sizes`` too): what the user chose, as against the defaults."""
        options = dict(options or {})
        if isinstance(options.get("group_size"), (list, tuple)):
            if not options["group_size"]:
                raise ConfigError("group_size: an empty list; give a G value or a list of candidates such as [4, 2]")
            options["candidate_group_sizes"] = tuple(options["group_size"])
            options["group_size"] = max(options["candidate_group_sizes"])
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown DistrConfig option(s) {unknown}; valid options are {valid}")
        return options


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices`` and of their type (``2.0`` is not the G value ``2``)."""
    if value not in choices or type(value) not in {type(c) for c in choices}:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
