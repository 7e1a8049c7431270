"""The strategy registry: every SP algorithm seqpar can run, described once.

Pure Python (numpy only): the solver imports it without torch.distributed. Each ``Strategy`` says what the
algorithm is (name, attention kind, the op that runs it, where it is valid) and what it costs (the bytes each
rank sends per layer forward and backward, its time given the layer's compute and the link, the transient
memory it holds while a layer runs). The cost model, the planner, the runtime, ``parallelize``, ``seqpar-train``
and the benchmarks all read this table; adding an algorithm means adding its op file, its entry here and its
tests.

Formulas take a ``LayerShape`` whose ``seq_len`` may be a numpy array (many sequences at once) and return
numbers or arrays of the same shape.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

__all__ = [
    "COMM_BYTES_OVER_RANKS",
    "KINDS",
    "OP_KEYWORDS",
    "LayerShape",
    "Link",
    "Strategy",
    "get",
    "names",
    "planner_defaults",
    "register",
    "unregister",
]

KINDS = ("softmax", "linear")
# the keyword arguments the runtime passes to an op of each kind, after the local (q, k, v) shards
OP_KEYWORDS = {
    "softmax": ("group", "causal", "softmax_scale", "layout", "cu_seqlens", "backend", "max_seqlen", "window",
                "softcap", "sinks"),
    "linear": ("log_decay", "group", "scale", "layout", "backend"),
}
COMM_BYTES_OVER_RANKS = ("each", "mean", "max")

ACCUM_BYTES = 4  # float32 accumulators and states (dK/dV in ring, partial outputs, linear-attention states)
LSE_BYTES = 4  # float32 log-sum-exp per (token, head)
ZIGZAG_CAUSAL_QUERY_FRACTION = 0.75  # TokenRing, causal zigzag: a quarter of the query blocks is skipped
LINEAR_CHUNK = 64  # chunk length of the chunkwise linear-attention kernels (seqpar.kernels.linear's default)


@dataclass(frozen=True)
class LayerShape:
    """One attention layer of one sequence on one rank of an SP group, as the formulas see it.

    Attributes:
        seq_len: S, the sequence's tokens (a float or a numpy array of them).
        degree: P, the SP group's size.
        heads, kv_heads, head_dim: H, H_kv, D (linear attention: D_k = D_v = D).
        elem_bytes: b, the element size of q/k/v and of what travels in the model dtype.
        state_bytes: one linear-attention state as the collectives send it (H * D_k * D_v * 4).
        window: a causal sliding window of W tokens (the ops' ``window=(W - 1, 0)``; transformers'
            ``sliding_window``), or None. Ring, TokenRing and USP then count only the transfers the window needs
            (``window_pair_counts``); Ulysses and all-gather-KV send the same bytes with or without one.
        shortest_seq_len: a packed call's shortest sequence (None: ``seq_len``). With a window it decides which
            shards meet (a shorter sequence has shorter chunks, which a window spans more of), while the
            messages carry the whole packed shard of ``seq_len / P`` tokens.
        value_head_dim: D_v of a delta-rule layer (``head_dim`` is its D_k, ``heads`` its value heads,
            ``state_bytes`` H D_k D_v 4); None: D_v = D_k.
    """

    seq_len: Any
    degree: int
    heads: int
    kv_heads: int
    head_dim: int
    elem_bytes: float
    state_bytes: float = 0.0
    window: int | None = None
    value_head_dim: int | None = None
    shortest_seq_len: Any = None

    @property
    def local_tokens(self) -> Any:
        """s = S / P."""
        return self.seq_len / self.degree


@dataclass(frozen=True)
class Link:
    """What one transfer costs: ``bytes_per_s`` per direction and ``latency_s`` per message or collective step;
    ``host_s``: host time per message beyond the link (posting it, a relay waking to forward it; charged by
    the linear ops' terms, ``seqpar.collectives.scan.measure_message_host_s`` measures it)."""

    bytes_per_s: float
    latency_s: float
    host_s: float = 0.0


def _always_valid(degree: int, heads: int, kv_heads: int) -> str | None:
    return None


@dataclass(frozen=True)
class Strategy:
    """One SP algorithm.

    Attributes:
        name: what users and plans call it (``"ring"``).
        kind: ``"softmax"`` or ``"linear"``: which attention layers it serves.
        op: ``"module:function"`` of the SP op; the function takes the local ``q, k, v`` shards and the keyword
            arguments of its kind (``OP_KEYWORDS``); any other parameter has a default.
        summary: one line for docs and ``--help``.
        comm_bytes: ``(shape) -> (forward, backward)`` bytes one rank sends for one causal layer (batch 1);
            what ``seqpar.count_comm`` records for the op, in the sense of ``comm_bytes_over_ranks``. Zero at
            degree 1, where the layer's time must be its compute alone (the planner keeps one strategy there).
        layer_time: ``(shape, compute_fwd_s, compute_bwd_s, link) -> seconds`` of one layer forward + backward on
            one rank, where ``compute_*`` is the layer's attention compute on this rank (already divided by P).
        transient_bytes: ``(shape) -> bytes`` the op holds on one rank while a layer runs, beyond activations
            (the cost model counts none at degree 1).
        layouts: token layouts it accepts.
        min_degree: the smallest group size it is meant for (1: it also runs alone).
        invalid_reason: ``(degree, heads, kv_heads) -> str | None``: why it cannot run at this degree with
            these head counts (None: it can).
        planner_default: whether ``plan_step`` considers it when not told which strategies to use.
        delta_rule_op: linear strategies only: ``"module:function"`` of the same algorithm for delta-rule layers
            (Gated DeltaNet, KDA: ``seqpar.runtime.delta_rule_attention``), or None when it has none. Delta-rule
            layers are linear-kind layers: a plan's linear strategy runs them by this op.
        delta_rule_comm_bytes: ``(shape) -> (forward, backward)`` bytes of ``delta_rule_op`` (as ``comm_bytes``;
            D_k = D_v = D).
        delta_rule_layer_time: ``layer_time`` of ``delta_rule_op`` (the compute it is given is the delta-rule
            local pass's, ``CostModel``'s delta-rule term); set with ``delta_rule_op``.
        delta_rule_transient_bytes: ``transient_bytes`` of ``delta_rule_op``; set with ``delta_rule_op``.
        comm_bytes_over_ranks: how ``comm_bytes`` relates to the bytes the group's ranks send for a causal layer
            in its first layout (zigzag for softmax, contiguous for linear): ``"each"`` every rank sends exactly
            that, ``"mean"`` their mean, ``"max"`` the busiest rank's (tests/test_registry.py checks it).
    """

    name: str
    kind: str
    op: str
    summary: str
    comm_bytes: Callable[[LayerShape], tuple[Any, Any]]
    layer_time: Callable[[LayerShape, Any, Any, Link], Any]
    transient_bytes: Callable[[LayerShape], Any]
    layouts: tuple[str, ...] = ("zigzag", "contiguous")
    min_degree: int = 1
    invalid_reason: Callable[[int, int, int], str | None] = _always_valid
    planner_default: bool = True
    comm_bytes_over_ranks: str = "each"
    delta_rule_op: str | None = None
    delta_rule_comm_bytes: Callable[[LayerShape], tuple[Any, Any]] | None = None
    delta_rule_layer_time: Callable[[LayerShape, Any, Any, Link], Any] | None = None
    delta_rule_transient_bytes: Callable[[LayerShape], Any] | None = None

    def __post_init__(self) -> None:
        if not self.name or "+" in self.name:
            raise ValueError(f"name: must be non-empty and without '+' (it joins a hybrid's pair), got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {self.kind!r}")
        if ":" not in self.op:
            raise ValueError(f"op: expected 'module:function', got {self.op!r}")
        if self.comm_bytes_over_ranks not in COMM_BYTES_OVER_RANKS:
            raise ValueError(
                f"comm_bytes_over_ranks: must be one of {COMM_BYTES_OVER_RANKS}, got {self.comm_bytes_over_ranks!r}"
            )

    def valid(self, degree: int, heads: int, kv_heads: int) -> bool:
        return self.why_invalid(degree, heads, kv_heads) is None

    def why_invalid(self, degree: int, heads: int, kv_heads: int) -> str | None:
        """Why it cannot run on ``degree`` ranks with these head counts, or None when it can."""
        if degree < self.min_degree:
            return f"{self.name} needs at least {self.min_degree} ranks"
        return self.invalid_reason(degree, heads, kv_heads)

    def load_op(self) -> Callable[..., Any]:
        """Import and return the SP op (this imports torch.distributed)."""
        module, attr = self.op.split(":")
        return getattr(importlib.import_module(module), attr)

    def load_delta_rule_op(self) -> Callable[..., Any]:
        """Import and return ``delta_rule_op``.

        Raises:
            ValueError: naming ``linear_strategy`` when this strategy has no delta-rule variant.
        """
        if self.delta_rule_op is None:
            having = [n for n, s in _REGISTRY.items() if s.delta_rule_op is not None]
            raise ValueError(f"linear_strategy: {self.name!r} has no delta-rule variant (Gated DeltaNet, KDA "
                             f"layers); use one of {having}")
        module, attr = self.delta_rule_op.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy (a name may be registered once)."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"name: strategy {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def unregister(name: str) -> Strategy:
    """Remove and return a registered strategy (for tests that register a stand-in).

    Raises:
        ValueError: naming ``name`` when no such strategy is registered.
    """
    strategy = get(name, argument="name")
    del _REGISTRY[name]
    return strategy


def names(kind: str | None = None) -> tuple[str, ...]:
    """Registered strategy names, in registration order, of one ``kind`` or all."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS} or None, got {kind!r}")
    return tuple(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def planner_defaults(kind: str) -> tuple[str, ...]:
    """The strategies of ``kind`` that ``plan_step`` considers unless told otherwise (``planner_default``)."""
    return tuple(n for n in names(kind) if _REGISTRY[n].planner_default)


def get(name: str, kind: str | None = None, *, argument: str = "strategy") -> Strategy:
    """The strategy called ``name`` (of ``kind`` when given).

    Raises:
        ValueError: naming ``argument``, when no such strategy (of that kind) is registered.
    """
    strategy = _REGISTRY.get(name) if isinstance(name, str) else None
    if strategy is None or (kind is not None and strategy.kind != kind):
        of_kind = f"{kind} " if kind else ""
        raise ValueError(f"{argument}: unknown {of_kind}strategy {name!r}; choose one of {names(kind)}")
    return strategy


# ----------------------------------------------------------------------------------------------------
# Softmax attention
# ----------------------------------------------------------------------------------------------------

# Conventions of the formulas below (one layer, one rank of a group of P, for the sequence's S tokens):
# s = S / P local tokens, b = elem_bytes, H / H_kv / D the heads, K/V heads and head size; A_f, A_b the
# layer's attention compute on this rank forward / backward (already divided by P), beta = link.bytes_per_s,
# lam = link.latency_s. Bytes are what ``seqpar.count_comm`` records: what one rank puts on the wire.
# Registration order is the planner's order of preference among equally fast strategies.


def _ring_step_bytes(x: LayerShape) -> tuple[Any, Any]:
    """One ring step: K,V forward; K,V again and the float32 dK,dV accumulators backward."""
    kv_elements = 2 * x.local_tokens * x.kv_heads * x.head_dim
    return kv_elements * x.elem_bytes, kv_elements * (x.elem_bytes + ACCUM_BYTES)


def shard_position_ranges(local_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """The position ranges [a, b) that ``rank``'s shard holds of a sequence of ``local_len`` tokens per rank
    (``contiguous``: one range; ``zigzag``: chunks rank and 2P-1-rank)."""
    if layout == "contiguous":
        return [(rank * local_len, (rank + 1) * local_len)]
    c, last = local_len // 2, 2 * world_size - 1 - rank
    return [(rank * c, (rank + 1) * c), (last * c, (last + 1) * c)]


def position_ranges_meet(
    q_range: tuple[int, int], k_range: tuple[int, int], causal: bool, window: tuple[int, int]
) -> bool:
    """Whether some query position in ``q_range`` sees some key position in ``k_range`` under ``window`` =
    (left, right) (-1: unbounded) and ``causal``: the distances i - j cover [qa - kb + 1, qb - 1 - ka]; the mask
    keeps [0 if causal, ...] and [-right, left]."""
    (qa, qb), (ka, kb) = q_range, k_range
    if qa >= qb or ka >= kb:
        return False
    low, high = qa - kb + 1, qb - 1 - ka
    left, right = window
    if causal:
        low = max(low, 0)
    if left >= 0:
        high = min(high, left)
    if right >= 0:
        low = max(low, -right)
    return low <= high


def window_shard_pairs(
    local_len: int, world_size: int, window: tuple[int, int], *, causal: bool = True, layout: str = "zigzag"
) -> int:
    """How many ordered pairs (q_rank, kv_rank), q_rank != kv_rank, meet inside ``window``: the K/V messages
    windowed ring attention sends in one pass over all ranks."""
    ranges = [shard_position_ranges(local_len, world_size, r, layout) for r in range(world_size)]
    return sum(
        any(position_ranges_meet(qr, kr, causal, window) for qr in ranges[q] for kr in ranges[j])
        for q in range(world_size) for j in range(world_size) if q != j
    )


@functools.lru_cache(maxsize=4096)
def window_pair_counts(world_size: int, reach: int, layout: str = "zigzag") -> tuple[int, int, int]:
    """``(below, above, offsets)`` for a causal window that reaches ``reach`` chunks back (``window_reach``):
    the ordered rank pairs (q, j), j != q, whose shards meet with j < q and with j > q, and how many offsets
    d = (q - j) mod P occur among them (the steps of a windowed ring / TokenRing: ``softmax_common``'s
    ``window_offsets``). Query chunk a sees key chunk b iff 0 <= a - b <= reach; zigzag rank r holds chunks
    r and 2P-1-r of 2P, contiguous chunk r of P."""
    p = world_size

    def chunks(rank: int) -> tuple[int, ...]:
        return (rank,) if layout == "contiguous" else (rank, 2 * p - 1 - rank)

    below = above = 0
    offsets = set()
    for q in range(p):
        for j in range(p):
            if j != q and any(0 <= a - c <= reach for a in chunks(q) for c in chunks(j)):
                below, above = below + (j < q), above + (j > q)
                offsets.add((q - j) % p)
    return below, above, len(offsets)


def window_reach(seq_len: Any, degree: int, window: int, layout: str = "zigzag") -> Any:
    """How many chunks back a query chunk sees under a causal window of ``window`` tokens (left = W - 1) when
    a sequence of ``seq_len`` tokens is cut in 2P (zigzag) or P (contiguous) chunks of c tokens: the nearest
    query/key pair of chunks k apart is (k - 1) c + 1 apart, so k <= 1 + (W - 2) / c (0 for W = 1). An int
    array shaped like ``seq_len``, at most the chunk count (a window at least the sequence reaches all)."""
    n_chunks = 2 * degree if layout == "zigzag" else degree
    chunk = np.asarray(seq_len, dtype=np.float64) / n_chunks
    left = window - 1
    if left < 1:
        return np.zeros(chunk.shape, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = 1 + np.floor(np.divide(left - 1, chunk, out=np.full(chunk.shape, np.inf), where=chunk > 0))
    return np.minimum(reach, n_chunks).astype(np.int64)


def window_messages(x: LayerShape, degree: int | None = None) -> tuple[Any, Any, Any]:
    """``(below, above, steps)`` of ``window_pair_counts`` for ``x.window`` on a ring of ``degree`` ranks
    (default ``x.degree``) over ``x``'s sequence (zigzag; a packed call's shortest sequence decides), as floats
    or arrays shaped like ``seq_len``."""
    p = x.degree if degree is None else degree
    length = x.seq_len if x.shortest_seq_len is None else x.shortest_seq_len
    reach = window_reach(length, p, x.window)
    distinct, index = np.unique(reach, return_inverse=True)  # few distinct reaches, however many lengths
    table = np.array([window_pair_counts(p, int(k)) for k in distinct], dtype=np.float64)
    counts = table[index.reshape(reach.shape)]
    below, above, steps = counts[..., 0], counts[..., 1], counts[..., 2]
    if np.ndim(length) == 0:
        return float(below), float(above), float(steps)
    return below, above, steps


def ring_messages(x: LayerShape, degree: int | None = None) -> tuple[Any, Any]:
    """``(messages, steps)``: K/V messages one rank sends per pass, the mean over ranks, and the ring's steps
    (overlapped transfers). Without a window both are P - 1; with one the pairs that meet over P and the
    offsets (ring.py's docstring has each rank's share, n_out(r))."""
    p = x.degree if degree is None else degree
    if x.window is None:
        return p - 1, p - 1
    below, above, steps = window_messages(x, p)
    return (below + above) / p, steps


def ring_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """(P-1) ring steps each way: ``(P-1) 2 s H_kv D b`` forward, ``(P-1) 2 s H_kv D (b + 4)`` backward. With
    ``x.window`` (zigzag, causal) K/V go only to the ranks whose queries meet them: (P-1) becomes n / P, n the
    meeting pairs (``window_pair_counts``: the mean over ranks; ring.py's docstring has each rank's share)."""
    forward_step, backward_step = _ring_step_bytes(x)
    messages, _ = ring_messages(x)
    return messages * forward_step, messages * backward_step


def overlapped_ring_time(compute_s: Any, step_bytes: Any, steps: Any, degree: Any, link: Link) -> Any:
    """One pass of a ring whose every step overlaps one of ``degree`` equal blocks of ``compute_s`` with one
    transfer of ``step_bytes``: ``A/P + (P-1) (max(A/P, step_bytes / beta) + lam)``. With a window the blocks
    are the ``steps + 1`` that meet it (``degree = steps + 1``) and ``step_bytes`` the pass's bytes spread over
    its steps."""
    block = compute_s / degree
    return block + steps * (np.maximum(block, step_bytes / link.bytes_per_s) + link.latency_s)


def _spread(total_bytes: Any, steps: Any) -> Any:
    """A pass's bytes per step (0 where a window leaves no step)."""
    total_bytes, steps = np.asarray(total_bytes, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    out = np.divide(total_bytes, steps, out=np.zeros(np.broadcast(total_bytes, steps).shape), where=steps > 0)
    return out if out.ndim else float(out)


def ring_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """Overlapped (``overlapped_ring_time``) forward and backward; with a window over its steps only."""
    forward_step, backward_step = _ring_step_bytes(x)
    messages, steps = ring_messages(x)
    if x.window is not None:  # the pass's messages, spread over its steps
        forward_step, backward_step = (_spread(messages * b, steps) for b in (forward_step, backward_step))
    return (overlapped_ring_time(compute_fwd_s, forward_step, steps, steps + 1, link)
            + overlapped_ring_time(compute_bwd_s, backward_step, steps, steps + 1, link))


def ring_transient_bytes(x: LayerShape) -> Any:
    """Double-buffered K,V blocks and float32 dK,dV in the backward."""
    return 2 * 2 * x.local_tokens * x.kv_heads * x.head_dim * (x.elem_bytes + ACCUM_BYTES)


def _token_ring_steps(x: LayerShape) -> tuple[Any, Any]:
    """``(w, steps)``: the mean fraction of a query shard one step moves per direction, and the steps. Without a
    window P - 1 steps of w = 0.75 (causal zigzag: a quarter of the blocks need only the second half of the
    queries). With one, queries go only to the ranks whose keys they meet: pairs with j < q move the whole shard,
    pairs with j > q its second half (``window_pair_counts``), so ``steps * w = (below + above / 2) / P``."""
    if x.window is None:
        return ZIGZAG_CAUSAL_QUERY_FRACTION, x.degree - 1
    below, above, steps = window_messages(x)
    return _spread((below + above / 2) / x.degree, steps), steps


def _token_ring_step_bytes(x: LayerShape) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """One TokenRing step per direction, ``((queries, partials) forward, (queries, partials) backward)``, as the
    mean over ranks and steps (``_token_ring_steps``' w)."""
    w, _ = _token_ring_steps(x)
    s, H, D, b = x.local_tokens, x.heads, x.head_dim, x.elem_bytes
    forward = (w * s * H * D * b, w * s * H * (D * b + LSE_BYTES))  # q; out + float32 lse
    backward = (w * s * H * (3 * D * b + LSE_BYTES), w * s * H * D * b)  # q, dout, out, lse; dq partials
    return forward, backward


def token_ring_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """Forward ``0.75 (P-1) (s H D b + s H (D b + 4))``, backward ``0.75 (P-1) (s H (3 D b + 4) + s H D b)``
    (the mean over ranks; per direction the forward queries are ``g/2`` times ring's bytes, ``g = H / H_kv``,
    so ring sends less for GQA with ``g > 2``). With ``x.window`` (causal zigzag) ``0.75 (P-1)`` becomes
    ``(below + above / 2) / P`` (``_token_ring_steps``; token_ring.py's docstring has each rank's share)."""
    _, steps = _token_ring_steps(x)
    return tuple(steps * (queries + partials) for queries, partials in _token_ring_step_bytes(x))


def token_ring_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """Overlapped like ring; both link directions are busy at once, so a step takes the busier one."""
    (q_fwd, o_fwd), (q_bwd, o_bwd) = _token_ring_step_bytes(x)
    _, steps = _token_ring_steps(x)
    return (overlapped_ring_time(compute_fwd_s, np.maximum(q_fwd, o_fwd), steps, steps + 1, link)
            + overlapped_ring_time(compute_bwd_s, np.maximum(q_bwd, o_bwd), steps, steps + 1, link))


def token_ring_transient_bytes(x: LayerShape) -> Any:
    """Double-buffered query block and the float32 partial out + lse."""
    return 2 * x.local_tokens * x.heads * (x.head_dim * x.elem_bytes + ACCUM_BYTES * x.head_dim + LSE_BYTES)


def _ulysses_tensor_bytes(x: LayerShape) -> Any:
    """q and out (``s H D b`` each) and k, v with their heads replicated to ``max(H_kv, P)``."""
    s, D, b = x.local_tokens, x.head_dim, x.elem_bytes
    return 2 * s * x.heads * D * b + 2 * s * max(x.kv_heads, x.degree) * D * b


def ulysses_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """Each all-to-all keeps 1/P of its tensor: ``(P-1)/P (2 s H D b + 2 s max(H_kv, P) D b)`` each way. The same
    with a window (the all-to-alls move every token; the window only masks the local head-sharded kernel)."""
    one_pass = (x.degree - 1) / x.degree * _ulysses_tensor_bytes(x)
    return one_pass, one_pass


def ulysses_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """Not overlapped: ``A_f + A_b + 2 (bytes / beta + 4 (P-1) lam)``. The latency counts q, k, v and out as
    four all-to-alls of P-1 steps; the op stacks k and v into one, so this is one all-to-all's latency more
    than it pays per pass (kept: calibrated coefficients stay comparable)."""
    steps = x.degree - 1
    one_pass = steps / x.degree * _ulysses_tensor_bytes(x) / link.bytes_per_s + 4 * steps * link.latency_s
    return compute_fwd_s + compute_bwd_s + 2 * one_pass


def ulysses_transient_bytes(x: LayerShape) -> Any:
    """Full-length, head-sharded q, k, v, out and their gradients."""
    return 2 * _ulysses_tensor_bytes(x)


def ulysses_invalid_reason(degree: int, heads: int, kv_heads: int) -> str | None:
    if heads % degree == 0 and (kv_heads % degree == 0 or degree % kv_heads == 0):
        return None
    return (f"ulysses needs the degree {degree} to divide num_heads={heads}, and num_kv_heads={kv_heads} to divide "
            "it or be divided by it (Ulysses splits the heads across the ranks); use ring or token_ring, or another "
            "degree")


def allgather_kv_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """One all-gather of K,V forward and one reduce-scatter of dK,dV backward: ``(P-1) 2 s H_kv D b`` each. The
    same with a window (every rank gathers every shard; the window only masks the local kernel)."""
    one_pass = (x.degree - 1) * 2 * x.local_tokens * x.kv_heads * x.head_dim * x.elem_bytes
    return one_pass, one_pass


def allgather_kv_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """Not overlapped: ``A_f + A_b + 2 (bytes / beta + (P-1) lam)``."""
    steps = x.degree - 1
    one_pass = allgather_kv_comm_bytes(x)[0] / link.bytes_per_s + steps * link.latency_s
    return compute_fwd_s + compute_bwd_s + 2 * one_pass


def allgather_kv_transient_bytes(x: LayerShape) -> Any:
    """The gathered K,V and the float32 dK,dV before the reduce-scatter (whole sequence)."""
    return 2 * x.seq_len * x.kv_heads * x.head_dim * (x.elem_bytes + ACCUM_BYTES)


register(Strategy(
    name="ulysses",
    kind="softmax",
    op="seqpar.collectives.ulysses:ulysses_attention",
    summary="DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv 2309.14509): all-to-all to head-sharded and back",
    comm_bytes=ulysses_comm_bytes,
    layer_time=ulysses_layer_time,
    transient_bytes=ulysses_transient_bytes,
    invalid_reason=ulysses_invalid_reason,
))
register(Strategy(
    name="ring",
    kind="softmax",
    op="seqpar.collectives.ring:ring_attention",
    summary="Ring Attention (Liu et al. 2023; zigzag after Brandon et al. 2023): K,V blocks rotate, overlapped",
    comm_bytes=ring_comm_bytes,
    layer_time=ring_layer_time,
    transient_bytes=ring_transient_bytes,
))
register(Strategy(
    name="token_ring",
    kind="softmax",
    op="seqpar.collectives.token_ring:token_ring_attention",
    summary="TokenRing (Wang et al. 2024, arXiv 2412.20501): queries one way, partial outputs the other",
    comm_bytes=token_ring_comm_bytes,
    layer_time=token_ring_layer_time,
    transient_bytes=token_ring_transient_bytes,
    comm_bytes_over_ranks="mean",
))
register(Strategy(
    name="allgather_kv",
    kind="softmax",
    op="seqpar.collectives.allgather_kv:allgather_kv_attention",
    summary="All-gather K,V (LASP-2H softmax layers, Sun et al. 2025; Llama-3 CP), not overlapped",
    comm_bytes=allgather_kv_comm_bytes,
    layer_time=allgather_kv_layer_time,
    transient_bytes=allgather_kv_transient_bytes,
    planner_default=False,
))


# ----------------------------------------------------------------------------------------------------
# Linear attention
# ----------------------------------------------------------------------------------------------------

# ``state_bytes`` is one layer's state as the collectives send it: float32 whatever the model dtype
# (``H D_k D_v 4``; a per-token decay adds ``H 4`` per state, neglected). L_f, L_b: the chunkwise compute.


def linear_pass_parts(x: LayerShape, compute_s: Any) -> tuple[Any, Any, Any]:
    """One pass (forward or backward) of chunkwise linear attention cut where the SP ops communicate:
    ``(before, overlapped, after)`` seconds.

    Per token and head the chunkwise form does ``2 D^2`` for the local state (``M_r``; backward: the incoming
    state's gradient from q and dO), ``2 C D`` inside the chunks, and ``2 D^2`` with the incoming state
    (``q S_in``; backward: the gradients through the state) (the cost model's ``2 C D + 4 D^2``). The ops
    compute the first part, start their transfer, do the intra-chunk part while it runs, and need what
    arrived only for the last part.
    """
    d, c = x.head_dim, LINEAR_CHUNK
    total = 2 * c * d + 4 * d * d
    return compute_s * (2 * d * d / total), compute_s * (2 * c * d / total), compute_s * (2 * d * d / total)


def overlapped_linear_pass(x: LayerShape, compute_s: Any, comm_s: Any) -> Any:
    """``before + max(overlapped, comm) + after`` (``linear_pass_parts``): the transfer starts after the local
    state and hides behind the intra-chunk work."""
    before, overlapped, after = linear_pass_parts(x, compute_s)
    return before + np.maximum(overlapped, comm_s) + after


def lasp2_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """One all-gather of the memory state and the slice's total log decay forward (``(P-1) (state + 4 H)``: every
    rank needs every other rank's decay, its slice may differ in length), one of the state's gradient backward
    (``(P-1) state``). For a decayed layer (per head or per token; a GLA gate sends ``4 H D_k`` per rank)."""
    forward = (x.degree - 1) * (x.state_bytes + ACCUM_BYTES * x.heads)
    return forward, (x.degree - 1) * x.state_bytes


def lasp2_gather_time(x: LayerShape, link: Link) -> Any:
    """The all-gather of the states, a ring of ``P - 1`` rounds, posted by one call:
    ``(P-1) (state / beta + lam) + host``."""
    return (x.degree - 1) * (x.state_bytes / link.bytes_per_s + link.latency_s) + link.host_s


def lasp2_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """Each way: the local state, then the all-gather overlapped with the intra-chunk compute, then the
    inter-chunk part with the gathered states (``overlapped_linear_pass``)."""
    if x.degree == 1:
        return compute_fwd_s + compute_bwd_s
    gather = lasp2_gather_time(x, link)
    return overlapped_linear_pass(x, compute_fwd_s, gather) + overlapped_linear_pass(x, compute_bwd_s, gather)


def lasp2_transient_bytes(x: LayerShape) -> Any:
    """The P gathered states."""
    return x.degree * x.state_bytes


def zeco_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """One state each way per rank (the busiest rank's: the last sends none forward, the first none backward)."""
    one_pass = x.state_bytes if x.degree > 1 else 0.0
    return one_pass, one_pass


def zeco_pieces(x: LayerShape, link: Link | None = None) -> int:
    """K, the pieces the All-Scan cuts a state into: the op's rule, ``seqpar.collectives.scan.choose_pieces``,
    from P, the state size and the link's (latency + host time per message) x bandwidth (``scan.LATENCY_BYTES``
    without a link)."""
    from seqpar.collectives import scan  # here: scan needs torch, the formulas only numpy

    latency_bytes = scan.LATENCY_BYTES if link is None else (link.latency_s + link.host_s) * link.bytes_per_s
    return scan.choose_pieces(x.degree, x.state_bytes, x.head_dim, latency_bytes=latency_bytes)


def zeco_scan_time(x: LayerShape, link: Link) -> Any:
    """When the last rank has its incoming state after the scan starts: the state in ``K`` pieces relayed
    rank to rank, each hop forwarding a piece as soon as it arrived, so the last piece reaches rank P-1
    after ``P - 1 + K - 1`` piece hops of ``state/K / beta + lam + host`` each (0 at P = 1)."""
    if x.degree == 1:
        return 0.0 * x.state_bytes
    pieces = zeco_pieces(x, link)
    return (x.degree - 1 + pieces - 1) * (x.state_bytes / pieces / link.bytes_per_s + link.latency_s + link.host_s)


def zeco_final_state_time(x: LayerShape, link: Link) -> Any:
    """Extra time when the final state is asked for (inference, chunked prefill; not charged by
    ``zeco_layer_time``, training does not ask for it): from rank P-1 to all by a binomial tree of
    ``ceil(log2 P)`` whole-state hops."""
    return math.ceil(math.log2(x.degree)) * (x.state_bytes / link.bytes_per_s + link.latency_s)


def zeco_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """Each way (the backward's scan runs from the last rank down): the local state, then the pipelined scan
    (``zeco_scan_time``) overlapped with the intra-chunk compute, then the inter-chunk part
    (``overlapped_linear_pass``); the last rank in the scan's direction bounds the step."""
    if x.degree == 1:
        return compute_fwd_s + compute_bwd_s
    scan = zeco_scan_time(x, link)
    return overlapped_linear_pass(x, compute_fwd_s, scan) + overlapped_linear_pass(x, compute_bwd_s, scan)


def zeco_transient_bytes(x: LayerShape) -> Any:
    """The incoming and the outgoing state."""
    return 2 * x.state_bytes


def delta_rule_dims(x: LayerShape) -> tuple[int, int]:
    """(D_k, D_v) of a delta-rule layer's shape."""
    return x.head_dim, x.head_dim if x.value_head_dim is None else x.value_head_dim


def delta_rule_transition_bytes(x: LayerShape) -> Any:
    """One rank's transition A_r as the ops send it: H D_k D_k 4 (= ``state_bytes`` D_k / D_v)."""
    dk, dv = delta_rule_dims(x)
    return x.state_bytes * dk / dv


def lasp2_delta_rule_comm_bytes(x: LayerShape) -> tuple[Any, Any]:
    """Delta-rule LASP-2: the all-gather carries each rank's transition A_r (H D_k D_k 4) with its state B_r
    (H D_k D_v 4) forward (``(P-1) (A + state)``; no decay travels: it is inside A_r), the state's gradient
    backward (``(P-1) state``)."""
    forward = (x.degree - 1) * (delta_rule_transition_bytes(x) + x.state_bytes)
    return forward, (x.degree - 1) * x.state_bytes


def delta_rule_pass_parts(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any) -> tuple[tuple, tuple]:
    """Both passes of a delta-rule SP layer cut where the ops communicate: ``((before, overlapped, after)
    forward, (before, overlapped, after) backward)`` seconds, in proportion to the FLOPs per token and head
    (the cost model's delta-rule compute; ``C = LINEAR_CHUNK``, V' = D_v + D_k the widened values):

    * forward: the state pass ``C (2 D_k + V') + 4 D_k V'`` (Gram K K^T, the UT transform of beta K and
      beta V', U - W S, K^T U: it gives A_r, B_r), then the transfer overlapped with the output pass
      ``C (D_k + V') + 2 D_k V'`` (Q K^T, (Q K^T) U, q S), then the read-out ``2 D_k D_v`` (o = o0 + w^T S_in);
    * backward (each part 2x): L_r = sum w do^T (the read-out's share) first, the reverse transfer overlapped
      with the output pass's backward, then the state pass's backward (it needs lambda_{r+1}).
    """
    dk, dv = delta_rule_dims(x)
    c, wide = LINEAR_CHUNK, dk + dv
    state_pass, output_pass, read_out = c * (2 * dk + wide) + 4 * dk * wide, c * (dk + wide) + 2 * dk * wide, \
        2 * dk * dv
    total = state_pass + output_pass + read_out
    forward = tuple(compute_fwd_s * (part / total) for part in (state_pass, output_pass, read_out))
    backward = tuple(compute_bwd_s * (part / total) for part in (read_out, output_pass, state_pass))
    return forward, backward


def _overlapped_delta_rule(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, comm_fwd_s: Any,
                           comm_bwd_s: Any) -> Any:
    """``before + max(overlapped, transfer) + after`` each way (``delta_rule_pass_parts``)."""
    forward, backward = delta_rule_pass_parts(x, compute_fwd_s, compute_bwd_s)
    return (forward[0] + np.maximum(forward[1], comm_fwd_s) + forward[2]
            + backward[0] + np.maximum(backward[1], comm_bwd_s) + backward[2])


# The delta-rule ops overlap their transfer with the output pass (``delta_rule_pass_parts``), each way.
# Neglected: the folds of the received maps (LASP-2: r maps of 2 D_k^2 D_v FLOPs per head; ZeCO: one per hop),
# under 1/C of the local pass at D_k = D_v.


def lasp2_delta_rule_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """One all-gather each way overlapped with the output pass: ``(P-1) ((A + state) / beta + lam)`` forward
    (A_r and B_r in one payload), ``(P-1) (state / beta + lam)`` backward."""
    if x.degree == 1:
        return compute_fwd_s + compute_bwd_s
    steps = (x.degree - 1) * link.latency_s
    forward, backward = lasp2_delta_rule_comm_bytes(x)
    return _overlapped_delta_rule(x, compute_fwd_s, compute_bwd_s, forward / link.bytes_per_s + steps,
                                  backward / link.bytes_per_s + steps)


def lasp2_delta_rule_transient_bytes(x: LayerShape) -> Any:
    """The P gathered maps and states."""
    return x.degree * (delta_rule_transition_bytes(x) + x.state_bytes)


def zeco_delta_rule_scan_time(x: LayerShape, link: Link) -> Any:
    """``zeco_scan_time`` of the state cut into pieces along D_v (the op's ``choose_pieces(P, state, D_v)``)."""
    return zeco_scan_time(replace(x, head_dim=delta_rule_dims(x)[1]), link)


def zeco_delta_rule_layer_time(x: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """The pipelined All-Scan each way (one state, K pieces along D_v) overlapped with the output pass."""
    if x.degree == 1:
        return compute_fwd_s + compute_bwd_s
    scan = zeco_delta_rule_scan_time(x, link)
    return _overlapped_delta_rule(x, compute_fwd_s, compute_bwd_s, scan, scan)


def zeco_delta_rule_transient_bytes(x: LayerShape) -> Any:
    """The incoming and the outgoing state, and this rank's map A_r (kept for the scan's hops)."""
    return 2 * x.state_bytes + delta_rule_transition_bytes(x)


register(Strategy(
    name="lasp2",
    kind="linear",
    op="seqpar.collectives.lasp2:lasp2_linear_attention",
    summary="LASP-2 (Sun et al. 2025, arXiv 2502.07563): one all-gather of the states, overlapped",
    comm_bytes=lasp2_comm_bytes,
    layer_time=lasp2_layer_time,
    transient_bytes=lasp2_transient_bytes,
    layouts=("contiguous",),
    delta_rule_op="seqpar.collectives.delta_rule:lasp2_delta_rule",
    delta_rule_comm_bytes=lasp2_delta_rule_comm_bytes,
    delta_rule_layer_time=lasp2_delta_rule_layer_time,
    delta_rule_transient_bytes=lasp2_delta_rule_transient_bytes,
))
register(Strategy(
    name="zeco",
    kind="linear",
    op="seqpar.collectives.zeco:zeco_linear_attention",
    summary="ZeCO All-Scan (Chou et al. 2025, arXiv 2507.01004): one state per rank, pipelined in pieces",
    comm_bytes=zeco_comm_bytes,
    layer_time=zeco_layer_time,
    transient_bytes=zeco_transient_bytes,
    layouts=("contiguous",),
    comm_bytes_over_ranks="max",
    delta_rule_op="seqpar.collectives.delta_rule:zeco_delta_rule",
    delta_rule_comm_bytes=zeco_comm_bytes,  # the same one state each way: A_r never travels
    delta_rule_layer_time=zeco_delta_rule_layer_time,
    delta_rule_transient_bytes=zeco_delta_rule_transient_bytes,
))


# ----------------------------------------------------------------------------------------------------
# 2-D: USP (Ulysses inside consecutive ranks x ring across them)
# ----------------------------------------------------------------------------------------------------

_USP_ALL_TO_ALLS_PER_PASS = 4  # latency charged per inner step and pass, as the cost model charges Ulysses


def usp_ulysses_degree(degree: int, heads: int) -> int:
    """USP's default Ulysses degree u for a group of ``degree`` ranks and ``heads`` query heads: the largest u
    with u < degree (so the ring across inner groups has at least 2 ranks) that divides both the group size and
    the head count; 1 (pure ring) when there is none, and 1 for a group of one."""
    return max((u for u in range(1, degree) if degree % u == 0 and heads % u == 0), default=1)


def _usp_kv_heads(heads: int, kv_heads: int, inner_size: int, inner_rank: int) -> tuple[int, int]:
    """``(n, m)``: the K/V heads inner rank i receives in the all-to-all (those its H/u query heads read) and the
    K/V heads its ring carries (n, or H/u when the query heads do not map onto them regularly)."""
    per_rank, group = heads // inner_size, heads // kv_heads
    kv_of_q = [(inner_rank * per_rank + t) // group for t in range(per_rank)]
    n = len(set(kv_of_q))
    ratio = per_rank // n if per_rank % n == 0 else 0
    regular = ratio and [x - kv_of_q[0] for x in kv_of_q] == [t // ratio for t in range(per_rank)]
    return n, (n if regular else per_rank)


def _usp_rank_bytes(shape: LayerShape, inner_rank: int) -> tuple[Any, Any]:
    P, H, D, b = shape.degree, shape.heads, shape.head_dim, shape.elem_bytes
    u = usp_ulysses_degree(P, H)
    r = P // u
    T = shape.local_tokens
    counts = [_usp_kv_heads(H, shape.kv_heads, u, j) for j in range(u)]
    n, m = counts[inner_rank]
    q_or_out = (u - 1) * T * (H // u) * D * b
    kv_sent = 2 * T * D * b * sum(c[0] for j, c in enumerate(counts) if j != inner_rank)
    ring_kv = ring_messages(shape, r)[0] * 2 * (u * T) * m * D  # r - 1 messages; with a window those it needs
    forward = 2 * q_or_out + kv_sent + ring_kv * b
    backward = 2 * q_or_out + (u - 1) * 2 * T * n * D * b + ring_kv * (b + ACCUM_BYTES)
    return forward, backward


def _usp_comm_bytes(shape: LayerShape) -> tuple[Any, Any]:
    """The busiest rank's bytes: Ulysses on the inner group (P = u) + ring on the outer one (P = r, u*T tokens).
    The formula per rank is in seqpar/collectives/usp.py's docstring; ranks differ only when GQA gives inner
    ranks different numbers of K/V heads, and then this is the rank that sends most forward + backward. With a
    window the Ulysses part is the same and the ring part is ring's with a window on r ranks (``ring_messages``:
    the mean over the outer ranks)."""
    u = usp_ulysses_degree(shape.degree, shape.heads)
    per_rank = [_usp_rank_bytes(shape, i) for i in range(u)]
    # every term grows linearly with the tokens, so the same rank is the busiest at every length
    return max(per_rank, key=lambda fb: float(np.max(fb[0] + fb[1])))


def _usp_layer_time(shape: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """The inner all-to-alls are not overlapped (charged like Ulysses on u ranks); the ring across the r inner
    groups overlaps each K/V transfer with one of its r block kernels (charged like ring on r ranks)."""
    P, H, D, b = shape.degree, shape.heads, shape.head_dim, shape.elem_bytes
    u = usp_ulysses_degree(P, H)
    r = P // u
    T = shape.local_tokens
    counts = [_usp_kv_heads(H, shape.kv_heads, u, i) for i in range(u)]
    n, m = max(c[0] for c in counts), max(c[1] for c in counts)
    beta, lam = link.bytes_per_s, link.latency_s
    one_pass = ((u - 1) / u * 2 * T * H * D * b + (u - 1) * 2 * T * n * D * b) / beta
    inner = 2 * (one_pass + _USP_ALL_TO_ALLS_PER_PASS * (u - 1) * lam)
    fwd_step = 2 * (u * T) * m * D * b
    bwd_step = 2 * (u * T) * m * D * (b + ACCUM_BYTES)
    messages, steps = ring_messages(shape, r)
    if shape.window is not None:  # the ring's messages, spread over its steps (as ring_layer_time)
        fwd_step, bwd_step = _spread(messages * fwd_step, steps), _spread(messages * bwd_step, steps)
    return (inner + overlapped_ring_time(compute_fwd_s, fwd_step, steps, steps + 1, link)
            + overlapped_ring_time(compute_bwd_s, bwd_step, steps, steps + 1, link))


def _usp_transient_bytes(shape: LayerShape) -> Any:
    """Ulysses' head-sharded full-length q, k, v, out and their gradients (on u*T tokens, H/u heads), plus the
    ring's double-buffered K/V and float32 dK/dV on the outer group."""
    P, H, D, b = shape.degree, shape.heads, shape.head_dim, shape.elem_bytes
    u = usp_ulysses_degree(P, H)
    T = shape.local_tokens
    m = max(_usp_kv_heads(H, shape.kv_heads, u, i)[1] for i in range(u))
    head_sharded = 2 * (2 * T * H * D * b + 2 * (u * T) * m * D * b)
    ring = 2 * 2 * (u * T) * m * D * (b + ACCUM_BYTES)
    return head_sharded + ring


def _usp_invalid_reason(degree: int, heads: int, kv_heads: int) -> str | None:
    if usp_ulysses_degree(degree, heads) == 1:
        return (
            f"usp needs a Ulysses degree 1 < u < {degree} dividing both the group size and the {heads} query heads; "
            "there is none, so it would be plain ring: use ring"
        )
    return None


register(
    Strategy(
        name="usp",
        kind="softmax",
        op="seqpar.collectives.usp:usp_attention",
        summary="2-D: Ulysses all-to-all inside consecutive ranks x ring across them (USP)",
        comm_bytes=_usp_comm_bytes,
        layer_time=_usp_layer_time,
        transient_bytes=_usp_transient_bytes,
        min_degree=4,
        invalid_reason=_usp_invalid_reason,
    )
)
