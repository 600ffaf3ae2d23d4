"""Where the combine runs: one process group (flat) or a two-level hierarchy (inside a node first,
then across nodes).

A level is a process group; the combine merges partials inside each group of the first level, then
merges those results inside each group of the next. Because the merge is associative the result
equals the flat one (up to fp32 rounding), but the slow inter-node links then carry one message per
node pair instead of one per GPU pair: the topology awareness of the Tree Attention paper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup


def check_member(group: ProcessGroup | None) -> None:
    """``dist.new_group`` gives ranks outside the group a placeholder, not a group: name the mistake
    instead of failing later on its world size of -1."""
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"rank {dist.get_rank()} is not a member of the group passed as group=; call only on its members")


@dataclass(frozen=True)
class Topology:
    """Process groups to reduce over, innermost first (None is the default group)."""

    levels: tuple[ProcessGroup | None, ...]

    @staticmethod
    def flat(group: ProcessGroup | None = None) -> "Topology":
        return Topology((group,))

    @staticmethod
    def two_level(local_world_size: int | None = None) -> "Topology":
        """Intra-node groups of ``local_world_size`` consecutive ranks (default: the
        LOCAL_WORLD_SIZE that torchrun sets), then inter-node groups of equal local rank.

        Collective: every rank of the default group must call it, in the same order."""
        world = dist.get_world_size()
        if local_world_size is None:
            if "LOCAL_WORLD_SIZE" not in os.environ:
                raise ValueError("pass local_world_size or launch with torchrun (which sets LOCAL_WORLD_SIZE)")
            local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
        if local_world_size < 1 or world % local_world_size:
            raise ValueError(f"world size {world} is not a multiple of local_world_size {local_world_size}")
        if local_world_size in (1, world):
            return Topology.flat()
        nodes = world // local_world_size
        intra, _ = dist.new_subgroups_by_enumeration(
            [[n * local_world_size + i for i in range(local_world_size)] for n in range(nodes)]
        )
        inter, _ = dist.new_subgroups_by_enumeration(
            [[n * local_world_size + i for n in range(nodes)] for i in range(local_world_size)]
        )
        return Topology((intra, inter))

    @staticmethod
    def from_mesh(mesh) -> "Topology":
        """From a DeviceMesh: 1-d is flat; 2-d is (nodes, local): dim 1 inside a node, then dim 0."""
        if mesh.ndim == 1:
            return Topology.flat(mesh.get_group())
        if mesh.ndim == 2:
            return Topology((mesh.get_group(1), mesh.get_group(0)))
        raise ValueError(f"a topology mesh must be 1-d or 2-d (nodes, local), got {mesh.ndim}-d")

    @staticmethod
    def of(group: "ProcessGroup | Topology | None | object") -> "Topology":
        """Accept what users pass as ``group=``: None, a ProcessGroup, a Topology or a DeviceMesh."""
        if isinstance(group, Topology):
            return group
        check_member(group)
        if group is None or isinstance(group, ProcessGroup):
            return Topology.flat(group)
        if hasattr(group, "get_group") and hasattr(group, "ndim"):
            return Topology.from_mesh(group)
        raise TypeError(f"group must be None, a ProcessGroup, a Topology or a DeviceMesh, got {type(group).__name__}")

    def sizes(self) -> tuple[int, ...]:
        """World size of this rank's group at each level."""
        return tuple(dist.get_world_size(g) for g in self.levels)
