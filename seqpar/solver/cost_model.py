"""Analytic cost model of one training step of one sequence under sequence parallelism (SP).

Everything is per rank, for one sequence of ``S`` tokens (batch 1) split over an SP group of ``P`` ranks,
so each rank holds ``s = S / P`` tokens (the padding a zigzag layout adds is ignored). ``b`` is
``ModelSpec.bytes_per_param`` (2 for bf16), ``H``/``H_kv``/``D`` the query heads, K/V heads and head size,
``h`` the hidden size, ``f`` the FFN size, ``V`` the vocabulary, ``C`` the linear-attention chunk.

Compute (FLOPs over ``peak_tflops * efficiency``)
---------------------------------------------------
* Dense part (projections, SwiGLU MLP, LM head), linear in ``S / P``: forward ``2 * N_matmul`` FLOPs per
  token (Kaplan et al. 2020, "Scaling laws", the 2N rule; ``N_matmul`` counts the weights of every GEMM,
  LM head included), training = 3x forward (backward = 2x forward). Efficiency ``dense_efficiency``.
* Softmax attention, quadratic in ``S``: causal forward ``2 * S^2 * H * D`` per layer (``4 S^2 H D`` for the
  two GEMMs QK^T and PV, halved by the causal mask), backward ``2.5x`` forward (FlashAttention-2, Dao 2023,
  Sec. 3: five GEMMs backward against two forward). Divided by ``P``: every strategy balances causal work
  (zigzag layout for ring/token_ring/allgather_kv, head split for ulysses). Efficiency ``attention_efficiency``.
* Linear attention, linear in ``S``: chunkwise form (GLA, Yang et al. 2024, Sec. 3): per token per head the
  masked intra-chunk product ``C * (D_k + D_v)`` plus ``2 D_k D_v`` for ``q S`` and ``2 D_k D_v`` for the
  state update; backward 2x forward. Efficiency ``attention_efficiency``.

Communication (bytes per layer per rank, exactly what ``seqpar.collectives`` sends; ``layer_comm_bytes``)
-------------------------------------------------------------------------------------------------------
Bandwidth ``beta`` is ``intra_node_gbps`` if the group fits in one node (``P <= gpus_per_node``), else
``inter_node_gbps`` (the slowest hop bounds every ring step / all-to-all), times ``bandwidth_efficiency``.
``lam`` = ``latency_s * latency_scale`` is paid per step of every collective ((P - 1) steps for rings,
all-gathers and the pairwise all-to-all). ``A_f``, ``A_b`` are one layer's attention compute on this rank.

* ring (Liu et al. 2023, Ring Attention; zigzag from Brandon et al. 2023 / Megatron CP). K,V rotate:
  forward ``(P-1) * 2 s H_kv D b``; backward ``(P-1) * 2 s H_kv D b + (P-1) * 2 s H_kv D 4`` (K,V again and
  the float32 dK,dV accumulators). Overlapped step by step:
  ``t = A/P + (P-1) * (max(A/P, step_bytes/beta) + lam)`` for forward and backward.
* token_ring (TokenRing, Wang et al. 2024, arXiv 2412.20501; seqpar.collectives.token_ring). Q blocks go
  one way, partial (out, lse) come back the other way, both link directions busy at once. With zigzag causal
  a quarter of the blocks need only half the queries, in both directions (mean factor 0.75 over ranks).
  Forward: queries ``0.75 (P-1) s H D b``, partials ``0.75 (P-1) s H (D b + 4)`` (out plus float32 lse);
  backward: queries travel with dout, out and lse ``0.75 (P-1) s H (3 D b + 4)``, dQ partials come back
  ``0.75 (P-1) s H D b``. Step time is the busier direction, overlapped like ring. Per direction the
  forward queries are ``g/2`` times ring's bytes for ``g = H / H_kv``, so ring wins for GQA with ``g > 2``.
* ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509). 4 all-to-alls forward (q, k, v, out)
  and 4 backward (dout, dq, dk, dv), each moving ``(P-1)/P`` of the local tensor; K/V heads replicated to
  ``max(H_kv, P)`` (q, out: ``s H D b``; k, v: ``s max(H_kv, P) D b`` each). Not overlapped:
  ``t = A + sum_i ((P-1)/P * X_i / beta + (P-1) lam)``. Only where ``P`` divides ``H`` (and ``H_kv``
  divides or is divided by ``P``).
* allgather_kv (LASP-2H softmax layers, Sun et al. 2025, arXiv 2502.07563; Llama-3 CP). Forward one
  all-gather of K,V: ``(P-1) * 2 s H_kv D b``; backward one reduce-scatter of dK,dV of the same size. Not
  overlapped.
* lasp2 (LASP-2, Sun et al. 2025; seqpar.collectives.lasp2). One all-gather of the memory state, which
  travels in float32 whatever the model dtype (``H D_k D_v 4``; a per-token decay adds ``H 4``, neglected),
  forward and one backward: ``(P-1) * state`` each, overlapped with the intra-chunk compute:
  ``t = max(L, (P-1) * (state/beta + lam))``.
* zeco (ZeCO All-Scan, Chou et al. 2025, arXiv 2507.01004). The state is cut in ``K = ZECO_PIECES`` pieces
  passed rank to rank; each rank sends exactly one state forward and one backward, and the last rank waits
  ``P - 1 + K - 1`` pipeline hops of one piece: ``t = max(L, (P-1+K-1) * (state/K/beta + lam))``.

A sequence's time is the dense time plus, per layer, its strategy's attention time, plus
``sequence_overhead_s``. Sequences given to one group run one after another (each its own SP forward and
backward, gradients accumulated), so ``group_time`` is the sum of ``seq_time`` (an upper bound when the
runtime packs them: packing shares the per-step latency and can hide more communication).

Memory (bytes per rank, ``seq_memory``)
----------------------------------------
``model state + activations + one layer's transient SP buffers``, where model state is
``state_bytes_per_param * N / world_size`` (ZeRO-3 / FSDP full sharding, mixed-precision Adam: 16 bytes per
parameter, Rajbhandari et al. 2020), activations are ``activation_bytes_per_token * s`` (default: no
recomputation, bf16, flash attention so no ``S^2`` term; counted tensor by tensor in
``ModelSpec.token_activation_bytes``, after Korthikanti et al. 2022), and the transient buffers are those
the collective holds while a layer runs (double-buffered receive blocks for ring and token_ring, the
head-sharded full-length tensors for ulysses, the gathered K,V for allgather_kv, the gathered states for
lasp2). Sequences of one group run one after another, so the group's peak is the largest ``seq_memory``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "SOFTMAX_STRATEGIES",
    "LINEAR_STRATEGIES",
    "Cluster",
    "ModelSpec",
    "CostCoefficients",
    "Measurement",
    "CostModel",
]

SOFTMAX_STRATEGIES = ("ulysses", "ring", "token_ring", "allgather_kv")
LINEAR_STRATEGIES = ("lasp2", "zeco")
LAYER_KINDS = ("softmax", "linear")

ATTENTION_BWD_OVER_FWD = 2.5  # FlashAttention-2 backward / forward FLOPs
LINEAR_BWD_OVER_FWD = 2.0
TOKEN_RING_ZIGZAG_QUERY_FRACTION = 0.75  # causal zigzag: a quarter of the query blocks is skipped
ZECO_PIECES = 8
LSE_BYTES = 4  # float32 log-sum-exp per (token, head)
ACCUM_BYTES = 4  # float32 accumulators (dK/dV in ring, partial outputs, linear-attention states)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _require_positive(name: str, value: float, *, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


@dataclass(frozen=True)
class Cluster:
    """The machines: ``world_size`` GPUs, ``gpus_per_node`` per node.

    Args:
        world_size: number of ranks.
        gpus_per_node: ranks per node; groups up to this size use the intra-node links.
        peak_tflops: dense bf16 peak of one GPU, in TFLOP/s.
        mem_bytes: memory of one GPU, in bytes.
        intra_node_gbps: per-GPU, per-direction bandwidth inside a node, in GB/s (1e9 bytes/s).
        inter_node_gbps: per-GPU, per-direction bandwidth between nodes, in GB/s (1e9 bytes/s;
            a 400 Gb/s NIC per GPU is 50).
        latency_s: latency of one message (one step of a collective), in seconds.

    Raises:
        ValueError: a non-positive or non-integer size, or a non-positive rate.
    """

    world_size: int
    gpus_per_node: int
    peak_tflops: float
    mem_bytes: float
    intra_node_gbps: float
    inter_node_gbps: float
    latency_s: float = 10e-6

    def __post_init__(self) -> None:
        _require_positive("world_size", self.world_size, integer=True)
        _require_positive("gpus_per_node", self.gpus_per_node, integer=True)
        for name in ("peak_tflops", "mem_bytes", "intra_node_gbps", "inter_node_gbps", "latency_s"):
            _require_positive(name, getattr(self, name))

    @classmethod
    def dgx_h100(cls, world_size: int, *, mem_bytes: float = 80e9) -> Cluster:
        """H100 SXM nodes of 8: 989 TFLOP/s bf16 dense, NVLink 450 GB/s and one 400 Gb/s NIC per GPU."""
        return cls(world_size, 8, 989.0, mem_bytes, 450.0, 50.0, latency_s=10e-6)

    def link_bytes_per_s(self, degree: int) -> float:
        """Per-direction bandwidth of a group of ``degree`` ranks (intra-node if it fits in one node)."""
        gbps = self.intra_node_gbps if degree <= self.gpus_per_node else self.inter_node_gbps
        return gbps * 1e9

    def check_plannable(self) -> None:
        """Raise ValueError unless the world splits into power-of-two, node-aligned groups.

        That needs ``world_size`` to be a power of two and, once it spans several nodes, ``gpus_per_node``
        too (so ``world_size`` is a power of two times ``gpus_per_node``).
        """
        w, g = self.world_size, self.gpus_per_node
        if not is_power_of_two(w):
            raise ValueError(
                f"cluster.world_size={w} must be a power of two (a power of two times gpus_per_node={g}) so "
                "the world splits into power-of-two SP groups; use a smaller power-of-two world"
            )
        if w > g and not is_power_of_two(g):
            raise ValueError(
                f"cluster.gpus_per_node={g} must be a power of two when world_size={w} spans several nodes, "
                "so power-of-two groups never straddle a node boundary"
            )


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, as the cost model sees it.

    Args:
        num_layers, hidden, num_heads, num_kv_heads, head_dim, ffn_hidden, vocab: the shapes
            (SwiGLU MLP, untied embeddings; linear-attention layers use ``head_dim`` for D_k and D_v).
        layer_kinds: ``"softmax"`` or ``"linear"`` per layer; default all softmax.
        bytes_per_param: element size of parameters, activations and messages (2 for bf16).
        activation_bytes_per_token: activation bytes kept per token for the whole model; default (None)
            is ``token_activation_bytes()``'s no-recompute count. Pass a smaller number for checkpointing.
        state_bytes_per_param: parameter + gradient + optimizer bytes per parameter, sharded over the world.
        linear_chunk: chunk length of chunkwise linear attention.

    Raises:
        ValueError: non-positive sizes, ``num_kv_heads`` not dividing ``num_heads``, ``layer_kinds`` of the
            wrong length or with an unknown kind.
    """

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab: int
    layer_kinds: tuple[str, ...] | None = None
    bytes_per_param: float = 2
    activation_bytes_per_token: float | None = None
    state_bytes_per_param: float = 16.0
    linear_chunk: int = 64

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden", "vocab",
                     "linear_chunk"):
            _require_positive(name, getattr(self, name), integer=True)
        for name in ("bytes_per_param", "state_bytes_per_param"):
            _require_positive(name, getattr(self, name))
        if self.activation_bytes_per_token is not None:
            _require_positive("activation_bytes_per_token", self.activation_bytes_per_token)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (GQA groups)"
            )
        kinds = ("softmax",) * self.num_layers if self.layer_kinds is None else tuple(self.layer_kinds)
        if len(kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(kinds)} entries, must have num_layers={self.num_layers}")
        bad = sorted(set(kinds) - set(LAYER_KINDS))
        if bad:
            raise ValueError(f"layer_kinds contains {bad}; each entry must be one of {LAYER_KINDS}")
        object.__setattr__(self, "layer_kinds", kinds)

    _LLAMA = {
        # name: (layers, hidden, heads, kv_heads, ffn, vocab); head_dim 128 throughout
        "2-7b": (32, 4096, 32, 32, 11008, 32000),
        "2-13b": (40, 5120, 40, 40, 13824, 32000),
        "3-8b": (32, 4096, 32, 8, 14336, 128256),
        "3-70b": (80, 8192, 64, 8, 28672, 128256),
    }

    @classmethod
    def llama(cls, size: str = "2-7b", **overrides) -> ModelSpec:
        """A Llama model: ``size`` is one of ``"2-7b"``, ``"2-13b"``, ``"3-8b"``, ``"3-70b"``.

        ``overrides`` replace fields (e.g. ``activation_bytes_per_token``). Raises ValueError on an
        unknown size.
        """
        if size not in cls._LLAMA:
            raise ValueError(f"size={size!r} is not a known Llama; use one of {sorted(cls._LLAMA)}")
        layers, hidden, heads, kv, ffn, vocab = cls._LLAMA[size]
        return cls(layers, hidden, heads, kv, 128, ffn, vocab, **overrides)

    def with_linear_layers(self, softmax_every: int) -> ModelSpec:
        """A hybrid of this model: every ``softmax_every``-th layer softmax, the others linear attention.

        ``softmax_every=4`` gives 3 linear : 1 softmax (LASP-2H style); a value above ``num_layers`` makes a
        pure linear-attention model. Raises ValueError if ``softmax_every < 1``.
        """
        _require_positive("softmax_every", softmax_every, integer=True)
        kinds = tuple("softmax" if (i + 1) % softmax_every == 0 else "linear" for i in range(self.num_layers))
        return replace(self, layer_kinds=kinds)

    @property
    def num_softmax_layers(self) -> int:
        return self.layer_kinds.count("softmax")

    @property
    def num_linear_layers(self) -> int:
        return self.layer_kinds.count("linear")

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's GEMMs: QKV and output projections, SwiGLU gate/up/down."""
        h, hd, kvd = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * (hd + 2 * kvd) + hd * h + 3 * h * self.ffn_hidden

    @property
    def num_params(self) -> int:
        """All parameters: layers (with two norms each), untied embedding and LM head, final norm."""
        per_layer = self.layer_matmul_params + 2 * self.hidden
        return self.num_layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def token_activation_bytes(self) -> float:
        """Activation bytes per token for the whole model (``activation_bytes_per_token`` if given).

        Default, no recomputation, per layer: the inputs of the two norms (2h), the GEMM inputs of the QKV
        projection and of the MLP (2h), q, k, v and the attention output ((2H + 2H_kv) D), SwiGLU's gate,
        up, silu(gate) and product (4f), all at ``bytes_per_param``; plus the float32 LSE (4H) for softmax
        layers or the float32 chunk states (4 H D^2 / C) for linear layers; plus the logits and their
        float32 log-softmax (V (b + 4)) and the embedding output (h b).
        """
        if self.activation_bytes_per_token is not None:
            return float(self.activation_bytes_per_token)
        b, h, H, D = self.bytes_per_param, self.hidden, self.num_heads, self.head_dim
        common = b * (4 * h + (2 * H + 2 * self.num_kv_heads) * D + 4 * self.ffn_hidden)
        softmax_layer = common + LSE_BYTES * H
        linear_layer = common + ACCUM_BYTES * H * D * D / self.linear_chunk
        return (self.num_softmax_layers * softmax_layer + self.num_linear_layers * linear_layer
                + self.vocab * (b + 4) + h * b)


@dataclass(frozen=True)
class CostCoefficients:
    """The fitted knobs of the cost model (``CostModel.calibrate`` fits them to measurements).

    Args:
        attention_efficiency: fraction of peak the attention kernels reach.
        dense_efficiency: fraction of peak the GEMMs reach.
        bandwidth_efficiency: fraction of the link bandwidth the collectives reach.
        latency_scale: multiplies ``Cluster.latency_s``.
        sequence_overhead_s: fixed time per sequence (launches, bookkeeping).

    Raises:
        ValueError: a non-positive efficiency or scale, or a negative overhead.
    """

    attention_efficiency: float = 0.5
    dense_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    latency_scale: float = 1.0
    sequence_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("attention_efficiency", "dense_efficiency", "bandwidth_efficiency", "latency_scale"):
            _require_positive(name, getattr(self, name))
        if not (math.isfinite(self.sequence_overhead_s) and self.sequence_overhead_s >= 0):
            raise ValueError(f"sequence_overhead_s must be >= 0, got {self.sequence_overhead_s!r}")


@dataclass(frozen=True)
class Measurement:
    """One measured step: a sequence of ``length`` tokens, SP ``degree``, ``strategy``, ``seconds``."""

    length: int
    degree: int
    strategy: str
    seconds: float


@dataclass(frozen=True)
class CostModel:
    """Per-rank time and memory of sequences under each SP strategy and degree (formulas: module docstring).

    Strategy names: for a model with only softmax layers one of ``SOFTMAX_STRATEGIES``, with only linear
    layers one of ``LINEAR_STRATEGIES``, for a hybrid ``"<softmax>+<linear>"`` such as ``"ring+zeco"``.
    At degree 1 every strategy costs the same (no communication).
    """

    cluster: Cluster
    model: ModelSpec
    coefficients: CostCoefficients = field(default_factory=CostCoefficients)

    # ---- strategies -------------------------------------------------------------------------------------

    def split_strategy(self, strategy: str) -> tuple[str | None, str | None]:
        """``(softmax_strategy, linear_strategy)`` of a strategy name; None for a kind the model lacks.

        Raises ValueError if the name does not fit the model's layer kinds.
        """
        has_s, has_l = self.model.num_softmax_layers > 0, self.model.num_linear_layers > 0
        if not isinstance(strategy, str):
            raise ValueError(f"strategy must be a string, got {strategy!r}")
        parts = strategy.split("+")
        if has_s and has_l:
            if len(parts) == 2 and parts[0] in SOFTMAX_STRATEGIES and parts[1] in LINEAR_STRATEGIES:
                return parts[0], parts[1]
            raise ValueError(
                f"strategy={strategy!r}: this hybrid model needs '<softmax>+<linear>' with softmax in "
                f"{SOFTMAX_STRATEGIES} and linear in {LINEAR_STRATEGIES}, e.g. 'ring+zeco'"
            )
        allowed = SOFTMAX_STRATEGIES if has_s else LINEAR_STRATEGIES
        if strategy not in allowed:
            kind = "softmax" if has_s else "linear-attention"
            raise ValueError(f"strategy={strategy!r} is not one of {allowed} (the model has only {kind} layers)")
        return (strategy, None) if has_s else (None, strategy)

    def strategy_valid(self, degree: int, strategy: str) -> bool:
        """Whether ``strategy`` can run at ``degree`` (ulysses needs the degree to split the heads)."""
        softmax, _ = self.split_strategy(strategy)
        if softmax == "ulysses":
            H, kv = self.model.num_heads, self.model.num_kv_heads
            return H % degree == 0 and (kv % degree == 0 or degree % kv == 0)
        return True

    def strategy_names(self, degree: int, strategies: Sequence[str] = ("ulysses", "ring", "token_ring"),
                       linear_strategies: Sequence[str] = ("lasp2", "zeco")) -> list[str]:
        """The strategy names valid at ``degree`` built from the allowed softmax and linear strategies."""
        has_s, has_l = self.model.num_softmax_layers > 0, self.model.num_linear_layers > 0
        soft = list(strategies) if has_s else [None]
        lin = list(linear_strategies) if has_l else [None]
        names = ["+".join(p for p in (s, l) if p) for s in soft for l in lin]
        return [n for n in names if self.strategy_valid(degree, n)]

    def _check(self, degree: int, strategy: str) -> tuple[str | None, str | None]:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
            raise ValueError(f"degree must be a positive integer, got {degree!r}")
        if degree > self.cluster.world_size:
            raise ValueError(f"degree={degree} exceeds cluster.world_size={self.cluster.world_size}")
        parts = self.split_strategy(strategy)
        if not self.strategy_valid(degree, strategy):
            raise ValueError(
                f"strategy={strategy!r} cannot run at degree={degree}: ulysses needs the degree to divide "
                f"num_heads={self.model.num_heads} (and num_kv_heads={self.model.num_kv_heads} to divide it "
                "or be divided by it); use ring or token_ring, or another degree"
            )
        return parts

    @staticmethod
    def _lengths(lengths) -> np.ndarray:
        arr = np.asarray(lengths, dtype=np.float64).reshape(-1)
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
            raise ValueError("lengths must be positive and finite")
        return arr

    # ---- communication volumes ----------------------------------------------------------------------------

    def layer_comm_bytes(self, length: float, degree: int, strategy: str) -> tuple[float, float]:
        """Bytes one rank sends for one layer, ``(forward, backward)``; ``strategy`` names one layer kind.

        These are the volumes of the module docstring (and of ``seqpar.collectives``' accounting).
        Raises ValueError for an unknown strategy.
        """
        m, P = self.model, degree
        s, b, H, kv, D = length / P, m.bytes_per_param, m.num_heads, m.num_kv_heads, m.head_dim
        steps = P - 1
        if strategy == "ring":
            kv_bytes = 2 * s * kv * D * b
            return steps * kv_bytes, steps * kv_bytes + steps * 2 * s * kv * D * ACCUM_BYTES
        if strategy == "token_ring":
            w = steps * TOKEN_RING_ZIGZAG_QUERY_FRACTION
            forward = w * (s * H * D * b + s * H * (D * b + LSE_BYTES))
            backward = w * (s * H * (3 * D * b + LSE_BYTES) + s * H * D * b)
            return forward, backward
        if strategy == "ulysses":
            local = 2 * s * H * D * b + 2 * s * max(kv, P) * D * b
            return steps / P * local, steps / P * local
        if strategy == "allgather_kv":
            return steps * 2 * s * kv * D * b, steps * 2 * s * kv * D * b
        if strategy in LINEAR_STRATEGIES:
            state = self._state_bytes()
            per_pass = steps * state if strategy == "lasp2" else (state if P > 1 else 0.0)
            return per_pass, per_pass
        raise ValueError(f"strategy={strategy!r} is not one of {SOFTMAX_STRATEGIES + LINEAR_STRATEGIES}")

    def _state_bytes(self) -> float:
        """One layer's linear-attention state as the collectives send it: float32 (B = 1, D_k = D_v = D)."""
        m = self.model
        return m.num_heads * m.head_dim * m.head_dim * ACCUM_BYTES

    # ---- time -----------------------------------------------------------------------------------------------

    def _flops_per_s(self, efficiency: float) -> float:
        return self.cluster.peak_tflops * 1e12 * efficiency

    def _softmax_layer_times(self, S: np.ndarray, P: int, strategy: str) -> np.ndarray:
        m, c = self.model, self.coefficients
        s, b, H, kv, D = S / P, m.bytes_per_param, m.num_heads, m.num_kv_heads, m.head_dim
        beta = self.cluster.link_bytes_per_s(P) * c.bandwidth_efficiency
        lam = self.cluster.latency_s * c.latency_scale
        a_f = 2.0 * S * S * H * D / P / self._flops_per_s(c.attention_efficiency)
        a_b = ATTENTION_BWD_OVER_FWD * a_f
        steps = P - 1
        if strategy in ("ring", "token_ring"):
            if strategy == "ring":
                fwd_step = 2 * s * kv * D * b
                bwd_step = 2 * s * kv * D * (b + ACCUM_BYTES)
            else:  # the busier of the two directions: partials forward, queries (+ dout, out, lse) backward
                fwd_step = TOKEN_RING_ZIGZAG_QUERY_FRACTION * s * H * (D * b + LSE_BYTES)
                bwd_step = TOKEN_RING_ZIGZAG_QUERY_FRACTION * s * H * (3 * D * b + LSE_BYTES)
            fwd = a_f / P + steps * (np.maximum(a_f / P, fwd_step / beta) + lam)
            bwd = a_b / P + steps * (np.maximum(a_b / P, bwd_step / beta) + lam)
            return fwd + bwd
        if strategy == "ulysses":
            tensors = 2 * s * H * D * b + 2 * s * max(kv, P) * D * b  # q + out, k + v
            one_pass = steps / P * tensors / beta + 4 * steps * lam
            return a_f + a_b + 2 * one_pass
        if strategy == "allgather_kv":
            one_pass = steps * 2 * s * kv * D * b / beta + steps * lam
            return a_f + a_b + 2 * one_pass
        raise ValueError(f"unknown softmax strategy {strategy!r}")

    def _linear_layer_times(self, S: np.ndarray, P: int, strategy: str) -> np.ndarray:
        m, c = self.model, self.coefficients
        H, D, C = m.num_heads, m.head_dim, m.linear_chunk
        beta = self.cluster.link_bytes_per_s(P) * c.bandwidth_efficiency
        lam = self.cluster.latency_s * c.latency_scale
        fwd = S / P * H * (2 * C * D + 4 * D * D) / self._flops_per_s(c.attention_efficiency)
        bwd = LINEAR_BWD_OVER_FWD * fwd
        state = self._state_bytes()
        if P == 1:
            comm = 0.0
        elif strategy == "lasp2":
            comm = (P - 1) * (state / beta + lam)
        elif strategy == "zeco":
            comm = (P - 1 + ZECO_PIECES - 1) * (state / ZECO_PIECES / beta + lam)
        else:
            raise ValueError(f"unknown linear strategy {strategy!r}")
        return np.maximum(fwd, comm) + np.maximum(bwd, comm)

    def seq_times(self, lengths, degree: int, strategy: str) -> np.ndarray:
        """``seq_time`` of many lengths at once (a float64 array). Raises as ``seq_time``."""
        softmax, linear = self._check(degree, strategy)
        S = self._lengths(lengths)
        m, c = self.model, self.coefficients
        dense_flops = 3.0 * 2.0 * (m.num_layers * m.layer_matmul_params + m.hidden * m.vocab)
        t = S / degree * dense_flops / self._flops_per_s(c.dense_efficiency) + c.sequence_overhead_s
        if softmax is not None:
            t = t + m.num_softmax_layers * self._softmax_layer_times(S, degree, softmax)
        if linear is not None:
            t = t + m.num_linear_layers * self._linear_layer_times(S, degree, linear)
        return np.asarray(t, dtype=np.float64)

    def seq_time(self, length: float, degree: int, strategy: str) -> float:
        """Seconds of one training step (forward + backward) of one sequence on a group of ``degree``.

        Raises:
            ValueError: ``length`` not positive, ``degree`` not a positive integer or above the world
                size, ``strategy`` unknown for this model or invalid at ``degree``.
        """
        return float(self.seq_times([length], degree, strategy)[0])

    def group_time(self, lengths: Iterable[float], degree: int, strategy: str) -> float:
        """Seconds one group of ``degree`` ranks needs for all of ``lengths`` (run one after another).

        The exactly rounded sum of ``seq_time`` (0.0 for no sequences). Raises as ``seq_time``.
        """
        return math.fsum(self.seq_times(list(lengths), degree, strategy).tolist())

    # ---- memory ---------------------------------------------------------------------------------------------

    def model_state_bytes(self) -> float:
        """Parameter, gradient and optimizer bytes per rank (sharded over the whole world)."""
        return self.model.state_bytes_per_param * self.model.num_params / self.cluster.world_size

    def _transient_bytes(self, S: np.ndarray, P: int, softmax: str | None, linear: str | None) -> np.ndarray:
        if P == 1:
            return np.zeros_like(S)
        m = self.model
        s, b, H, kv, D = S / P, m.bytes_per_param, m.num_heads, m.num_kv_heads, m.head_dim
        out = np.zeros_like(S)
        if softmax == "ring":  # double-buffered K,V and float32 dK,dV in the backward
            out = 2 * 2 * s * kv * D * (b + ACCUM_BYTES)
        elif softmax == "token_ring":  # double-buffered query block and float32 partial out + lse
            out = 2 * s * H * (D * b + ACCUM_BYTES * D + LSE_BYTES)
        elif softmax == "ulysses":  # full-length, head-sharded q, k, v, out and their gradients
            out = 2 * (2 * s * H * D * b + 2 * s * max(kv, P) * D * b)
        elif softmax == "allgather_kv":  # gathered K,V and the float32 dK,dV before the reduce-scatter
            out = 2 * S * kv * D * (b + ACCUM_BYTES)
        if linear is not None:
            states = P if linear == "lasp2" else 2
            out = np.maximum(out, states * H * D * D * ACCUM_BYTES)
        return out

    def seq_memories(self, lengths, degree: int, strategy: str) -> np.ndarray:
        """``seq_memory`` of many lengths at once. Raises as ``seq_memory``."""
        softmax, linear = self._check(degree, strategy)
        S = self._lengths(lengths)
        act = self.model.token_activation_bytes() * S / degree
        return self.model_state_bytes() + act + self._transient_bytes(S, degree, softmax, linear)

    def seq_memory(self, length: float, degree: int, strategy: str) -> float:
        """Peak bytes per rank while one sequence runs on a group of ``degree`` (model state included).

        Compare with ``cluster.mem_bytes``. Raises as ``seq_time``.
        """
        return float(self.seq_memories([length], degree, strategy)[0])

    # ---- calibration ----------------------------------------------------------------------------------------

    def calibrate(self, measurements: Iterable[Measurement | tuple], *, max_iterations: int = 200) -> CostModel:
        """A copy whose ``coefficients`` best fit measured step times (least squares on log time).

        Levenberg-Marquardt over the five ``CostCoefficients`` (efficiencies and latency scale in log
        space, the overhead linear and kept >= 0). Coefficients the measurements cannot see (e.g. the
        bandwidth when every measurement is at degree 1) stay where they are.

        Args:
            measurements: ``Measurement`` or ``(length, degree, strategy, seconds)`` tuples.
            max_iterations: Levenberg-Marquardt iteration cap.

        Raises:
            ValueError: no measurements, a non-positive time, or an invalid length/degree/strategy.
        """
        data = [m if isinstance(m, Measurement) else Measurement(*m) for m in measurements]
        if not data:
            raise ValueError("measurements is empty; pass at least one (length, degree, strategy, seconds)")
        for m in data:
            _require_positive("measurement seconds", m.seconds)
            self._check(m.degree, m.strategy)
            self._lengths([m.length])
        measured = np.log([m.seconds for m in data])

        def coefficients(theta: np.ndarray) -> CostCoefficients:
            return CostCoefficients(*np.exp(theta[:4]).tolist(), max(float(theta[4]), 0.0))

        def residuals(theta: np.ndarray) -> np.ndarray:
            model = replace(self, coefficients=coefficients(theta))
            return np.log([model.seq_time(m.length, m.degree, m.strategy) for m in data]) - measured

        c = self.coefficients
        theta = np.array([math.log(c.attention_efficiency), math.log(c.dense_efficiency),
                          math.log(c.bandwidth_efficiency), math.log(c.latency_scale), c.sequence_overhead_s])
        overhead_step = max(1e-6, 1e-3 * float(np.exp(measured).min()))
        steps = np.array([1e-6, 1e-6, 1e-6, 1e-6, overhead_step])
        r = residuals(theta)
        damping = 1e-3
        for _ in range(max_iterations):
            jac = np.empty((len(data), theta.size))
            for j in range(theta.size):
                probe = theta.copy()
                probe[j] += steps[j]
                jac[:, j] = (residuals(probe) - r) / steps[j]
            # scale columns so the overhead (seconds) and the logs share one damping
            scale = np.maximum(np.linalg.norm(jac, axis=0), 1e-12)
            js = jac / scale
            grad = js.T @ r
            improved = False
            while damping < 1e12:
                delta = -np.linalg.solve(js.T @ js + damping * np.eye(theta.size), grad) / scale
                trial = theta + delta
                trial[4] = max(trial[4], 0.0)
                r_trial = residuals(trial)
                if r_trial @ r_trial < r @ r:
                    theta, r, damping, improved = trial, r_trial, max(damping / 10, 1e-12), True
                    break
                damping *= 10
            if not improved or np.max(np.abs(delta * scale)) < 1e-12:
                break
        return replace(self, coefficients=coefficients(theta))
