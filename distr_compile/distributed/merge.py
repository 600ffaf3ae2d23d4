"""The log-sum-exp merge of attention partials: the associative step behind Tree Attention.

A partial over a subset of keys is (out, lse) with out normalised by its own softmax sum and lse its
natural-log sum of exponentials. Partials over disjoint key sets merge exactly:

    m = max_i lse_i,  w_i = exp(lse_i - m),  out = sum_i w_i out_i / sum_i w_i,  lse = m + log sum_i w_i

Subtracting the global max keeps every weight in [0, 1] (no overflow, whatever the scores), and the
operation is associative, so it may run in any tree shape: over KV splits inside a kernel's output,
over ranks through collectives, or level by level over a topology. Rows that see no key anywhere
(all lse = -inf) give out = 0 and lse = -inf, as SDPA gives zeros for fully masked rows.
"""

from __future__ import annotations

import math

import torch


def safe_max(lse_max: torch.Tensor) -> torch.Tensor:
    """The max used as the shift: -inf (a row without keys) becomes 0 so exp(lse - max) is 0, not NaN."""
    return lse_max.masked_fill(lse_max == -math.inf, 0.0)


def normalize(num: torch.Tensor, den: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the weighted sums: num (..., Dv) = sum w_i out_i, den (...) = sum w_i, and the
    shift they were taken against. Rows with den = 0 give zeros and -inf."""
    empty = den == 0
    out = num / den.masked_fill(empty, 1.0).unsqueeze(-1)
    return out, shift + den.log()


def merge_partials(out: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials stacked along ``dim`` of lse (and the same dim of out, which has one more
    trailing dim, the value dim): returns (out, lse) with that dim removed."""
    dim = dim % lse.dim()
    shift = safe_max(lse.amax(dim))
    w = torch.exp(lse - shift.unsqueeze(dim))
    return normalize((out * w.unsqueeze(-1)).sum(dim), w.sum(dim), shift)
