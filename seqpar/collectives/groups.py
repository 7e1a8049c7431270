"""Sub-groups of a process group, created once and cached.

SP ops that work on part of their group (USP: Ulysses inside consecutive ranks, ring across them) and the
runtime (a plan's SP groups) both need process groups over subsets of a parent group. ``torch.distributed``
creates a group with a collective over the ranks that join it, so creating one in the middle of a step is
costly and, done in different orders on different ranks, hangs. Here every group is created with
``use_local_synchronization=True`` (only its members take part, so ranks outside it need not call) and cached
per ``(parent, member ranks)``, so each is created once per process.
"""

from __future__ import annotations

import torch.distributed as dist

from seqpar.collectives import comm

__all__ = ["subgroup", "split_consecutive"]

# (id of the parent group, members as global ranks) -> the group; the parent object is kept alive alongside so
# its id is never reused by another group while the entry exists.
_cache: dict[tuple[int, tuple[int, ...]], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def subgroup(parent: dist.ProcessGroup | None, ranks: tuple[int, ...] | list[int]) -> dist.ProcessGroup:
    """The process group of ``ranks`` (ranks OF ``parent``, ascending), created on first use and cached.

    Every member must call it (in any order relative to other sub-groups); non-members need not. The whole
    parent comes back as itself.

    Raises:
        ValueError: ``ranks`` empty, not ascending, out of range, or not containing this rank.
    """
    parent, rank, size = comm.group_info(parent)
    ranks = tuple(int(r) for r in ranks)
    if not ranks or list(ranks) != sorted(set(ranks)) or ranks[0] < 0 or ranks[-1] >= size:
        raise ValueError(f"ranks: expected distinct ascending ranks in [0, {size}), got {list(ranks)}")
    if rank not in ranks:
        raise ValueError(f"ranks: this rank ({rank} of the parent group) is not in {list(ranks)}")
    if len(ranks) == size:
        return parent
    members = tuple(r if parent is dist.group.WORLD else dist.get_global_rank(parent, r) for r in ranks)
    key = (id(parent), members)
    cached = _cache.get(key)
    if cached is None:
        group = dist.new_group(list(members), use_local_synchronization=True, timeout=comm.default_timeout())
        cached = _cache[key] = (group, parent)
    return cached[0]


def split_consecutive(
    parent: dist.ProcessGroup | None, inner_size: int
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """``(inner, outer)`` groups of this rank for a 2-D split of ``parent`` (size P) with ``inner_size`` = u.

    Inner groups are consecutive ranks ``[g*u, (g+1)*u)``; the outer group of rank ``g*u + i`` is
    ``{i, u + i, 2u + i, ...}`` (its rank in the outer group is g). Both cached.

    Raises:
        ValueError: ``inner_size`` not a positive divisor of the parent's size.
    """
    parent, rank, size = comm.group_info(parent)
    if isinstance(inner_size, bool) or not isinstance(inner_size, int) or inner_size < 1 or size % inner_size:
        raise ValueError(f"inner_size: must be a positive divisor of the group size {size}, got {inner_size!r}")
    g, i = divmod(rank, inner_size)
    inner = subgroup(parent, range(g * inner_size, (g + 1) * inner_size))
    outer = subgroup(parent, range(i, size, inner_size))
    return inner, outer
