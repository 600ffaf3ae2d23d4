"""Tree Attention: decoding with the KV cache sharded over ranks (torch.distributed: NCCL on GPUs,
gloo on CPUs), plus the Ring Attention pass-KV baseline it is measured against.

    out = tree_attention(q, k_local, v_local, group=None)   # q replicated, K/V sharded

Modules, top-down: tree (the user-facing function) -> partial (local attention to one shard:
Triton split-KV on CUDA, PyTorch elsewhere) and combine (the log-depth merge through collectives,
over a flat group or a two-level topology) -> merge (the log-sum-exp algebra); cache (a sharded KV
cache); ring (the baseline); comm (counted collectives and their byte formulas).
"""

from .cache import ShardedKVCache
from .combine import combine
from .comm import CommCounter, CommStats, ring_comm, tree_comm
from .merge import merge_partials
from .partial import local_partial
from .ring import ring_attention_decode
from .topology import Topology
from .tree import tree_attention

__all__ = [
    "CommCounter",
    "CommStats",
    "ShardedKVCache",
    "Topology",
    "combine",
    "local_partial",
    "merge_partials",
    "ring_attention_decode",
    "ring_comm",
    "tree_attention",
    "tree_comm",
]
