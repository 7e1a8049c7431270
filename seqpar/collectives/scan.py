"""All-Scan (ZeCO, Chou et al. 2025, arXiv 2507.01004): a pipelined exclusive prefix scan of decayed states.

Rank r holds a state contribution M_r (..., Dk, Dv) and the log of its chunk's total decay D_r (...). The scan
hands rank r the state entering its chunk,

    S_in(0) = I  (the initial state, zeros by default),   S_in(r + 1) = exp(D_r) * S_in(r) + M_r,

without any rank waiting for a whole state: the state is cut into ``num_pieces`` pieces along Dk and rank r
forwards piece j to rank r + 1 as soon as piece j has arrived from rank r - 1 and been combined with its own
M_r, so while rank r + 1 forwards piece j, piece j + 1 is still on its way to it. The last rank's result
reaches rank P - 1 after P - 1 + num_pieces - 1 piece hops instead of (P - 1) whole-state hops.

``reverse=True`` runs the same scan right to left (rank r receives from rank r + 1; the last rank starts from
the initial state): the adjoint of the forward scan, which is what ZeCO's backward runs for dS.

Bytes sent (e: element size of the state, N: elements of one state):

    every rank but the last in the scan direction:   N * e   (one state, as ``num_pieces`` sends)
    the last rank (P - 1, or 0 when reverse):         0

No rank sends the decay: only its owner uses it. ``ScanRelay.start`` gives the rank's (M_r, D_r): the first
rank sends everything at once, every other rank starts a relay thread that receives, combines and forwards each
piece as soon as it has arrived, so a caller (``zeco_linear_attention``) computes while the scan travels down
the chain; ``complete`` joins the relay.
Tags: ``comm.tags.SCAN_NEXT + j`` (forward) and ``SCAN_PREV + j`` (reverse) for piece j; transfers
with the same tag between the same two ranks are matched in order, so consecutive scans (one per layer) never
mix. Every piece is one ``comm.recv`` / ``comm.send``, each an ``exchange`` of one message: the relay waits for
piece j and forwards it before it waits for piece j + 1, so the pieces cannot share one exchange. While a relay
thread runs, its caller must not start other transfers to the same peers with the same tags (the next scan's
relay is created after ``complete``).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.comm import emulation

__all__ = ["ASSUMED_BYTES_PER_S", "DEFAULT_PIECES", "HOST_S_PER_MESSAGE", "LATENCY_BYTES", "MAX_PIECES",
           "ScanRelay", "all_scan", "choose_pieces", "link_latency_bytes", "measure_message_host_s",
           "message_host_s", "piece_sizes", "set_message_host_s"]

DEFAULT_PIECES = 8
LATENCY_BYTES = 64 * 1024
"""The message size whose transfer time equals one link latency (alpha * bandwidth; ~64 KiB for 10 us at
6.4 GB/s), assumed where the link is not known (``link_latency_bytes``)."""
ASSUMED_BYTES_PER_S = 6.4e9
"""The bandwidth assumed with ``LATENCY_BYTES`` (to turn the host cost per message into bytes)."""
HOST_S_PER_MESSAGE = 50e-6
"""Host time one piece costs each hop beyond the link's latency, assumed until set (``set_message_host_s``,
``SEQPAR_SCAN_HOST_US``) or measured (``measure_message_host_s``): the relay thread waking, combining the
piece and posting its send (Python and the transport's call). On a loaded CPU it is ~0.3-1.5 ms."""
MAX_PIECES = comm.tags.SCAN_PIECES  # piece j travels with tag SCAN_NEXT + j (SCAN_PREV + j reversed)
TAG_SCAN_NEXT = comm.tags.SCAN_NEXT
TAG_SCAN_PREV = comm.tags.SCAN_PREV


_host_s: float | None = None  # set_message_host_s; None: the environment or HOST_S_PER_MESSAGE


def set_message_host_s(seconds: float | None) -> None:
    """Set the host time per piece and hop that the piece rule charges on this process (None: back to
    ``SEQPAR_SCAN_HOST_US`` or ``HOST_S_PER_MESSAGE``); set it alike on every rank (each chooses K itself).

    Raises:
        ValueError: ``seconds`` negative or not finite.
    """
    global _host_s
    if seconds is not None and not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds: expected None or a finite number >= 0, got {seconds!r}")
    _host_s = None if seconds is None else float(seconds)


def message_host_s() -> float:
    """The host time per piece and hop the piece rule charges: ``set_message_host_s``'s, else
    ``SEQPAR_SCAN_HOST_US`` (microseconds), else ``HOST_S_PER_MESSAGE``."""
    if _host_s is not None:
        return _host_s
    spec = os.environ.get("SEQPAR_SCAN_HOST_US", "").strip()
    if not spec:
        return HOST_S_PER_MESSAGE
    try:
        value = float(spec)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"SEQPAR_SCAN_HOST_US: expected microseconds >= 0, e.g. '50', got {spec!r}")
    return value * 1e-6


def link_latency_bytes() -> float:
    """alpha / beta of the link the scan runs on, in bytes, where alpha is what one piece costs per hop beyond
    its bytes: the link's latency plus the host time per message (``message_host_s``). The emulated link's
    latency and bandwidth when link emulation is on (``comm.emulation.link_emulation()``), else
    ``LATENCY_BYTES`` and ``ASSUMED_BYTES_PER_S``."""
    link = emulation.link_emulation()
    if link is None:
        return LATENCY_BYTES + message_host_s() * ASSUMED_BYTES_PER_S
    return (link.latency_s + message_host_s()) * link.gbps * 1e9 / 8


def measure_message_host_s(*, group: dist.ProcessGroup | None = None, pieces: int = 16, repeats: int = 5,
                           while_computing: bool = True) -> float:
    """Measure the host time per piece and hop on this group: a scan of a tiny state (its bytes cost nothing)
    in ``pieces`` pieces and in one, median over ``repeats``, from the first rank's start to the last relay's
    last forward; the ``pieces`` - 1 extra pieces cost (pieces - 1) host times on the critical path.
    ``while_computing``: every rank computes (small matmuls, as the intra-chunk work) while the relay runs, as
    in ZeCO, where the relay thread competes with the compute for the CPU and the GIL: on a loaded machine a
    wake-up then costs far more than on idle ranks. Collective (every rank of the group calls it). With link
    emulation on it runs on an emulated link of no latency and unbounded bandwidth (the headers emulation
    sends are part of the host cost the emulated runs pay), and restores the link after.

    Returns:
        seconds >= 0 (with ``while_computing`` the larger of the idle and the busy figure), the same on every
        rank; pass it to ``set_message_host_s`` (and to ``strategies.Link``'s
        ``host_s`` for the cost model) on every rank.

    Raises:
        ValueError: ``pieces`` not in [2, MAX_PIECES] or ``repeats`` < 1.
    """
    if not 2 <= pieces <= MAX_PIECES or repeats < 1:
        raise ValueError(f"pieces: expected 2..{MAX_PIECES} and repeats >= 1, got pieces={pieces}, repeats={repeats}")
    group, _, size = comm.group_info(group)
    if size == 1:
        return 0.0
    link = emulation.link_emulation()
    device = comm.required_device(group)
    state = torch.zeros(1, pieces, 4, device=device)

    def scan_time(num_pieces: int, busy_s: float) -> float:
        dist.barrier(group=group)
        start = time.perf_counter()
        relay = ScanRelay(state.shape, state.dtype, device, group=group, num_pieces=num_pieces)
        relay.start(state, None)
        x = torch.full((128, 128), 0.01, device=device)
        while time.perf_counter() - start < busy_s:
            x = torch.tanh(x @ x)
        relay.complete()
        relay.finish()
        done = relay.done_at if relay.done_at is not None else time.perf_counter()
        stamps = torch.tensor([-start, done], dtype=torch.float64, device=device)
        dist.all_reduce(stamps, op=dist.ReduceOp.MAX, group=group)  # the first start, the last relay's end
        return float(stamps.sum().item())

    def per_piece(busy_s: float) -> tuple[float, float]:
        medians = [statistics.median([scan_time(k, busy_s) for _ in range(repeats + 1)][1:]) for k in (1, pieces)]
        return max(0.0, (medians[1] - medians[0]) / (pieces - 1)), medians[1]

    if link is not None:
        emulation.set_link_emulation(emulation.LinkEmulation(gbps=1e9, latency_s=0.0))
    try:
        host_s, idle_s = per_piece(0.0)
        if while_computing:  # compute for longer than the idle relay took, so it runs under load throughout;
            host_s = max(host_s, per_piece(3 * idle_s + 0.02)[0])  # at least what idle ranks pay (noise)
    finally:
        emulation.set_link_emulation(link)
    return host_s


def choose_pieces(world_size: int, state_bytes: float, dk: int, *, latency_bytes: float = LATENCY_BYTES) -> int:
    """The piece count for a scan over ``world_size`` ranks of a state of ``state_bytes``, cut along ``dk``, on
    links where what a piece costs per hop beyond its bytes (latency + host time per message) equals the
    transfer time of ``latency_bytes`` (alpha / beta; ``link_latency_bytes``).

    The last rank has its state after (P - 1) + (K - 1) piece hops of alpha + beta * N / K each (alpha the
    latency plus the host time per message, beta the time per byte): T(K) = (P + K - 2) (alpha + beta N / K)
    = beta N + (P - 2) alpha + (P - 2) beta N / K + K alpha, smallest at K* = sqrt((P - 2) N beta / alpha)
    = sqrt((P - 2) N / latency_bytes), where T = beta N + (P - 2) alpha + 2 sqrt((P - 2) alpha beta N):
    about one whole-state transfer plus small-piece hops, instead of P - 1 whole-state hops with K = 1.
    Rounded and clamped to [1, min(dk, MAX_PIECES)] (a latency-free link gives the most pieces); P <= 2 gives
    1 (nothing to pipeline through). Where the host time per message dominates alpha, fewer, larger pieces.
    """
    if world_size <= 2:
        return 1
    if latency_bytes <= 0:
        return max(1, min(dk, MAX_PIECES))
    best = round(((world_size - 2) * state_bytes / latency_bytes) ** 0.5)
    return max(1, min(best, dk, MAX_PIECES))


def piece_sizes(dk: int, num_pieces: int | None) -> list[int]:
    """Sizes along Dk of the ``num_pieces`` pieces (default ``min(DEFAULT_PIECES, dk)``), as equal as possible.

    Raises:
        ValueError: ``num_pieces`` not an int in [1, min(dk, MAX_PIECES)].
    """
    if num_pieces is None:
        num_pieces = min(DEFAULT_PIECES, dk)
    if isinstance(num_pieces, bool) or not isinstance(num_pieces, int) or not 1 <= num_pieces <= min(dk, MAX_PIECES):
        raise ValueError(
            f"num_pieces: must be an int in [1, {min(dk, MAX_PIECES)}] (the state is cut along Dk = {dk}), "
            f"got {num_pieces!r}"
        )
    base, extra = divmod(dk, num_pieces)
    return [base + (1 if j < extra else 0) for j in range(num_pieces)]


class ScanRelay:
    """This rank's part of one pipelined scan, in two steps so that compute can run between them.

    ``start`` gives the rank's (M_r, D_r): the first rank in the scan direction forwards all its pieces at once;
    every other rank starts a relay thread that posts the receives of every piece from the previous rank and
    combines and forwards each piece the moment it has arrived, while the caller's thread computes (as a
    communication engine would: the relay's hops do not wait for the caller's compute to reach a checkpoint,
    so a chain of relays costs what its links cost). ``complete`` joins the thread (bounded by the comm
    timeout) and returns what was received; ``finish`` waits for the sends. Every rank of the group must
    create its relay for the same shapes and direction and call ``start`` and ``complete``: receives left
    posted by a rank that gave up would match the next scan's pieces.
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        *,
        group: dist.ProcessGroup | None = None,
        num_pieces: int | None = None,
        reverse: bool = False,
    ) -> None:
        self.group, rank, size = comm.group_info(group)
        self.shape = torch.Size(shape)
        self.dtype, self.device = dtype, device
        self.sizes = piece_sizes(self.shape[-2], num_pieces)
        step = -1 if reverse else 1
        self.src = rank - step if 0 <= rank - step < size else None
        self.dst = rank + step if 0 <= rank + step < size else None
        self.tag = TAG_SCAN_PREV if reverse else TAG_SCAN_NEXT
        self.direction = "prev" if reverse else "next"
        self._sends: list[comm.PendingTransfer] = []
        self._sent: list[torch.Tensor] = []  # keeps the send buffers alive until finish()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.done_at: float | None = None  # time.perf_counter() when the relay thread forwarded its last piece

    @property
    def is_first(self) -> bool:
        """True on the rank where the scan starts (rank 0, or the last rank when reverse)."""
        return self.src is None

    def relay(
        self,
        local_state: torch.Tensor,
        local_log_decay: torch.Tensor | None,
        *,
        initial_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receive, combine and forward every piece; return ``(incoming, outgoing)``: ``start`` then ``complete``.

        ``incoming`` is the state entering this rank (``initial_state`` or zeros on the first rank), ``outgoing``
        = exp(local_log_decay) * incoming + local_state, what this rank passes on (computed on the last rank
        too, where it is the scan's total). Piece j is forwarded before piece j + 1 is waited for.
        """
        self.start(local_state, local_log_decay, initial_state=initial_state)
        return self.complete()

    def start(
        self,
        local_state: torch.Tensor,
        local_log_decay: torch.Tensor | None,
        *,
        initial_state: torch.Tensor | None = None,
    ) -> None:
        """Give this rank's (M, D); the first rank forwards all its pieces now, the others start relaying (on a
        thread) as the pieces arrive. ``local_log_decay`` is shaped like the state without its last two dims
        (one factor per state) or without its last one (GLA: one factor per key row)."""
        self._mine = local_state.detach()
        self._initial = initial_state
        self._factor = None
        if local_log_decay is not None:
            factor = torch.exp(local_log_decay.detach().to(self.dtype))
            per_row = local_log_decay.dim() == len(self.shape) - 1
            self._factor = factor[..., None] if per_row else factor[..., None, None]
        self._ins, self._outs = [], []
        if self.is_first:
            for j in range(len(self.sizes)):
                self._forward_piece(j, self._first_piece(j))
            return
        self._thread = threading.Thread(target=self._relay_arrivals, name="seqpar-scan-relay", daemon=True)
        self._thread.start()

    def _relay_arrivals(self) -> None:
        """The relay thread: post every piece's receive, then forward each as it arrives, in order. It blocks in
        ``wait`` (which releases the GIL: the caller's compute runs meanwhile) rather than polling: a gloo
        point-to-point work reports completion only once waited for, so ``PendingTransfer.arrived`` stays False
        until then and a relay that polls it between pieces of compute forwards nothing before its last wait."""
        try:
            with torch.no_grad():
                recvs = []
                for j, n in enumerate(self.sizes):
                    buf = torch.empty(*self.shape[:-2], n, self.shape[-1], dtype=self.dtype, device=self.device)
                    recvs.append(comm.recv(buf, self.src, group=self.group, tag=self.tag + j))
                for j, pending in enumerate(recvs):
                    self._forward_piece(j, pending.wait())
            self.done_at = time.perf_counter()
        except BaseException as err:  # re-raised by complete() on the caller's thread
            self._error = err

    def _forward_piece(self, j: int, incoming: torch.Tensor) -> None:
        start = sum(self.sizes[:j])
        sl = slice(start, start + self.sizes[j])
        mine = self._mine[..., sl, :].to(self.dtype)
        factor = self._factor
        if factor is not None and factor.shape[-2] != 1:
            factor = factor[..., sl, :]
        outgoing = (mine + incoming if factor is None else mine + factor * incoming).contiguous()
        if self.dst is not None:
            self._sent.append(outgoing)
            self._sends.append(
                comm.send(outgoing, self.dst, group=self.group, tag=self.tag + j, direction=self.direction)
            )
        self._ins.append(incoming)
        self._outs.append(outgoing)

    def _first_piece(self, j: int) -> torch.Tensor:
        n = self.sizes[j]
        if self._initial is not None:
            start = sum(self.sizes[:j])
            return self._initial[..., start:start + n, :].to(self.dtype)
        return torch.zeros(*self.shape[:-2], n, self.shape[-1], dtype=self.dtype, device=self.device)

    def progress(self) -> None:
        """Kept for callers that poll between pieces of compute: the relay thread forwards pieces as they arrive,
        so there is nothing to do here."""

    def complete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the relay thread (bounded by the comm timeout, plus a margin for its own waits); ``(incoming,
        outgoing)`` as ``relay``.

        Raises:
            RuntimeError: a piece did not arrive in time or a transfer failed (the relay thread's error).
        """
        if self._thread is not None:
            timeout = comm.default_timeout().total_seconds() + 30.0
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"seqpar: All-Scan relay from rank {self.src} did not finish in {timeout:g} s")
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return torch.cat(self._ins, -2), torch.cat(self._outs, -2)

    def finish(self) -> None:
        """Wait until every forwarded piece has left (bounded by the comm timeout)."""
        for pending in self._sends:
            pending.wait()
        self._sends.clear()
        self._sent.clear()


def _validate(local_state, local_log_decay, initial_state, num_pieces) -> None:
    if not isinstance(local_state, torch.Tensor) or local_state.dim() < 2 or not local_state.dtype.is_floating_point:
        raise ValueError("local_state: expected a floating-point tensor (..., Dk, Dv), e.g. (B, H, Dk, Dv)")
    piece_sizes(local_state.shape[-2], num_pieces)
    if local_log_decay is not None:
        shapes = (tuple(local_state.shape[:-2]), tuple(local_state.shape[:-1]))
        if not isinstance(local_log_decay, torch.Tensor) or tuple(local_log_decay.shape) not in shapes:
            raise ValueError(
                f"local_log_decay: expected None, shape {shapes[0]} (local_state without its last two dims) or "
                f"{shapes[1]} (one decay per key row, GLA), got {getattr(local_log_decay, 'shape', local_log_decay)}"
            )
        g = local_log_decay.detach()
        if not bool(torch.isfinite(g).all()) or bool((g > 0).any()):
            raise ValueError("local_log_decay: must be finite and <= 0 (the log of the chunk's total decay factor)")
    if initial_state is not None and (
        not isinstance(initial_state, torch.Tensor) or initial_state.shape != local_state.shape
    ):
        raise ValueError(
            f"initial_state: expected None or shape {tuple(local_state.shape)} like local_state, "
            f"got {getattr(initial_state, 'shape', initial_state)}"
        )


class _AllScan(torch.autograd.Function):
    """Forward: the scan. Backward: the scan in the other direction over the output gradients (its adjoint)."""

    @staticmethod
    def forward(ctx, local_state, local_log_decay, initial_state, group, num_pieces, reverse):
        dtype = local_state.dtype
        relay = ScanRelay(local_state.shape, dtype, local_state.device, group=group, num_pieces=num_pieces,
                          reverse=reverse)
        incoming, _ = relay.relay(local_state, local_log_decay, initial_state=initial_state)
        relay.finish()
        ctx.group, ctx.num_pieces, ctx.reverse, ctx.is_first = group, num_pieces, reverse, relay.is_first
        ctx.has_initial = initial_state is not None
        ctx.save_for_backward(local_log_decay, incoming)
        return incoming

    @staticmethod
    def backward(ctx, grad_incoming):
        # y_r = incoming on rank r, y_{r+1} = exp(D_r) y_r + M_r. The adjoint a_r of y_r is
        # a_r = dy_r + exp(D_r) a_{r+1}: the same scan run the other way over dy, where rank r receives
        # a_{r+1} = dM_r and its "outgoing" is a_r (the initial state's gradient on the first rank).
        log_decay, incoming = ctx.saved_tensors
        relay = ScanRelay(incoming.shape, incoming.dtype, incoming.device, group=ctx.group,
                          num_pieces=ctx.num_pieces, reverse=not ctx.reverse)
        d_state, d_incoming = relay.relay(grad_incoming.contiguous(), log_decay)
        relay.finish()
        d_decay = None
        if log_decay is not None:
            per_row = log_decay.dim() == incoming.dim() - 1
            factor = torch.exp(log_decay.to(incoming.dtype))
            factor = factor[..., None] if per_row else factor[..., None, None]
            d_decay = (d_state * factor * incoming).sum(-1 if per_row else (-2, -1))
            d_decay = d_decay.to(log_decay.dtype)
        d_initial = None
        if ctx.has_initial:  # whole-held input: the first rank's partial is all of it, the others' zero
            d_initial = d_incoming if ctx.is_first else torch.zeros_like(d_incoming)
        return d_state, d_decay, d_initial, None, None, None


def all_scan(
    local_state: torch.Tensor,
    local_log_decay: torch.Tensor | None,
    *,
    group: dist.ProcessGroup | None = None,
    num_pieces: int | None = None,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """The state entering this rank's chunk: S_in(r) = exp(D_{r-1}) * S_in(r-1) + M_{r-1}. Differentiable.

    Args:
        local_state: M_r, (..., Dk, Dv), e.g. (B, H, Dk, Dv); every rank the same shape and dtype.
        local_log_decay: D_r <= 0, shaped like ``local_state`` without its last two dims (e.g. (B, H)), or
            without its last dim (one decay per key row, GLA: (B, H, Dk)), or None for no decay.
        num_pieces: pieces along Dk the state travels in (default ``min(8, Dk)``).
        initial_state: S_in(0), shaped like ``local_state``; read on the first rank only. Whole-held: its
            gradient on the first rank is the full gradient, zeros elsewhere (sum over ranks = full gradient).
        reverse: scan right to left (rank P - 1 starts; rank r receives from r + 1).

    Returns:
        S_in(r) in ``local_state``'s dtype; ``initial_state`` (or zeros) on the first rank.

    Bytes sent: ``N * e`` (one state, in ``num_pieces`` sends) on every rank but the last in the scan
    direction, 0 there; the backward sends the same in the other direction.

    Raises:
        ValueError: ``local_state`` not floating or under 2 dims, a decay of the wrong shape, non-finite or
            positive, an ``initial_state`` of another shape, a bad ``num_pieces``, or a group this rank is not
            in; all before any communication.
    """
    _validate(local_state, local_log_decay, initial_state, num_pieces)
    group, _, _ = comm.group_info(group)
    return _AllScan.apply(local_state, local_log_decay, initial_state, group, num_pieces, bool(reverse))
