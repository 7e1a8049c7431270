"""Communication primitives for the SP algorithms, with byte accounting and bounded waits.

Every byte an SP op moves goes through this module, so that

* ``count_comm()`` can report, for this rank, the bytes sent, the number of calls per operation, the bytes
  per operation and, for point-to-point sends, the bytes per peer and per ring direction; benchmarks and
  tests compare these against the analytic formula of each algorithm;
* every wait has a timeout (``SEQPAR_COMM_TIMEOUT_S``, default 300 s), so a missing peer becomes an error
  on the waiting rank instead of a hang;
* benchmarks can emulate a network slower than the compute (``set_link_emulation`` or
  ``SEQPAR_EMULATE_LINK="GBPS[,LATENCY_US]"``): a transfer then completes no earlier than
  latency + bytes / bandwidth after it could start on its link, one link per peer and direction, so
  overlap and bidirectional schedules show on a CPU what they buy on a slow network. Off by default.

Byte conventions (nccl-tests "bus bandwidth", what one rank puts on the wire):

================  ==========================================
send / isend      bytes of the tensor sent
all_gather        input bytes * (P - 1)
all_to_all        bytes of the pieces sent to other ranks (= input bytes * (P - 1) / P for equal splits)
reduce_scatter    input bytes * (P - 1) / P   (input: the full, unscattered tensor)
all_reduce        2 * bytes * (P - 1) // P
================  ==========================================

gloo notes: ``batch_isend_irecv`` can hang on gloo, so point-to-point transfers are issued as individual
``isend``/``irecv`` in the same order on every rank (even ranks send first, odd ranks receive first), and
the two ring directions use different tags so that at P = 2, where both directions connect the same two
ranks, a message never matches the receive of the other direction.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from seqpar import tracing

__all__ = [
    "CommStats",
    "LinkEmulation",
    "set_link_emulation",
    "PendingTransfer",
    "all_gather",
    "all_gather_async",
    "all_gather_differentiable",
    "all_reduce",
    "all_to_all",
    "all_to_all_differentiable",
    "broadcast_bytes",
    "check_consistent",
    "set_consistency_checks",
    "count_comm",
    "default_timeout",
    "group_info",
    "recv",
    "reduce_scatter",
    "ring_exchange",
    "ring_exchange_bidirectional",
    "send",
]

# Tags keep concurrent point-to-point streams apart (gloo matches receives by (source, tag)).
TAG_NEXT = 11  # data travelling to rank + 1
TAG_PREV = 12  # data travelling to rank - 1
TAG_P2P = 13  # explicit-peer transfers


def default_timeout() -> datetime.timedelta:
    """The bound on every wait in seqpar, from ``SEQPAR_COMM_TIMEOUT_S`` (default 300 s)."""
    return datetime.timedelta(seconds=float(os.environ.get("SEQPAR_COMM_TIMEOUT_S", "300")))


# ----------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------


def group_info(group: dist.ProcessGroup | None = None) -> tuple[dist.ProcessGroup, int, int]:
    """Return ``(group, rank_in_group, group_size)`` for ``group`` (``None``: the default group).

    Raises:
        ValueError: torch.distributed is not initialised, or this process is not a member of ``group``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: torch.distributed is not initialised; call torch.distributed.init_process_group() "
            "(torchrun does the rendezvous) before using seqpar's distributed ops"
        )
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not a member of the given group; "
            "pass a group this rank belongs to (every rank calls the op with its own group)"
        )
    return group, rank, dist.get_world_size(group)


def _global_rank(group: dist.ProcessGroup, group_rank: int) -> int:
    if group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """What this rank sent inside a ``count_comm()`` block.

    Attributes:
        bytes_sent: total bytes, by the conventions in the module docstring.
        calls: operation name -> number of calls.
        bytes_by_op: operation name -> bytes.
        bytes_by_peer: global rank of the receiver -> bytes, for point-to-point sends.
        bytes_by_direction: ``"next"`` / ``"prev"`` -> bytes, for ring sends.
    """

    bytes_sent: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    bytes_by_op: dict[str, int] = field(default_factory=dict)
    bytes_by_peer: dict[int, int] = field(default_factory=dict)
    bytes_by_direction: dict[str, int] = field(default_factory=dict)

    def _add(self, op: str, nbytes: int, peer: int | None, direction: str | None) -> None:
        self.bytes_sent += nbytes
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + nbytes
        if peer is not None:
            self.bytes_by_peer[peer] = self.bytes_by_peer.get(peer, 0) + nbytes
        if direction is not None:
            self.bytes_by_direction[direction] = self.bytes_by_direction.get(direction, 0) + nbytes


_active_counters: list[CommStats] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommStats]:
    """Count what this rank sends inside the block (nests: every open counter sees every transfer)."""
    stats = CommStats()
    _active_counters.append(stats)
    try:
        yield stats
    finally:
        _active_counters.remove(stats)


def _record(op: str, nbytes: int, *, peer: int | None = None, direction: str | None = None) -> None:
    for stats in _active_counters:
        stats._add(op, int(nbytes), peer, direction)
    tracing.record("comm", op=op, bytes=int(nbytes), peer=peer, direction=direction)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------------
# Link emulation (benchmarks only)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkEmulation:
    """Every link carries ``gbps`` gigabits per second per direction after ``latency_s``."""

    gbps: float
    latency_s: float = 0.0


def _link_from_env() -> LinkEmulation | None:
    spec = os.environ.get("SEQPAR_EMULATE_LINK", "").strip()
    if not spec:
        return None
    parts = [float(x) for x in spec.split(",")]
    return LinkEmulation(parts[0], parts[1] * 1e-6 if len(parts) > 1 else 0.0)


_link: LinkEmulation | None = _link_from_env()
_link_free_at: dict[object, float] = {}


def set_link_emulation(link: LinkEmulation | None) -> None:
    """Turn link emulation on (a ``LinkEmulation``) or off (None) for this process."""
    global _link
    if link is not None and link.gbps <= 0:
        raise ValueError(f"link: gbps must be > 0, got {link.gbps}")
    _link = link
    _link_free_at.clear()


def _emulated_finish(link_key: object, nbytes: int) -> float | None:
    """When a transfer of ``nbytes`` issued now on ``link_key`` would finish on the emulated link."""
    if _link is None:
        return None
    start = max(time.perf_counter(), _link_free_at.get(link_key, 0.0))
    finish = start + _link.latency_s + nbytes * 8 / (_link.gbps * 1e9)
    _link_free_at[link_key] = finish
    return finish


# ----------------------------------------------------------------------------------------------------
# Point-to-point
# ----------------------------------------------------------------------------------------------------


class PendingTransfer:
    """In-flight point-to-point or collective work; ``wait()`` blocks (with the timeout) and returns the result."""

    def __init__(
        self, works: Sequence[dist.Work], result: object, describe: str, emulated_finish: float | None = None
    ) -> None:
        self._works = list(works)
        self._result = result
        self._describe = describe
        self._done = False
        self._emulated_finish = emulated_finish

    def wait(self, timeout: datetime.timedelta | None = None):
        if not self._done:
            timeout = timeout or default_timeout()
            for work in self._works:
                try:
                    work.wait(timeout)
                except RuntimeError as err:  # gloo reports both timeouts and dead peers as RuntimeError
                    raise RuntimeError(f"seqpar: {self._describe} failed or timed out after {timeout}: {err}") from err
            if self._emulated_finish is not None:
                time.sleep(max(0.0, self._emulated_finish - time.perf_counter()))
            self._done = True
        tracing.record("wait", what=self._describe)
        return self._result


@contextlib.contextmanager
def _issuing(describe: str) -> Iterator[None]:
    """Posting a transfer to a peer whose connection is gone fails at once (not at the wait): name it the same way."""
    try:
        yield
    except RuntimeError as err:
        raise RuntimeError(f"seqpar: {describe} failed or timed out: {err}") from err


def _p2p(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]], rank: int) -> list:
    """Issue sends and receives in an order that pairs up on every rank: even ranks send first."""
    ops = []

    def issue_sends() -> None:
        for tensor, dst, tag in sends:
            with _issuing(f"send from rank {rank} to global rank {dst}"):
                ops.append(dist.isend(tensor, dst, tag=tag))

    def issue_recvs() -> None:
        for tensor, src, tag in recvs:
            with _issuing(f"receive on rank {rank} from global rank {src}"):
                ops.append(dist.irecv(tensor, src, tag=tag))

    if rank % 2 == 0:
        issue_sends()
        issue_recvs()
    else:
        issue_recvs()
        issue_sends()
    return ops


def ring_exchange(
    tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None, direction: str = "next", stream: int = 0
) -> PendingTransfer:
    """Send ``tensor`` one step around the ring and receive the neighbour's tensor of the same shape.

    ``direction="next"`` sends to rank + 1 and receives from rank - 1; ``"prev"`` the reverse. Returns at once;
    ``.wait()`` gives the received tensor. The caller keeps ``tensor`` alive and unmodified until then (double
    buffering: compute on the current block while the next one is in flight). Transfers with different
    ``stream`` numbers never match each other's receives, so an algorithm can keep two streams in flight in
    the same direction (ring attention's backward: K/V blocks and their gradient accumulators).
    """
    if direction not in ("next", "prev"):
        raise ValueError(f"direction: must be 'next' or 'prev', got {direction!r}")
    return ring_exchange_bidirectional(
        tensor if direction == "next" else None, tensor if direction == "prev" else None, group=group, stream=stream
    )


def ring_exchange_bidirectional(
    to_next: torch.Tensor | None,
    to_prev: torch.Tensor | None,
    *,
    group: dist.ProcessGroup | None = None,
    stream: int = 0,
) -> PendingTransfer:
    """Send ``to_next`` to rank + 1 and ``to_prev`` to rank - 1 at the same time; receive their counterparts.

    ``.wait()`` returns ``(from_prev, from_next)``: the tensor rank - 1 sent forward (shaped like ``to_next``)
    and the tensor rank + 1 sent backward (shaped like ``to_prev``); ``None`` for a direction not used.
    """
    group, rank, size = group_info(group)
    if size == 1:  # a ring of one: the neighbour is this rank, nothing crosses a link
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return PendingTransfer([], (clone(to_next), clone(to_prev)), "ring exchange with itself")
    nxt, prv = _global_rank(group, (rank + 1) % size), _global_rank(group, (rank - 1) % size)
    tag_next, tag_prev = TAG_NEXT + 100 * stream, TAG_PREV + 100 * stream
    sends, recvs = [], []
    from_prev = from_next = None
    if to_next is not None:
        to_next = to_next.contiguous()
        from_prev = torch.empty_like(to_next)
        sends.append((to_next, nxt, tag_next))
        recvs.append((from_prev, prv, tag_next))
        _record("send", _nbytes(to_next), peer=nxt, direction="next")
    if to_prev is not None:
        to_prev = to_prev.contiguous()
        from_next = torch.empty_like(to_prev)
        sends.append((to_prev, prv, tag_prev))
        recvs.append((from_next, nxt, tag_prev))
        _record("send", _nbytes(to_prev), peer=prv, direction="prev")
    works = _p2p(sends, recvs, rank)
    finishes = [_emulated_finish(("p2p", dst), _nbytes(t)) for t, dst, _ in sends]
    finish = max(finishes) if finishes and finishes[0] is not None else None
    return PendingTransfer(works, (from_prev, from_next), f"ring exchange on rank {rank} (peers {prv}, {nxt})", finish)


def send(
    tensor: torch.Tensor,
    dst: int,
    *,
    group: dist.ProcessGroup | None = None,
    tag: int = TAG_P2P,
    direction: str | None = None,
) -> PendingTransfer:
    """Asynchronously send ``tensor`` to group rank ``dst``. ``direction`` (``"next"``/``"prev"``), when given,
    is the ring direction the algorithm sends in, for ``CommStats.bytes_by_direction``."""
    group, rank, _ = group_info(group)
    peer = _global_rank(group, dst)
    tensor = tensor.contiguous()
    _record("send", _nbytes(tensor), peer=peer, direction=direction)
    finish = _emulated_finish(("p2p", peer), _nbytes(tensor))
    describe = f"send from rank {rank} to rank {dst}"
    with _issuing(describe):
        work = dist.isend(tensor, peer, tag=tag)
    return PendingTransfer([work], None, describe, finish)


def recv(tensor: torch.Tensor, src: int, *, group: dist.ProcessGroup | None = None, tag: int = TAG_P2P) -> PendingTransfer:
    """Asynchronously receive into ``tensor`` from group rank ``src``; ``.wait()`` returns ``tensor``."""
    group, rank, _ = group_info(group)
    describe = f"receive on rank {rank} from rank {src}"
    with _issuing(describe):
        work = dist.irecv(tensor, _global_rank(group, src), tag=tag)
    return PendingTransfer([work], tensor, describe)


# ----------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------


# torch renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (2.10+); the old names warn there.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_async(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> PendingTransfer:
    """Start an all-gather of equal-shaped tensors; ``.wait()`` returns them stacked on a new dim 0 (rank order)."""
    group, rank, size = group_info(group)
    tensor = tensor.contiguous()
    flat = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    nbytes = _nbytes(tensor) * (size - 1)
    _record("all_gather", nbytes)
    work = _all_gather_single(flat, tensor.reshape(-1), group=group, async_op=True)
    finish = _emulated_finish("collective", nbytes)
    return PendingTransfer([work], flat.view(size, *tensor.shape), f"all_gather on rank {rank}", finish)


def all_gather(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather; returns the ranks' tensors stacked on a new dim 0, in rank order."""
    return all_gather_async(tensor, group=group).wait()


def all_to_all(
    inputs: Sequence[torch.Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    output_shapes: Sequence[torch.Size | tuple[int, ...]] | None = None,
) -> list[torch.Tensor]:
    """Send ``inputs[j]`` to rank j; return the list whose j-th entry came from rank j.

    Pieces may differ in size (uneven splits): pass ``output_shapes[j]``, the shape of the piece rank j sends
    here. Without it, the piece from rank j is assumed shaped like ``inputs[j]`` (the even case).
    """
    group, rank, size = group_info(group)
    if len(inputs) != size:
        raise ValueError(f"inputs: all_to_all needs one piece per rank ({size}), got {len(inputs)}")
    shapes = [torch.Size(s) for s in output_shapes] if output_shapes is not None else [t.shape for t in inputs]
    # gloo's list all_to_all wants equal sizes: send one flat buffer with per-rank splits instead.
    send_buf = torch.cat([t.reshape(-1) for t in inputs])
    recv_buf = send_buf.new_empty(sum(s.numel() for s in shapes))
    nbytes = sum(_nbytes(t) for j, t in enumerate(inputs) if j != rank)
    _record("all_to_all", nbytes)
    work = dist.all_to_all_single(
        recv_buf, send_buf, output_split_sizes=[s.numel() for s in shapes],
        input_split_sizes=[t.numel() for t in inputs], group=group, async_op=True,
    )
    PendingTransfer([work], None, f"all_to_all on rank {rank}", _emulated_finish("collective", nbytes)).wait()
    return [piece.view(shape) for piece, shape in zip(recv_buf.split([s.numel() for s in shapes]), shapes)]


def reduce_scatter(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return this rank's slice of dim 0 (dim 0 must divide by P)."""
    group, rank, size = group_info(group)
    if tensor.shape[0] % size:
        raise ValueError(f"tensor: dim 0 ({tensor.shape[0]}) must be divisible by the group size {size}")
    tensor = tensor.contiguous()
    out = torch.empty((tensor.shape[0] // size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    nbytes = _nbytes(tensor) * (size - 1) // size
    _record("reduce_scatter", nbytes)
    work = _reduce_scatter_single(out, tensor, group=group, async_op=True)
    return PendingTransfer([work], out, f"reduce_scatter on rank {rank}", _emulated_finish("collective", nbytes)).wait()


def all_reduce(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it."""
    group, rank, size = group_info(group)
    nbytes = 2 * _nbytes(tensor) * (size - 1) // size
    _record("all_reduce", nbytes)
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return PendingTransfer([work], tensor, f"all_reduce on rank {rank}", _emulated_finish("collective", nbytes)).wait()


def broadcast_bytes(payload: bytes | None, *, src: int = 0, group: dist.ProcessGroup | None = None) -> bytes:
    """Broadcast a byte string from group rank ``src`` (its length first, then the bytes); returns it on every
    rank. Counted as ``broadcast`` with the payload's size on the source rank."""
    group, rank, _ = group_info(group)
    if rank == src and payload is None:
        raise ValueError("payload: the source rank must pass the bytes to broadcast")
    root = _global_rank(group, src)
    length = torch.tensor([len(payload) if rank == src else 0], dtype=torch.int64)
    PendingTransfer([dist.broadcast(length, root, group=group, async_op=True)], None, f"broadcast on rank {rank}").wait()
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if rank == src else torch.empty(int(length), dtype=torch.uint8)
    if rank == src:
        _record("broadcast", 8 + len(payload))
    PendingTransfer([dist.broadcast(data, root, group=group, async_op=True)], None, f"broadcast on rank {rank}").wait()
    return bytes(data.numpy().tobytes())


# ----------------------------------------------------------------------------------------------------
# Cross-rank consistency (opt-in)
# ----------------------------------------------------------------------------------------------------

_consistency_checks = os.environ.get("SEQPAR_DEBUG", "") not in ("", "0")


def set_consistency_checks(enabled: bool) -> None:
    """Turn the cross-rank argument check of every SP op on or off (also ``SEQPAR_DEBUG=1``)."""
    global _consistency_checks
    _consistency_checks = bool(enabled)


def consistency_checks_enabled() -> bool:
    return _consistency_checks


def check_consistent(fingerprint: str, *, group: dist.ProcessGroup | None = None, what: str = "call") -> None:
    """Raise on every rank when ranks of ``group`` passed different ``fingerprint`` strings (shapes, dtypes,
    options of one SP op call). One all-gather of a 64-bit digest, plus one of the strings when they differ."""
    import hashlib

    group, rank, size = group_info(group)
    digest = int.from_bytes(hashlib.sha256(fingerprint.encode()).digest()[:8], "little", signed=True)
    digests = all_gather(torch.tensor([digest], dtype=torch.int64), group=group).view(-1).tolist()
    if len(set(digests)) == 1:
        return
    groups: dict[int, list[int]] = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    majority = max(groups.values(), key=len)
    differ = sorted(r for members in groups.values() if members is not majority for r in members)
    raise ValueError(
        f"{what}: ranks {differ} of the group called it with different arguments than ranks {majority}; "
        f"this rank ({rank}) passed: {fingerprint}"
    )


# ----------------------------------------------------------------------------------------------------
# Differentiable collectives (their adjoints are collectives too)
# ----------------------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        ctx.group = group
        return all_gather(tensor, group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank used the gathered copy, so the gradient of a shard is the sum of all ranks' gradients for it.
        return reduce_scatter(grad.contiguous(), group=ctx.group).squeeze(0), None


def all_gather_differentiable(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``all_gather`` whose backward reduce-scatters the gradient (stacked on a new dim 0)."""
    return _AllGather.apply(tensor, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, output_shapes, *inputs: torch.Tensor):
        ctx.group = group
        ctx.input_shapes = [t.shape for t in inputs]
        outputs = all_to_all(list(inputs), group=group, output_shapes=output_shapes)
        ctx.output_shapes = [t.shape for t in outputs]
        ctx.dtype, ctx.device = inputs[0].dtype, inputs[0].device
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        grads = [torch.zeros(s, dtype=ctx.dtype, device=ctx.device) if g is None else g for g, s in zip(grads, ctx.output_shapes)]
        return (None, None, *all_to_all(grads, group=ctx.group, output_shapes=ctx.input_shapes))


def all_to_all_differentiable(
    inputs: Sequence[torch.Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    output_shapes: Sequence[torch.Size | tuple[int, ...]] | None = None,
) -> list[torch.Tensor]:
    """``all_to_all`` whose backward is the reverse all-to-all."""
    return list(_AllToAll.apply(group, output_shapes, *inputs))
