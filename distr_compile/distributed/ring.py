"""Ring Attention decode baseline (pass-KV), kept only to measure Tree Attention against.

Every rank holds the queries and one KV shard. In p - 1 steps each rank forwards the KV block it
holds to its successor and receives its predecessor's (``batch_isend_irecv``), attending the block
it holds while the next one is in flight, and merges the partials as it goes. After p steps every
rank has seen every shard. Traffic per rank is (p - 1) shards: it grows with the context, where the
tree's stays at a few query-row vectors (comm.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .comm import CommCounter, all_gather, count_send, no_backward
from .merge import merge_partials
from .partial import Positions, check_qkv, local_partial, positions, require_k_pos
from .topology import check_member


def _exchange(send: list[torch.Tensor], recv: list[torch.Tensor], next_rank: int, prev_rank: int, group):
    ops = [dist.P2POp(dist.isend, t, next_rank, group, tag=i) for i, t in enumerate(send) if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, prev_rank, group, tag=i) for i, t in enumerate(recv) if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []


def ring_attention_decode(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    group=None,
    scale: float | None = None,
    q_pos: Positions | None = None,
    k_pos: Positions | None = None,
    shard_lengths: Sequence[int] | None = None,
    backend: str = "auto",
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """Same contract as :func:`tree_attention` (flat groups only), computed by passing KV around
    the ring. ``shard_lengths`` (every rank's Tk_local, in group rank order) saves one all-gather
    per call when the caller knows them, as a sharded cache does. Like the tree, it has no
    backward across more than one rank."""
    check_qkv(q, k_local, v_local)
    require_k_pos(q_pos, k_pos)
    check_member(group)
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    if shard_lengths is None:
        mine = torch.tensor([k_local.shape[2]], device=q.device)
        shard_lengths = all_gather(mine, group, counter).flatten().tolist()
    if len(shard_lengths) != p or shard_lengths[rank] != k_local.shape[2]:
        raise ValueError(f"shard_lengths {list(shard_lengths)} do not match {p} ranks / this shard ({k_local.shape[2]})")
    causal = q_pos is not None
    ring = group if group is not None else dist.group.WORLD
    next_rank, prev_rank = dist.get_global_rank(ring, (rank + 1) % p), dist.get_global_rank(ring, (rank - 1) % p)

    def pass_kv(q: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor) -> torch.Tensor:
        block = [k_local.contiguous(), v_local.contiguous()]  # isend needs dense buffers
        if causal:
            block.append(positions(k_pos, k_local.shape[2], q.device, "k_pos"))
        out = lse = None
        for step in range(p):
            reqs = []
            if step < p - 1:
                n = shard_lengths[(rank - step - 1) % p]
                incoming = [t.new_empty(*t.shape[:-2], n, t.shape[-1]) for t in block[:2]]
                if causal:
                    incoming.append(block[2].new_empty(n))
                reqs = _exchange(block, incoming, next_rank, prev_rank, group)
                if block[0].numel():
                    count_send(block, counter)
            part = local_partial(
                q, block[0], block[1], scale=scale, q_pos=q_pos, k_pos=block[2] if causal else 0, backend=backend
            )
            out, lse = part if out is None else merge_partials(torch.stack([out, part[0]]), torch.stack([lse, part[1]]), 0)
            for req in reqs:
                req.wait()
            if step < p - 1:
                block = incoming
        return out.to(q.dtype)

    return pass_kv(q, k_local, v_local) if p == 1 else no_backward(pass_kv, q, k_local, v_local)
