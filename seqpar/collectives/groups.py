"""Sub-groups of a process group, created once and cached.

SP ops that work on part of their group (USP: Ulysses inside consecutive ranks, ring across them) and the
runtime (a plan's SP groups) both need process groups over subsets of a parent group. ``torch.distributed``
creates a group with a collective over the ranks that join it, so creating one in the middle of a step is
costly and, done in different orders on different ranks, hangs. Here every group is created with
``use_local_synchronization=True`` (only its members take part, so ranks outside it need not call) and cached
per ``(parent, member ranks)``, so each is created once per process.

Such a group's name, which keys its rendezvous in the store, is torch's hash of the member ranks AND of how
many groups this process already has. Ranks that were in different groups before (an auto plan's degree-1
groups on some ranks, another replica's groups on a mesh) count differently, so members of a new group would
wait for each other under different names until the store timed out. ``_named_by_members`` makes the name a
function of the members alone (and of how often seqpar created that member set before, which every member
knows equally).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from seqpar.collectives import comm

__all__ = ["subgroup", "split_consecutive"]

# (id of the parent group, members as global ranks) -> the group; the parent object is kept alive alongside so
# its id is never reused by another group while the entry exists.
_cache: dict[tuple[int, tuple[int, ...]], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}
# member ranks -> how many groups over exactly them seqpar created in this process (the same on every member)
_created: dict[tuple[int, ...], int] = {}
_naming = threading.Lock()


@contextlib.contextmanager
def _named_by_members(members: tuple[int, ...]) -> Iterator[None]:
    """Inside: ``new_group(..., use_local_synchronization=True)`` names the group by ``members`` alone.

    torch names such a group ``sha1(ranks + number of groups this process has)``
    (``distributed_c10d._hash_ranks_to_str``), which differs between members with different histories. Where
    that private function is missing (another torch), torch's own name is used, as before."""
    original = getattr(c10d, "_hash_ranks_to_str", None)
    if original is None:
        yield
        return
    nth = _created.get(members, 0)
    name = hashlib.sha1(f"seqpar/{'_'.join(map(str, members))}/{nth}".encode(), usedforsecurity=False).hexdigest()
    with _naming:
        c10d._hash_ranks_to_str = lambda ranks: name
        try:
            yield
        finally:
            c10d._hash_ranks_to_str = original
    _created[members] = nth + 1


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
        with _named_by_members(members):
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
