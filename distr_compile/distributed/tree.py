"""Tree Attention (arXiv 2408.04093): exact attention over a KV cache sharded across ranks.

Each rank attends the (replicated) queries to its own KV shard, then the partials are merged by a
logarithmic-depth reduction: bytes per step depend on the query rows, not on the context length,
which is what makes it beat passing KV blocks around a ring (see ring.py and comm.py).
"""

from __future__ import annotations

import torch

from .combine import combine
from .comm import CommCounter, no_backward
from .partial import Positions, local_partial, require_k_pos
from .topology import Topology


def tree_attention(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    group=None,
    scale: float | None = None,
    q_pos: Positions | None = None,
    k_pos: Positions | None = None,
    mode: str = "auto",
    backend: str = "auto",
    counter: CommCounter | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of q to the union of every rank's KV shard.

    Args:
        q: (B, Hq, Tq, D), the same on every rank (Tq >= 1).
        k_local, v_local: this rank's shard, (B, Hkv, Tk_local, D) and (..., Dv); Hq % Hkv == 0,
            Tk_local may differ between ranks and may be 0.
        group: None (default group), a ProcessGroup, a :class:`Topology` (e.g. two-level) or a
            2-d DeviceMesh (nodes, local).
        scale: softmax scale, default 1/sqrt(D).
        q_pos, k_pos: global positions of the queries and of this rank's keys for causal masking
            (int start or 1-d tensor): key j is visible to query i iff k_pos[j] <= q_pos[i], across
            shards too. q_pos None means no mask; with q_pos, k_pos is required.
        mode: combine algorithm, "auto", "three", "fused" or "allgather" (see combine.py).
        backend: local partial, "auto", "triton" or "torch" (see partial.py).
        counter: a :class:`CommCounter` that records the bytes communicated.
        return_lse: also return the global log-sum-exp (B, Hq, Tq), fp32 (fp64 for fp64).

    Every rank must pass the same q, q_pos, scale, mode and group and shards of the same B, Hkv, D,
    Dv and dtype. Checks run before any collective, but an error whose cause only one rank sees
    raises there alone, and a shape that differs between ranks is a collective mismatch (see
    docs/tree-attention.md).

    Returns:
        out (B, Hq, Tq, Dv) in q's dtype, identical on every rank (and lse if asked). Across more
        than one rank there is no backward: calling it raises (see combine).
    """
    require_k_pos(q_pos, k_pos)

    def attend(q: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = local_partial(q, k_local, v_local, scale=scale, q_pos=q_pos, k_pos=k_pos, backend=backend)
        return combine(out, lse, group, mode=mode, counter=counter)

    # guard on the inputs, not on the partial: an empty shard's partial does not depend on q
    single = all(p == 1 for p in Topology.of(group).sizes())
    out, lse = attend(q, k_local, v_local) if single else no_backward(attend, q, k_local, v_local)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
