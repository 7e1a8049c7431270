"""Moving tensors between ranks: groups, bounded waits, point-to-point exchanges and collectives.

Every wait is bounded by ``default_timeout()`` (``SEQPAR_COMM_TIMEOUT_S``, default 300 s), so a missing peer
becomes an error naming the transfer on the waiting rank instead of a hang. Every transfer is counted
(``comm.accounting``) and, when link emulation is on, completes no earlier than the emulated link allows
(``comm.emulation``).

Point-to-point: all of it is posted by ``exchange`` (``send``, ``recv`` and the ring exchanges are one-line
uses of it). gloo's ``batch_isend_irecv`` can hang, so an exchange issues individual ``isend``/``irecv`` in an
order that pairs up on every rank: even ranks post their sends first, odd ranks their receives first. Messages
travel on the default group's connections, addressed by global rank, and are told apart by their tag
(``comm.tags``, one table for all of seqpar).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from seqpar import tracing
from seqpar.collectives.comm import tags
from seqpar.collectives.comm.accounting import nbytes as _nbytes
from seqpar.collectives.comm.accounting import record as _record
from seqpar.collectives.comm import emulation as _emulation
from seqpar.collectives.comm.devices import audit as _audit_devices
from seqpar.collectives.comm.devices import required_device

__all__ = [
    "PendingTransfer",
    "all_gather",
    "all_gather_async",
    "all_reduce",
    "all_reduce_async",
    "all_to_all",
    "all_to_all_single",
    "broadcast_bytes",
    "default_timeout",
    "exchange",
    "group_info",
    "recv",
    "reduce_scatter",
    "ring_exchange",
    "ring_exchange_bidirectional",
    "send",
]

DEFAULT_TIMEOUT_S = 300.0
_MAX_TIMEOUT_S = 1e9  # ~31 years: larger values overflow datetime.timedelta / gloo's millisecond counter


def default_timeout() -> datetime.timedelta:
    """The bound on every wait in seqpar, from ``SEQPAR_COMM_TIMEOUT_S`` (default 300 s).

    Raises:
        ValueError: ``SEQPAR_COMM_TIMEOUT_S`` is set to something other than a finite number of seconds in
            (0, 1e9] (``0`` would remove the bound, a negative value would fail every wait).
    """
    raw = os.environ.get("SEQPAR_COMM_TIMEOUT_S", "").strip()
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= _MAX_TIMEOUT_S):
        raise ValueError(
            f"SEQPAR_COMM_TIMEOUT_S: must be a finite number of seconds > 0 (at most {_MAX_TIMEOUT_S:g}), got "
            f"{raw!r}; unset it for the default of {DEFAULT_TIMEOUT_S:g} s, or set e.g. SEQPAR_COMM_TIMEOUT_S=600"
        )
    return datetime.timedelta(seconds=seconds)


# ----------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------


def group_info(group: dist.ProcessGroup | None = None) -> tuple[dist.ProcessGroup, int, int]:
    """Return ``(group, rank_in_group, group_size)`` for ``group`` (``None``: the default group).

    Every SP op calls this before its first transfer, so it also validates ``SEQPAR_COMM_TIMEOUT_S`` there:
    a bad value fails on every rank before anything is sent, not at the first wait.

    Raises:
        ValueError: torch.distributed is not initialised, this process is not a member of ``group``, or
            ``SEQPAR_COMM_TIMEOUT_S`` is invalid (see ``default_timeout``).
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
    default_timeout()
    return group, rank, dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group``."""
    if group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# ----------------------------------------------------------------------------------------------------
# Waiting
# ----------------------------------------------------------------------------------------------------


class PendingTransfer:
    """In-flight point-to-point or collective work; ``wait()`` blocks (with the timeout) and returns the result."""

    def __init__(
        self,
        works: Sequence[dist.Work],
        result: object,
        describe: str,
        emulated_finish: float | Callable[[], float] | None = None,
        *,
        finalize: Callable[[Any], Any] | None = None,
    ) -> None:
        self._works = list(works)
        self._result = result
        self._describe = describe
        self._done = False
        self._emulated_finish = emulated_finish
        self._finalize = finalize

    def wait(self, timeout: datetime.timedelta | None = None):
        if not self._done:
            timeout = timeout or default_timeout()
            for work in self._works:
                try:
                    work.wait(timeout)
                except RuntimeError as err:  # gloo reports both timeouts and dead peers as RuntimeError
                    raise RuntimeError(f"seqpar: {self._describe} failed or timed out after {timeout}: {err}") from err
            if self._emulated_finish is not None:  # link emulation: not before the emulated link is done
                finish = self._emulated_finish
                _emulation.sleep_until(finish() if callable(finish) else finish)
            if self._finalize is not None:
                self._result = self._finalize(self._result)
            self._done = True
            # the finished works hold their tensors (a send's buffer): let go of them now, not when this object goes
            self._works = []
        tracing.record("wait", what=self._describe)
        return self._result

    def arrived(self) -> bool:
        """Whether ``wait()`` would return at once; never blocks. True once every transfer has completed and, with
        link emulation, its emulated arrival time has passed (lets a relay forward what has come in between
        pieces of compute)."""
        if self._done:
            return True
        if not all(work.is_completed() for work in self._works):
            return False
        finish = self._emulated_finish
        return finish is None or _emulation.clock() >= (finish() if callable(finish) else finish)

    def then(self, finalize: Callable[[Any], Any]) -> PendingTransfer:
        """The same transfer, whose ``wait()`` returns ``finalize(result)``; use it instead of this one."""
        previous = self._finalize
        combined = finalize if previous is None else (lambda result: finalize(previous(result)))
        return PendingTransfer(self._works, self._result, self._describe, self._emulated_finish, finalize=combined)


@contextlib.contextmanager
def _posting(describe: str, what: str) -> Iterator[None]:
    """Posting a transfer to a peer whose connection is gone fails at once (not at the wait): name it the same way."""
    try:
        yield
    except RuntimeError as err:
        raise RuntimeError(f"seqpar: {describe} failed or timed out: posting the {what} failed: {err}") from err


# ----------------------------------------------------------------------------------------------------
# Point-to-point
# ----------------------------------------------------------------------------------------------------

RecvBuffer = torch.Tensor | tuple[Sequence[int], torch.dtype]


def exchange(
    sends: Sequence[tuple[torch.Tensor, int, int]],
    recvs: Sequence[tuple[RecvBuffer, int, int]],
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    describe: str | None = None,
) -> PendingTransfer:
    """Post a batch of point-to-point sends and receives at once; one ``PendingTransfer`` finishes them all.

    Args:
        sends: ``(tensor, dst, tag)`` per message: ``tensor`` goes to group rank ``dst``. Keep it alive and
            unmodified until the wait (a non-contiguous tensor is sent as a contiguous copy).
        recvs: ``(buffer, src, tag)`` per message from group rank ``src``: a tensor to fill, or a
            ``(shape, dtype)`` to allocate on ``device``.
        group: the process group ``dst`` / ``src`` are ranks of (default: the world).
        device: where ``(shape, dtype)`` receive buffers are allocated (default: the device of the first send,
            else ``required_device()`` of the world, whose connections carry the messages).
        describe: how errors name this exchange (default: the ranks it talks to).

    Posted in an order that pairs up on every rank (even ranks send first, odd ranks receive first), so any
    set of ranks whose exchanges match (every send has a receive with the same tag, in the same order per
    peer and tag) completes. Every send is counted as ``send`` bytes for its peer and for the ring direction
    of its tag (``comm.tags.direction_of``); with link emulation (``comm.emulation``) the exchange finishes
    no earlier than its sends are out and its receives have arrived on the emulated links.

    Returns:
        A ``PendingTransfer`` whose ``wait()`` returns the list of received tensors, in ``recvs`` order.

    Raises:
        ValueError: a peer outside the group or equal to this rank, or a group this rank is not in.
    """
    group, rank, size = group_info(group)
    if device is None:
        device = sends[0][0].device if sends else required_device(dist.group.WORLD)
    buffers = [
        buf if isinstance(buf, torch.Tensor) else torch.empty(tuple(buf[0]), dtype=buf[1], device=device)
        for buf, _, _ in recvs
    ]
    return _post(
        [(tensor, dst, tag, tags.direction_of(tag)) for tensor, dst, tag in sends],
        [(buf, src, tag) for buf, (_, src, tag) in zip(buffers, recvs)],
        group, rank, size, describe,
    )


def _post(
    sends: list[tuple[torch.Tensor, int, int, str | None]],
    recvs: list[tuple[torch.Tensor, int, int]],
    group: dist.ProcessGroup,
    rank: int,
    size: int,
    describe: str | None,
) -> PendingTransfer:
    """``exchange`` after its arguments are resolved; sends carry the direction they are counted under."""
    for role, peers in (("dst", [s[1] for s in sends]), ("src", [r[1] for r in recvs])):
        bad = [p for p in peers if not (isinstance(p, int) and 0 <= p < size) or p == rank]
        if bad:
            raise ValueError(f"{role}: peers must be other ranks of the group (0..{size - 1}, not {rank}), got {bad}")
    if describe is None:
        if len(sends) == 1 and not recvs:
            describe = f"send from rank {rank} to rank {sends[0][1]}"
        elif len(recvs) == 1 and not sends:
            describe = f"receive on rank {rank} from rank {recvs[0][1]}"
        else:
            describe = (f"exchange on rank {rank} (sends to ranks {[s[1] for s in sends]}, receives from ranks "
                        f"{[r[1] for r in recvs]})")
    sends = [(tensor.contiguous(), global_rank(group, dst), tag, direction) for tensor, dst, tag, direction in sends]
    recvs = [(buf, global_rank(group, src), tag) for buf, src, tag in recvs]
    # messages travel on the world's connections (addressed by global rank), so the world's backend decides
    _audit_devices(describe, dist.group.WORLD, [(f"send to global rank {dst}", t) for t, dst, _, _ in sends]
                   + [(f"receive from global rank {src}", buf) for buf, src, _ in recvs])
    works = []
    # link emulation: each payload is followed by a header (same peer and tag) carrying its emulated arrival
    emulated = _emulation.link_emulation() is not None
    headers_out, arrivals, headers_in = [], [], []

    def post_sends() -> None:
        for tensor, dst, tag, direction in sends:
            _record("send", _nbytes(tensor), peer=dst, direction=direction)
            with _posting(describe, f"send to global rank {dst}"):
                works.append(dist.isend(tensor, dst, tag=tag))
                if emulated:
                    header, arrival = _emulation.send_header(dst, _nbytes(tensor), tensor.device)
                    headers_out.append(header)
                    arrivals.append(arrival)
                    works.append(dist.isend(header, dst, tag=tag))

    def post_recvs() -> None:
        for buf, src, tag in recvs:
            with _posting(describe, f"receive from global rank {src}"):
                works.append(dist.irecv(buf, src, tag=tag))
                if emulated:
                    headers_in.append(_emulation.recv_header(buf.device))
                    works.append(dist.irecv(headers_in[-1], src, tag=tag))

    first, second = (post_sends, post_recvs) if rank % 2 == 0 else (post_recvs, post_sends)
    first()
    second()
    finish = (lambda: _emulation.p2p_finish(arrivals, headers_in)) if emulated else None
    # the send tensors ride along in the result until the wait, so a contiguous copy outlives its isend
    return PendingTransfer(
        works, ([t for t, *_ in sends] + headers_out, [buf for buf, *_ in recvs]), describe, finish,
        finalize=lambda sent_and_received: sent_and_received[1],
    )


def ring_exchange(
    tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None, direction: str = "next", stream: int = 0
) -> PendingTransfer:
    """Send ``tensor`` one step around the ring and receive the neighbour's tensor of the same shape.

    ``direction="next"`` sends to rank + 1 and receives from rank - 1; ``"prev"`` the reverse. Returns at once;
    ``.wait()`` gives ``(from_prev, from_next)`` as ``ring_exchange_bidirectional`` (None for the unused
    direction). The caller keeps ``tensor`` alive and unmodified until then (double buffering: compute on the
    current block while the next one is in flight). Transfers on different ``stream`` numbers (0 ..
    ``comm.tags.RING_STREAMS`` - 1) never match each other's receives, so an algorithm can keep two streams in
    flight in the same direction (ring attention's backward: K/V blocks and their gradient accumulators).
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
    tag_next, tag_prev = tags.ring_tag("next", stream), tags.ring_tag("prev", stream)
    group, rank, size = group_info(group)
    if size == 1:  # a ring of one: the neighbour is this rank, nothing crosses a link
        copies = tuple(None if t is None else t.clone() for t in (to_next, to_prev))
        return PendingTransfer([], copies, "ring exchange with itself")
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    sends, recvs = [], []
    if to_next is not None:
        sends.append((to_next, nxt, tag_next))
        recvs.append((torch.empty(to_next.shape, dtype=to_next.dtype, device=to_next.device), prv, tag_next))
    if to_prev is not None:
        sends.append((to_prev, prv, tag_prev))
        recvs.append((torch.empty(to_prev.shape, dtype=to_prev.dtype, device=to_prev.device), nxt, tag_prev))
    describe = f"ring exchange on rank {rank} (peers {global_rank(group, prv)}, {global_rank(group, nxt)})"
    pending = exchange(sends, recvs, group=group, describe=describe)
    has_next = to_next is not None
    return pending.then(lambda got: (got[0] if has_next else None, got[-1] if to_prev is not None else None))


def send(
    tensor: torch.Tensor,
    dst: int,
    *,
    group: dist.ProcessGroup | None = None,
    tag: int = tags.P2P,
    direction: str | None = None,
) -> PendingTransfer:
    """Asynchronously send ``tensor`` to group rank ``dst`` (an ``exchange`` of one message). ``direction``
    (``"next"``/``"prev"``) overrides the ring direction the bytes are counted under (default: the tag's)."""
    group, rank, size = group_info(group)
    return _post([(tensor, dst, tag, direction or tags.direction_of(tag))], [], group, rank, size, None)


def recv(
    tensor: torch.Tensor, src: int, *, group: dist.ProcessGroup | None = None, tag: int = tags.P2P
) -> PendingTransfer:
    """Asynchronously receive into ``tensor`` from group rank ``src``; ``.wait()`` returns ``tensor``."""
    group, rank, size = group_info(group)
    return _post([], [(tensor, src, tag)], group, rank, size, None).then(lambda got: got[0])


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
    _audit_devices(f"all_gather on rank {rank}", group, [("input", tensor), ("output", flat)])
    nbytes = _nbytes(tensor) * (size - 1)
    _record("all_gather", nbytes)
    work = _all_gather_single(flat, tensor.reshape(-1), group=group, async_op=True)
    works, finish = _emulate_collective([work], group, size, nbytes, size - 1, tensor.device)
    return PendingTransfer(works, flat.view(size, *tensor.shape), f"all_gather on rank {rank}", finish)


def _emulate_collective(
    works: list[dist.Work], group: dist.ProcessGroup, size: int, nbytes: int, rounds: int, device: torch.device
) -> tuple[list[dist.Work], Callable[[], float] | None]:
    """With link emulation on: post the all-gather of every rank's start after the collective's ``works``;
    return them with the emulated completion (None and the works unchanged when it is off or P = 1)."""
    if _emulation.link_emulation() is None or size == 1:
        return works, None
    start = _emulation.collective_start(nbytes, device)
    starts = torch.empty(size, dtype=torch.float64, device=device)
    works = [*works, _all_gather_single(starts, start, group=group, async_op=True)]
    return works, lambda: _emulation.collective_finish(starts, nbytes, rounds)


def all_gather(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather; returns the ranks' tensors stacked on a new dim 0, in rank order."""
    return all_gather_async(tensor, group=group).wait()


def gather_uncounted(tensor: torch.Tensor, *, group: dist.ProcessGroup, describe: str) -> torch.Tensor:
    """All-gather of a few bytes of metadata (the agreement check): bounded like every wait, but not counted,
    traced or emulated, so that the byte counts and schedules of the SP ops stay exactly their algorithms'."""
    size = dist.get_world_size(group)
    flat = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    _audit_devices(describe, group, [("input", tensor), ("output", flat)])
    work = _all_gather_single(flat, tensor.reshape(-1), group=group, async_op=True)
    timeout = default_timeout()
    try:
        work.wait(timeout)
    except RuntimeError as err:
        raise RuntimeError(f"seqpar: {describe} failed or timed out after {timeout}: {err}") from err
    return flat.view(size, *tensor.shape)


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
    _audit_devices(f"all_to_all on rank {rank}", group, [("input", send_buf), ("output", recv_buf)])
    nbytes = sum(_nbytes(t) for j, t in enumerate(inputs) if j != rank)
    _record("all_to_all", nbytes)
    held = _references(send_buf, recv_buf)
    work = dist.all_to_all_single(
        recv_buf, send_buf, output_split_sizes=[s.numel() for s in shapes],
        input_split_sizes=[t.numel() for t in inputs], group=group, async_op=True,
    )
    works, finish = _emulate_collective([work], group, size, nbytes, size - 1, send_buf.device)
    PendingTransfer(works, None, f"all_to_all on rank {rank}", finish).wait()
    del works, work
    _released_by_backend(held)
    return [piece.view(shape) for piece, shape in zip(recv_buf.split([s.numel() for s in shapes]), shapes)]


def all_to_all_single(
    tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Send ``tensor[j]`` to rank j; returns ``out`` (default: a new tensor shaped like ``tensor``) whose j-th
    entry came from rank j. ``tensor`` is contiguous with dim 0 of size P (equal pieces): the caller lays the
    pieces out in the one copy it makes anyway (Ulysses' permute), so nothing is concatenated here. When this
    returns, the backend holds no reference to ``tensor`` any more: dropping it frees it now (deterministic peaks).

    Raises:
        ValueError: ``tensor`` is not contiguous or its dim 0 is not the group size, or ``out`` is not contiguous
            with as many elements.
    """
    group, rank, size = group_info(group)
    if tensor.dim() == 0 or tensor.shape[0] != size or not tensor.is_contiguous():
        raise ValueError(f"tensor: all_to_all_single needs a contiguous (P={size}, ...) tensor, got "
                         f"{tuple(tensor.shape)}{'' if tensor.is_contiguous() else ' (not contiguous)'}")
    if out is None:
        out = torch.empty_like(tensor)
    elif not out.is_contiguous() or out.numel() != tensor.numel():
        raise ValueError(f"out: expected a contiguous tensor of {tensor.numel()} elements, got {tuple(out.shape)}")
    _audit_devices(f"all_to_all on rank {rank}", group, [("input", tensor), ("output", out)])
    nbytes = _nbytes(tensor) * (size - 1) // size
    _record("all_to_all", nbytes)
    held = _references(tensor, out)
    work = dist.all_to_all_single(out, tensor, group=group, async_op=True)
    works, finish = _emulate_collective([work], group, size, nbytes, size - 1, tensor.device)
    PendingTransfer(works, None, f"all_to_all on rank {rank}", finish).wait()
    del works, work
    _released_by_backend(held)
    return out


_RELEASE_WAIT_S = 0.5
_release_timeouts = 0  # after a few, stop waiting: a backend that keeps its buffers would otherwise stall every call


def _references(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The tensors handed to a collective with their reference counts before it (``_released_by_backend``)."""
    return [(t, t._use_count()) for t in tensors if t.device.type == "cpu"]


def _released_by_backend(held: list[tuple[torch.Tensor, int]]) -> None:
    """Wait (briefly, bounded) until torch.distributed's worker threads have dropped their references to a
    finished collective's tensors. gloo completes the work's future before its thread lets go of the work (and
    of the tensors it holds), so a send buffer the caller drops right after ``wait()`` may be freed a moment
    later on gloo's thread, or only after the step's peak: measured 0-4 local shards more or less at the same
    step of Ulysses. When this returns only the references from before the collective are left, so dropping a
    buffer frees it there and then. (CUDA tensors are not watched: NCCL's caching allocator handles them.)"""
    global _release_timeouts
    deadline = None
    for tensor, before in held:
        while tensor._use_count() > before and _release_timeouts < 3:
            now = time.monotonic()
            deadline = deadline or now + _RELEASE_WAIT_S
            if now > deadline:
                _release_timeouts += 1
                return  # memory only: never fail a transfer that has completed
            time.sleep(0)


def reduce_scatter(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return this rank's slice of dim 0 (dim 0 must divide by P)."""
    group, rank, size = group_info(group)
    if tensor.shape[0] % size:
        raise ValueError(f"tensor: dim 0 ({tensor.shape[0]}) must be divisible by the group size {size}")
    tensor = tensor.contiguous()
    out = torch.empty((tensor.shape[0] // size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _audit_devices(f"reduce_scatter on rank {rank}", group, [("input", tensor), ("output", out)])
    nbytes = _nbytes(tensor) * (size - 1) // size
    _record("reduce_scatter", nbytes)
    work = _reduce_scatter_single(out, tensor, group=group, async_op=True)
    works, finish = _emulate_collective([work], group, size, nbytes, size - 1, tensor.device)
    return PendingTransfer(works, out, f"reduce_scatter on rank {rank}", finish).wait()


def all_reduce_async(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> PendingTransfer:
    """Start summing ``tensor`` over ranks in place; ``.wait()`` returns it (gradient buckets overlap this way)."""
    group, rank, size = group_info(group)
    _audit_devices(f"all_reduce on rank {rank}", group, [("input", tensor)])
    nbytes = 2 * _nbytes(tensor) * (size - 1) // size
    _record("all_reduce", nbytes)
    work = dist.all_reduce(tensor, group=group, async_op=True)
    works, finish = _emulate_collective([work], group, size, nbytes, 2 * (size - 1), tensor.device)
    return PendingTransfer(works, tensor, f"all_reduce on rank {rank}", finish)


def all_reduce(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it."""
    return all_reduce_async(tensor, group=group).wait()


# A payload of up to this many bytes (less the 8 of its length) travels in ONE broadcast with its length; a
# longer one sends the rest in a second. Every broadcast waits for the last rank to arrive, and on CPU ranks that
# outnumber the cores each such wait costs a scheduling round trip (1-20 ms measured for the per-step plan of
# ``strategy="auto"``, ~0.3-3 KB of JSON, when it took two broadcasts).
BROADCAST_INLINE_BYTES = 4096


def broadcast_bytes(payload: bytes | None, *, src: int = 0, group: dist.ProcessGroup | None = None) -> bytes:
    """Broadcast a byte string from group rank ``src``; returns it on every rank. One message of
    ``BROADCAST_INLINE_BYTES`` carries the length and the first bytes; a longer payload's rest follows in a
    second. Counted as ``broadcast`` with the bytes sent, on the source rank. Both messages travel on
    ``required_device(group)`` (CUDA for NCCL); the receivers read the length on the host, the one host sync a
    variable-size broadcast needs."""
    group, rank, _ = group_info(group)
    if rank == src and payload is None:
        raise ValueError("payload: the source rank must pass the bytes to broadcast")
    root = global_rank(group, src)
    device = required_device(group)
    describe = f"broadcast on rank {rank}"
    inline = BROADCAST_INLINE_BYTES - 8
    header = np.zeros(BROADCAST_INLINE_BYTES, dtype=np.uint8)
    if rank == src:
        header[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), dtype=np.uint8)
        head = np.frombuffer(payload[:inline], dtype=np.uint8)
        header[8:8 + head.size] = head
    header_t = torch.from_numpy(header).to(device)
    _audit_devices(describe, group, [("header", header_t)])
    PendingTransfer([dist.broadcast(header_t, root, group=group, async_op=True)], None, describe).wait()
    received = header_t.cpu().numpy().tobytes()
    length = int.from_bytes(received[:8], "little")
    if length <= inline:
        if rank == src:
            _record("broadcast", BROADCAST_INLINE_BYTES)
        return received[8:8 + length]
    if rank == src:
        rest = torch.from_numpy(np.frombuffer(payload[inline:], dtype=np.uint8).copy()).to(device)
        _record("broadcast", BROADCAST_INLINE_BYTES + rest.numel())
    else:
        rest = torch.empty(length - inline, dtype=torch.uint8, device=device)
    _audit_devices(describe, group, [("rest", rest)])
    PendingTransfer([dist.broadcast(rest, root, group=group, async_op=True)], None, describe).wait()
    return received[8:] + bytes(rest.cpu().numpy().tobytes())
