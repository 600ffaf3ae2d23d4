"""DistrConfig: every knob of DistrAttention, validated, with defaults that measured best.

Defaults come from the per-layer accuracy study on real activations (DESIGN.md section 2 and
BENCHMARKS.md): LSH grouping, "mean" representatives and blocks of 64 query rows at G=2 give the
lowest error among the settings the kernel runs fast; "sample" (the paper's choice) errs 20-30%
more. The kernel's query tile is the grouping block, so ``block_m`` is also a speed knob.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

GROUP_SIZES = (1, 2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
REPRESENTATIVES = ("mean", "sample")
GROUPINGS = ("lsh", "random")
MAX_HYPERPLANES = 16


@dataclass(frozen=True)
class DistrConfig:
    """Knobs of DistrAttention.

    Attributes:
        group_size: G, how many embedding columns share one representative in Q K^T. The inner
            dimension of Q K^T shrinks from d to d/G; d must be divisible by G. 1 means exact.
        block_m: query rows per grouping block (and the kernel's query tile): each block of
            ``block_m`` rows picks its own column grouping. Smaller is more accurate, larger faster.
        num_hyperplanes: random hyperplanes of the angular LSH that hashes each column of a block.
        representative: "mean" (least-squares, default) or "sample" (the paper's: the group's first
            column in sorted order) stands for each group of Q columns.
        grouping: "lsh" sorts columns by their LSH code (the paper); "random" groups columns by a
            seeded random permutation per block (the baseline LSH is measured against).
        seed: seeds the hyperplanes (or the random permutation); same seed, same result.
    """

    group_size: int = 2
    block_m: int = 64
    num_hyperplanes: int = 16
    representative: str = "mean"
    grouping: str = "lsh"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("group_size", self.group_size, GROUP_SIZES)
        _check_choice("block_m", self.block_m, BLOCK_SIZES)
        _check_choice("representative", self.representative, REPRESENTATIVES)
        _check_choice("grouping", self.grouping, GROUPINGS)
        if not isinstance(self.num_hyperplanes, int) or not 1 <= self.num_hyperplanes <= MAX_HYPERPLANES:
            raise ValueError(
                f"num_hyperplanes must be an int in [1, {MAX_HYPERPLANES}], got {self.num_hyperplanes!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

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
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown DistrConfig option(s) {unknown}; valid options are {valid}")
        return cls(**options)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
