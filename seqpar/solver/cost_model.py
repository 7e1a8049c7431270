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
  (by the zigzag layout or by splitting heads). Efficiency ``attention_efficiency``. A layer with a causal
  sliding window of ``W`` tokens (``ModelSpec.layer_windows``) has ``S W - W^2 / 2`` query-key pairs instead of
  ``S^2 / 2`` once ``S > W``: forward ``2 (2 S W - W^2) H D``; its bytes and steps are the registry's windowed
  ones (a packed call: its shortest sequence decides which shards meet).
* Linear attention, linear in ``S``: chunkwise form (GLA, Yang et al. 2024, Sec. 3): per token per head the
  masked intra-chunk product ``C * (D_k + D_v)`` plus ``2 D_k D_v`` for ``q S`` and ``2 D_k D_v`` for the
  state update; backward 2x forward. Efficiency ``attention_efficiency``.
* Delta-rule linear attention (Gated DeltaNet, KDA: ``ModelSpec.delta_rule_layers`` of the linear layers),
  linear in ``S``, sized with the delta-rule layers' own ``H``, ``D_k``, ``D_v`` (``ModelSpec.delta_rule_dims``;
  Qwen3-Next's and Kimi Linear's differ from their softmax heads): the chunked WY/UT form (Yang et al. 2024,
  "Parallelizing linear transformers with the delta rule over sequence length", Sec. 3; Gated DeltaNet, Yang et
  al. 2025) as the SP ops run it (``seqpar.collectives.delta_rule``: the values carry ``D_k`` extra columns,
  from which the shard's transition A_r comes, so the value width is ``V' = D_v + D_k``). Per token per head
  forward, causal masks halving the ``C x C`` products: the Gram matrices ``Q K^T`` and ``K K^T``
  (``2 C D_k``), the UT transform applied to ``beta K`` and ``beta V'`` (``C (D_k + V')``), the pseudo-values
  ``U - W S`` (``2 D_k V'``), the output ``q S + (Q K^T) U`` (``2 D_k V' + C V'``), the state update ``K^T U``
  (``2 D_k V'``) and the read-out of the entering state ``o0 + w^T S_in`` (``2 D_k D_v``):
  ``C (3 D_k + 2 V') + 6 D_k V' + 2 D_k D_v``, ``7 C D + 14 D^2`` at ``D_k = D_v = D`` (the UT triangular
  solve, ``C^2 / 3``, neglected); backward 2x forward. Efficiency ``attention_efficiency``.

Communication and SP time per layer: the strategy registry (``seqpar/strategies.py``)
--------------------------------------------------------------------------------------
Each strategy's entry holds its paper, the bytes one rank sends per layer forward and backward (exactly what
``seqpar.count_comm`` records for its op; tests/test_registry.py checks that), how those overlap with the
layer's attention compute, and the transient memory it holds. This module supplies the pieces the entries
take: the layer's shape (``s = S / P``, ``b``, ``H``, ``H_kv``, ``D``; linear layers: the float32 state
``H D^2 4``), the compute ``A_f``, ``A_b`` above on this rank, and the link: bandwidth ``beta`` is
``intra_node_gbps`` if the group fits in one node (``P <= gpus_per_node``), else ``inter_node_gbps`` (the
slowest hop bounds every ring step / all-to-all), times ``bandwidth_efficiency``; ``lam`` =
``latency_s * latency_scale`` is paid per step of every collective ((P - 1) steps for rings, all-gathers and
the pairwise all-to-all). Every strategy the model names comes from the registry; none is written here.
Delta-rule layers take their linear strategy's ``delta_rule_comm_bytes``, ``delta_rule_layer_time`` and
``delta_rule_transient_bytes`` on the delta-rule layer's own shape (state ``H D_k D_v 4``; LASP-2's all-gather
carries A_r too: ``(P-1) H D_k^2 4`` more bytes forward), with the delta-rule compute above, the transfer hidden
behind the output pass (``strategies.delta_rule_pass_parts``); a linear strategy without a ``delta_rule_op`` is
invalid for such a model.

A sequence's time is the dense time plus, per layer, its strategy's attention time, plus
``sequence_overhead_s`` (``seq_time``).

Packed calls (what the runtime runs: ``runtime/packing.py`` packs a group's sequences into one call)
----------------------------------------------------------------------------------------------------
A group runs its sequences as ONE packed forward + backward (or one per micro-batch). For a call on the
sequences ``S_1 .. S_n`` (``N = sum S_i`` tokens), ``call_time`` is

* dense compute on the packed total: ``3 * 2 * N_matmul * N / P`` FLOPs (the 2N rule above);
* attention compute per sequence, summed: softmax ``sum_i 2 S_i^2 H D / P`` forward (a packed causal
  call attends within each sequence only: ``cu_seqlens``), linear ``sum_i`` of the per-token cost =
  the same on ``N``;
* communication on the packed total and per-call latency once: each layer's strategy term is the entry's
  ``layer_time`` on a ``LayerShape`` of ``N`` tokens with the summed compute (every op sends the packed
  local shard in one message per step: ring's K,V blocks, Ulysses' all-to-alls, LASP-2's one all-gather of
  the states whatever the token count);
* ``sequence_overhead_s`` once (one call: one launch sequence), and ``packed_sequence_s`` per sequence of the
  call (0 unless calibrated: the per-sequence launches of a varlen call on CPU ranks);
* all of it times the shape's ``shape_scales`` factor (1 unless calibrated on the run's own batches).

``group_time`` is the sum of ``call_time`` over the group's micro-batches (one when the packed call
fits in memory). For one sequence ``call_time == seq_time``. Every term is non-decreasing in the sequences
it is given and, for every registered strategy, convex in ``(sum S_i^2, N)`` (sums and maxima of affine
terms; a windowed layer's bytes and steps follow the call's shortest sequence, so they may fall as that one
grows, while its compute is non-decreasing and convex in each length); communication can only add to compute
(``layer_time >= compute``), which makes ``compute_time`` a lower bound.

Memory (bytes per rank)
-----------------------
``model state + activations + one layer's transient SP buffers``, where model state is
``state_bytes_per_param * N_params / state_shards`` (``state_shards`` defaults to the world size: ZeRO-3 /
FSDP full sharding, mixed-precision Adam: 16 bytes per parameter, Rajbhandari et al. 2020; 1 for a run that
replicates its weights), activations are ``activation_bytes_per_token * N / P`` for the call's packed
tokens (default: no recomputation, bf16, flash attention so no ``S^2`` term; counted tensor by tensor in
``ModelSpec.token_activation_bytes``, after Korthikanti et al. 2022), and the transient buffers are those
the collective holds while a layer runs on the packed call (each entry's ``transient_bytes`` on ``N``
tokens, e.g. double-buffered receive blocks or gathered K,V; the larger of the two kinds' for a hybrid;
none at degree 1). ``call_memory`` is a packed call's peak, ``seq_memory`` one sequence alone; micro-batches
run one after another, so a group's peak is its largest micro-batch's ``call_memory``.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from seqpar import strategies
from seqpar.strategies import ACCUM_BYTES, LSE_BYTES, LayerShape, Link, Strategy, planner_defaults

__all__ = [
    "Cluster",
    "ModelSpec",
    "CostCoefficients",
    "Measurement",
    "CostModel",
]

LAYER_KINDS = strategies.KINDS

ATTENTION_BWD_OVER_FWD = 2.5  # FlashAttention-2 backward / forward FLOPs
LINEAR_BWD_OVER_FWD = 2.0
# calibrate's plan_margin is the fitted model's RMS relative error, at most this: a model worse than 50% off
# still lets plan_step leave the static plan for a plan predicted twice as fast
MAX_PLAN_MARGIN = 0.5


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
        cores_per_node: None (default) when every rank computes on its own device (GPUs); else how many ranks
            of a node compute at full speed at once, on a CPU host running more single-threaded ranks than it
            has cores. Those ranks share the cores, so a group runs faster while other groups' ranks wait
            (``CostModel.step_time``); group times (calibrated with every rank busy) are at full occupancy.

    Raises:
        ValueError: a non-positive or non-integer size or ``cores_per_node``, or a non-positive rate.
    """

    world_size: int
    gpus_per_node: int
    peak_tflops: float
    mem_bytes: float
    intra_node_gbps: float
    inter_node_gbps: float
    latency_s: float = 10e-6
    cores_per_node: int | None = None

    def __post_init__(self) -> None:
        _require_positive("world_size", self.world_size, integer=True)
        _require_positive("gpus_per_node", self.gpus_per_node, integer=True)
        if self.cores_per_node is not None:
            _require_positive("cores_per_node", self.cores_per_node, integer=True)
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

        Any world size does inside one node (3 = 2 + 1, 6 = 4 + 2). Across nodes ``gpus_per_node`` must be a
        power of two: groups placed largest first on consecutive ranks then start at a multiple of their size,
        so a group within a node never straddles one and a larger group is made of whole nodes (24 = 16 + 8
        with 8 per node).
        """
        w, g = self.world_size, self.gpus_per_node
        if w > g and not is_power_of_two(g):
            raise ValueError(
                f"cluster.gpus_per_node={g} must be a power of two when world_size={w} spans several nodes, "
                "so power-of-two groups never straddle a node boundary"
            )

    def ranks_on_node(self, node: int) -> int:
        """How many ranks node ``node`` runs (the last node of a world that is not a multiple may run fewer)."""
        return min(self.gpus_per_node, self.world_size - node * self.gpus_per_node)

    @property
    def shares_cores(self) -> bool:
        """True when some node runs more ranks than ``cores_per_node``: group times then depend on one another."""
        return self.cores_per_node is not None and self.cores_per_node < self.ranks_on_node(0)

    def degrees(self) -> list[int]:
        """The group sizes a plan may use: every power of two up to ``world_size``."""
        out, d = [], 1
        while d <= self.world_size:
            out.append(d)
            d *= 2
        return out


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
        delta_rule_layers: how many of the ``"linear"`` layers are delta-rule layers (Gated DeltaNet, KDA; the
            others are additive linear attention). They are linear-kind layers everywhere (one linear strategy
            runs both), only their cost differs (module docstring).
        delta_rule_heads, delta_rule_key_dim, delta_rule_value_dim: the delta-rule layers' heads (the value
            heads: grouped key heads are repeated to them), D_k and D_v (Qwen3-Next: ``linear_num_value_heads``,
            ``linear_key_head_dim``, ``linear_value_head_dim``; Kimi Linear: ``linear_num_heads``,
            ``linear_head_dim`` twice); None: ``num_heads`` / ``head_dim``.
        layer_windows: per layer, the causal sliding window of a softmax layer in tokens (transformers'
            ``sliding_window`` W: each query sees itself and the W - 1 keys before it; the ops'
            ``window=(W - 1, 0)``), None for full attention (and for every linear layer); default none. A
            windowed layer is charged its windowed compute and the registry's windowed bytes and steps.

    Raises:
        ValueError: non-positive sizes, ``num_kv_heads`` not dividing ``num_heads``, ``layer_kinds`` of the
            wrong length or with an unknown kind, ``delta_rule_layers`` negative or above the linear layers,
            ``layer_windows`` of the wrong length, with a window that is not a positive int or on a linear layer.
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
    delta_rule_layers: int = 0
    delta_rule_heads: int | None = None
    delta_rule_key_dim: int | None = None
    delta_rule_value_dim: int | None = None
    layer_windows: tuple[int | None, ...] | None = None

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
        linear = kinds.count("linear")
        delta = self.delta_rule_layers
        if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)) or not 0 <= delta <= linear:
            raise ValueError(f"delta_rule_layers={delta!r} must be an integer from 0 to the {linear} linear layers "
                             "in layer_kinds (delta-rule layers are listed there as 'linear')")
        for name in ("delta_rule_heads", "delta_rule_key_dim", "delta_rule_value_dim"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name), integer=True)
        windows = (None,) * self.num_layers if self.layer_windows is None else tuple(self.layer_windows)
        if len(windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(windows)} entries, must have num_layers={self.num_layers}")
        for i, (kind, w) in enumerate(zip(kinds, windows)):
            if w is not None and (isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1
                                  or kind != "softmax"):
                raise ValueError(f"layer_windows[{i}]={w!r} must be None or a positive int window in tokens, on a "
                                 f"softmax layer (layer {i} is {kind!r})")
        object.__setattr__(self, "layer_windows", tuple(None if w is None else int(w) for w in windows))

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

    @functools.cached_property
    def softmax_windows(self) -> tuple[tuple[int | None, int], ...]:
        """``(window, layers)``: how many softmax layers have each causal window (None: full attention), in layer
        order (computed once: the cost model reads it in every call)."""
        counts: dict[int | None, int] = {}
        for kind, window in zip(self.layer_kinds, self.layer_windows):
            if kind == "softmax":
                counts[window] = counts.get(window, 0) + 1
        return tuple(counts.items())

    @property
    def num_linear_layers(self) -> int:
        """Linear-attention layers, delta-rule ones included."""
        return self.layer_kinds.count("linear")

    @property
    def num_additive_linear_layers(self) -> int:
        """Linear-attention layers with an additive state (not delta-rule)."""
        return self.num_linear_layers - self.delta_rule_layers

    @property
    def delta_rule_dims(self) -> tuple[int, int, int]:
        """(H, D_k, D_v) of the delta-rule layers."""
        return (self.num_heads if self.delta_rule_heads is None else self.delta_rule_heads,
                self.head_dim if self.delta_rule_key_dim is None else self.delta_rule_key_dim,
                self.head_dim if self.delta_rule_value_dim is None else self.delta_rule_value_dim)

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
        strategy_terms: ``(strategy, per_step_s, per_token_s)`` or ``(strategy, per_step_s, per_token_s,
            degree)`` measured on this machine (``CostModel.calibrate`` fits one per strategy and degree): for a
            registered strategy named here, each layer forward + backward at degree P > 1 costs its compute,
            unoverlapped, plus ``(P - 1) (per_step_s + per_token_s N / P)`` for a call of N packed tokens,
            INSTEAD of the link model (bandwidth, latency, overlap); the entry of degree P if there is one, else
            the entry without a degree, else (a degree never measured) the link model. For machines the link
            model does not describe (gloo on a loaded CPU: bench/calibrate.py). Per degree because one pair per
            strategy ordered gloo's ring and Ulysses at degree 2 against the measurement in 9 of 10 measured
            pairs on this CPU (two profiles, 256-4096 tokens), a pair per degree in 1 of 10.
        packed_sequence_s: seconds each sequence of a packed call adds on every rank of its group, whatever its
            length (per-sequence kernel launches and bookkeeping of a varlen call; ``sequence_overhead_s`` is
            paid once per call). 0 on GPUs as modelled; on CPU ranks it is what makes many short sequences
            cheaper on small groups (each rank of a group runs every sequence of the call).
        effective_cores: on ranks that share cores (``Cluster.cores_per_node``), how many cores they behave as
            sharing in ``CostModel.step_time``, fitted from a profile step in which half the groups are idle
            (``CostModel.calibrate``): ranks that wait in communication leave part of their share unused, so a
            busy rank speeds up less than fair sharing of ``cores_per_node`` says once others are done. None:
            ``cores_per_node``.
        plan_margin: how much faster (a fraction) ``plan_step`` must predict a plan than the fastest static plan
            to return it instead of that static plan (its ``min_gain`` default). A search over many candidates
            picks the ones the model over-rates most, so predicted gains within the model's error are mostly its
            error: on 4 CPU ranks sharing 2 cores, degree-1 plans predicted 3-14% faster than the static degree-1
            plan measured 0.94-1.08 of it. ``CostModel.calibrate`` sets it to the fitted model's RMS relative error
            on the profile (0.06 on that CPU, where the bimodal mix's plans are predicted 10-11% faster); 0 (the
            uncalibrated default): any predicted gain counts.
        shape_scales: ``(strategy, degree, scale)``: every call of that group shape is predicted ``scale`` times
            what the formulas above give. ``planner.calibrate_static_scales`` sets them from whole static plans
            timed on the run's own batches (``seqpar.launch.calibrate.profile_static_plans``): the profile's
            synthetic calls fix how a shape's time grows with the lengths, the real batches its level. On 4 CPU
            ranks the profile alone predicted the static plans of bimodal batches 20-40% off, in an order
            that differed between profiles (ring x2 predicted faster than degree 1 and measured 10% slower).

    Raises:
        ValueError: a non-positive efficiency or scale, a negative overhead, or ``plan_margin`` outside [0, 1).
    """

    attention_efficiency: float = 0.5
    dense_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    latency_scale: float = 1.0
    sequence_overhead_s: float = 0.0
    strategy_terms: tuple[tuple[str, float, float], ...] = ()
    packed_sequence_s: float = 0.0
    effective_cores: float | None = None
    plan_margin: float = 0.0
    shape_scales: tuple[tuple[str, int, float], ...] = ()

    def __post_init__(self) -> None:
        scales = []
        for entry in self.shape_scales:  # JSON gives lists: store tuples (the dataclass stays hashable)
            ok = (len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], (int, np.integer))
                  and not isinstance(entry[1], bool) and entry[1] >= 1)
            if not ok or not (math.isfinite(float(entry[2])) and float(entry[2]) > 0):
                raise ValueError(f"shape_scales entries must be (strategy, degree >= 1, scale > 0), got {entry!r}")
            scales.append((entry[0], int(entry[1]), float(entry[2])))
        if len({(name, degree) for name, degree, _ in scales}) != len(scales):
            raise ValueError(f"shape_scales names a (strategy, degree) twice: {scales}")
        object.__setattr__(self, "shape_scales", tuple(scales))
        if not (math.isfinite(self.plan_margin) and 0 <= self.plan_margin < 1):
            raise ValueError(f"plan_margin must be in [0, 1), got {self.plan_margin!r}")
        for name in ("attention_efficiency", "dense_efficiency", "bandwidth_efficiency", "latency_scale"):
            _require_positive(name, getattr(self, name))
        if not (math.isfinite(self.sequence_overhead_s) and self.sequence_overhead_s >= 0):
            raise ValueError(f"sequence_overhead_s must be >= 0, got {self.sequence_overhead_s!r}")
        if not (math.isfinite(self.packed_sequence_s) and self.packed_sequence_s >= 0):
            raise ValueError(f"packed_sequence_s must be >= 0, got {self.packed_sequence_s!r}")
        if self.effective_cores is not None and not (math.isfinite(self.effective_cores) and self.effective_cores > 0):
            raise ValueError(f"effective_cores must be None or > 0, got {self.effective_cores!r}")
        terms = []
        for term in self.strategy_terms:  # JSON gives lists: store tuples (the dataclass stays hashable)
            if len(term) not in (3, 4) or not isinstance(term[0], str):
                raise ValueError("strategy_terms entries must be (strategy, per_step_s, per_token_s) or (strategy, "
                                 f"per_step_s, per_token_s, degree), got {term!r}")
            name, per_step, per_token = term[0], float(term[1]), float(term[2])
            if not (math.isfinite(per_step) and math.isfinite(per_token) and per_step >= 0 and per_token >= 0):
                raise ValueError(f"strategy_terms[{name!r}] must be finite and >= 0, got {term!r}")
            if len(term) == 4:
                degree = term[3]
                if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 2:
                    raise ValueError(f"strategy_terms[{name!r}]: the degree must be an integer >= 2 (degree 1 "
                                     f"communicates nothing), got {term!r}")
                terms.append((name, per_step, per_token, int(degree)))
            else:
                terms.append((name, per_step, per_token))
        keys = [(t[0], t[3] if len(t) == 4 else None) for t in terms]
        if len(set(keys)) != len(keys):
            raise ValueError(f"strategy_terms names a (strategy, degree) twice: {keys}")
        object.__setattr__(self, "strategy_terms", tuple(terms))

    def shape_scale(self, strategy: str, degree: int) -> float:
        """The ``shape_scales`` factor of ``strategy`` at ``degree``; 1.0 when none is set."""
        return next((scale for name, d, scale in self.shape_scales if name == strategy and d == degree), 1.0)

    def measured_terms(self, strategy: str, degree: int | None = None) -> tuple[float, float] | None:
        """``(per_step_s, per_token_s)`` measured for the registered ``strategy`` at ``degree``: its entry of that
        degree, else its entry without one; None when neither exists (the link model). ``degree=None``: the
        entry without a degree only."""
        found = None
        for term in self.strategy_terms:
            if term[0] != strategy:
                continue
            if len(term) == 4 and term[3] == degree:
                return term[1], term[2]
            if len(term) == 3:
                found = (term[1], term[2])
        return found


@dataclass(frozen=True)
class Measurement:
    """One measured step: ``sequences`` sequences of ``length`` tokens packed into one call per group, SP
    ``degree``, ``strategy``, ``seconds``; ``lengths``: the call's sequence lengths when they differ (then
    ``length`` is their mean, rounded, and ``sequences`` their count); ``busy_groups``: only the first this many
    of the world's ``world // degree`` groups ran the call, the others were idle (None: every group)."""

    length: int
    degree: int
    strategy: str
    seconds: float
    sequences: int = 1
    lengths: tuple[int, ...] | None = None
    busy_groups: int | None = None

    def __post_init__(self) -> None:
        if self.lengths is not None:  # JSON gives a list: store a tuple (the dataclass stays hashable)
            object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
            if len(self.lengths) != self.sequences:
                raise ValueError(f"lengths: {len(self.lengths)} lengths for sequences={self.sequences}")

    def call_lengths(self) -> list[int]:
        """The lengths of the measured packed call."""
        return list(self.lengths) if self.lengths is not None else [self.length] * self.sequences

    def predicted(self, model: CostModel) -> float:
        """What ``model`` says this measurement takes: ``call_time`` of its packed call, or with ``busy_groups``
        the ``step_time`` of those groups beside idle ones (their placeholder calls)."""
        call = model.call_time(self.call_lengths(), self.degree, self.strategy)
        if self.busy_groups is None:
            return call
        idle = model.group_time([], self.degree, self.strategy)
        groups = model.cluster.world_size // self.degree
        return model.step_time((tuple(range(g * self.degree, (g + 1) * self.degree)),
                                call if g < self.busy_groups else idle) for g in range(groups))


@dataclass(frozen=True)
class CostModel:
    """Per-rank time and memory of sequences under each SP strategy and degree (formulas: module docstring).

    Strategy names: for a model with one attention kind a registered name of that kind
    (``seqpar.strategies.names(kind)``), for a hybrid ``"<softmax>+<linear>"`` such as ``"ring+zeco"``
    (``split_strategy`` gives the pair a plan group carries). At degree 1 every strategy costs the same (no
    communication).

    ``state_shards``: over how many ranks the training run shards parameters, gradients and optimizer
    state (None: the whole world, as FSDP / ZeRO-3 do; 1: replicated, as plain DDP).
    """

    cluster: Cluster
    model: ModelSpec
    coefficients: CostCoefficients = field(default_factory=CostCoefficients)
    state_shards: int | None = None

    def __post_init__(self) -> None:
        if self.state_shards is not None:
            _require_positive("state_shards", self.state_shards, integer=True)
        for name, degree, _ in self.coefficients.shape_scales:  # a misspelt shape would silently scale nothing
            try:
                self._check(degree, name)
            except ValueError as err:
                raise ValueError(f"coefficients.shape_scales: ({name!r}, {degree}) is no group shape of this "
                                 f"model and cluster: {err}") from None

    # ---- strategies -------------------------------------------------------------------------------------

    def _kinds(self) -> tuple[str, ...]:
        """The attention kinds this model's layers use, in ``strategies.KINDS`` order."""
        return tuple(k for k in strategies.KINDS if k in self.model.layer_kinds)

    def split_strategy(self, strategy: str) -> tuple[str | None, str | None]:
        """``(softmax_strategy, linear_strategy)`` of a strategy name; None for a kind the model lacks.

        A model with one attention kind takes one registered name of that kind, a hybrid
        ``"<softmax>+<linear>"``.

        Raises:
            ValueError: the name does not fit the model's layer kinds (the message lists the names that do).
        """
        if not isinstance(strategy, str):
            raise ValueError(f"strategy must be a string, got {strategy!r}")
        kinds = self._kinds()
        parts = strategy.split("+")
        known = len(parts) == len(kinds) and all(
            p in strategies.names(kind) for p, kind in zip(parts, kinds))
        if not known:
            choices = self.strategy_names(None, strategies.names("softmax"), strategies.names("linear"))
            layers = " and ".join(kinds)
            raise ValueError(f"strategy={strategy!r} does not fit this model's {layers} layers; "
                             f"choose one of {tuple(choices)}")
        pair = dict(zip(kinds, parts))
        return pair.get("softmax"), pair.get("linear")

    def _registered(self, strategy: str) -> list[Strategy]:
        """The registry entries a strategy name stands for (one per layer kind of the model)."""
        return [strategies.get(name) for name in self.split_strategy(strategy) if name is not None]

    def why_invalid(self, degree: int, strategy: str) -> str | None:
        """Why ``strategy`` cannot run at ``degree`` (its entries' reasons), or None when it can.

        Raises ValueError for a name that does not fit the model (``split_strategy``).
        """
        m = self.model
        reasons = [r for s in self._registered(strategy)
                   if (r := s.why_invalid(degree, m.num_heads, m.num_kv_heads)) is not None]
        if m.delta_rule_layers:
            reasons += [f"{s.name} has no delta-rule variant for the model's {m.delta_rule_layers} delta-rule layers"
                        for s in self._registered(strategy)
                        if s.kind == "linear" and (s.delta_rule_op is None or s.delta_rule_layer_time is None)]
        return "; ".join(reasons) if reasons else None

    def strategy_valid(self, degree: int, strategy: str) -> bool:
        """Whether ``strategy`` can run at ``degree`` (each entry's ``min_degree`` and ``invalid_reason``).

        Raises ValueError for a name that does not fit the model (``split_strategy``).
        """
        return self.why_invalid(degree, strategy) is None

    def strategy_names(self, degree: int | None, strategies: Sequence[str] | None = None,
                       linear_strategies: Sequence[str] | None = None) -> list[str]:
        """The strategy names valid at ``degree`` (every name when None) built from the allowed softmax and linear
        strategies (default: the registry's ``planner_defaults``), in the order given."""
        allowed = {"softmax": strategies, "linear": linear_strategies}
        per_kind = [list(planner_defaults(kind) if allowed[kind] is None else allowed[kind])
                    for kind in self._kinds()]
        names = ["+".join(parts) for parts in itertools.product(*per_kind)]
        return [n for n in names if degree is None or self.strategy_valid(degree, n)]

    def _layer_terms(self, parts) -> list[tuple[int, str, Strategy, bool, int | None]]:
        """``(layers, compute kind, registry entry, delta_rule, window)`` for each kind of layer the model has,
        given ``split_strategy``'s pair: softmax (one term per causal window, None: full), additive linear,
        delta-rule linear (counts of 0 left out)."""
        m = self.model
        softmax_name, linear_name = parts
        terms = []
        if softmax_name is not None:
            entry = strategies.get(softmax_name)
            terms += [(count, "softmax", entry, False, window) for window, count in m.softmax_windows]
        if linear_name is not None:
            entry = strategies.get(linear_name)
            terms.append((m.num_additive_linear_layers, "linear", entry, False, None))
            terms.append((m.delta_rule_layers, "delta_rule", entry, True, None))
        return [t for t in terms if t[0]]

    def _entry_layer_time(self, entry: Strategy, delta_rule: bool, degree: int):
        """The entry's ``layer_time`` (or ``delta_rule_layer_time``) at ``degree``; for a strategy with measured
        terms there (``CostCoefficients.measured_terms``) its compute alone (an infinitely fast link) plus those
        terms."""
        formula = entry.delta_rule_layer_time if delta_rule else entry.layer_time
        measured = self.coefficients.measured_terms(entry.name, degree)
        if formula is None or measured is None:
            return formula
        per_step, per_token = measured

        def layer_time(shape: LayerShape, compute_fwd_s, compute_bwd_s, link: Link):
            steps = shape.degree - 1
            return (formula(shape, compute_fwd_s, compute_bwd_s, Link(math.inf, 0.0))
                    + steps * (per_step + per_token * shape.seq_len / shape.degree))

        return layer_time

    def _check(self, degree: int, strategy: str) -> tuple[str | None, str | None]:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
            raise ValueError(f"degree must be a positive integer, got {degree!r}")
        if degree > self.cluster.world_size:
            raise ValueError(f"degree={degree} exceeds cluster.world_size={self.cluster.world_size}")
        parts = self.split_strategy(strategy)
        why = self.why_invalid(degree, strategy)
        if why is not None:
            raise ValueError(f"strategy={strategy!r} cannot run at degree={degree}: {why}")
        return parts

    @staticmethod
    def _lengths(lengths) -> np.ndarray:
        arr = np.asarray(lengths, dtype=np.float64).reshape(-1)
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
            raise ValueError("lengths must be positive and finite")
        return arr

    def _layer_shape(self, lengths, degree: int, delta_rule: bool = False, window: int | None = None,
                     shortest=None) -> LayerShape:
        m = self.model
        if delta_rule:  # its own heads and D_k, D_v
            h, dk, dv = m.delta_rule_dims
            return LayerShape(seq_len=lengths, degree=degree, heads=h, kv_heads=h, head_dim=dk,
                              elem_bytes=m.bytes_per_param, state_bytes=h * dk * dv * ACCUM_BYTES, value_head_dim=dv)
        return LayerShape(seq_len=lengths, degree=degree, heads=m.num_heads, kv_heads=m.num_kv_heads,
                          head_dim=m.head_dim, elem_bytes=m.bytes_per_param,
                          state_bytes=m.num_heads * m.head_dim * m.head_dim * ACCUM_BYTES, window=window,
                          shortest_seq_len=shortest)

    def _link(self, degree: int) -> Link:
        c = self.coefficients
        return Link(self.cluster.link_bytes_per_s(degree) * c.bandwidth_efficiency,
                    self.cluster.latency_s * c.latency_scale)

    # ---- communication volumes ----------------------------------------------------------------------------

    def layer_comm_bytes(self, length: float, degree: int, strategy: str, *,
                         delta_rule: bool = False, window: int | None = None) -> tuple[float, float]:
        """Bytes one rank sends for one layer, ``(forward, backward)``; ``strategy`` names one layer kind.

        The registry entry's ``comm_bytes`` (``seqpar.count_comm``'s accounting of the op; with a causal
        ``window`` of W tokens, a softmax layer's windowed bytes), or with ``delta_rule=True`` its
        ``delta_rule_comm_bytes`` (a delta-rule layer).
        Raises ValueError for an unknown strategy, or with ``delta_rule`` one without a delta-rule variant.
        """
        entry = strategies.get(strategy)
        if not delta_rule:
            return entry.comm_bytes(self._layer_shape(length, degree, window=window))
        if entry.delta_rule_comm_bytes is None:
            raise ValueError(f"strategy: {strategy!r} has no delta-rule variant; use one of "
                             f"{[n for n in strategies.names('linear') if strategies.get(n).delta_rule_op]}")
        return entry.delta_rule_comm_bytes(self._layer_shape(length, degree, delta_rule=True))

    # ---- time -----------------------------------------------------------------------------------------------

    def _flops_per_s(self, efficiency: float) -> float:
        return self.cluster.peak_tflops * 1e12 * efficiency

    def _attention_compute(self, S: np.ndarray, P: int, kind: str,
                           window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One attention layer's compute on one rank, ``(forward, backward)`` seconds (module docstring). A
        causal ``window`` of W tokens leaves ``S W - W^2 / 2`` of the ``S^2 / 2`` query-key pairs once S > W."""
        m = self.model
        flops_per_s = self._flops_per_s(self.coefficients.attention_efficiency)
        if kind == "softmax":
            pairs = S * S if window is None else np.where(S > window, 2.0 * S * window - window * window, S * S)
            forward = 2.0 * pairs * m.num_heads * m.head_dim / P / flops_per_s
            return forward, ATTENTION_BWD_OVER_FWD * forward
        H, D, C = m.num_heads, m.head_dim, m.linear_chunk
        per_token = 2 * C * D + 4 * D * D
        if kind == "delta_rule":  # module docstring: its own heads, D_k, D_v; V' = D_v + D_k
            H, dk, dv = m.delta_rule_dims
            wide = dk + dv
            per_token = C * (3 * dk + 2 * wide) + 6 * dk * wide + 2 * dk * dv
        forward = S / P * H * per_token / flops_per_s
        return forward, LINEAR_BWD_OVER_FWD * forward

    def layer_times(self, lengths, degree: int, strategy: str, *, delta_rule: bool = False,
                    window: int | None = None) -> np.ndarray:
        """Seconds of one attention layer, forward + backward, on one rank of a group of ``degree`` for each of
        ``lengths``; ``strategy`` names one layer kind, ``delta_rule`` makes the layer a delta-rule one (its
        compute and the entry's ``delta_rule_layer_time``), ``window`` a softmax layer with a causal window of
        W tokens (its windowed compute, bytes and steps). The per-layer term ``seq_times`` adds up.

        Raises ValueError for an unknown strategy, or with ``delta_rule`` one without a delta-rule variant.
        """
        entry = strategies.get(strategy)
        layer_time = self._entry_layer_time(entry, delta_rule, degree)
        if layer_time is None or (delta_rule and entry.kind != "linear"):
            raise ValueError(f"strategy: {strategy!r} has no delta-rule variant")
        S = self._lengths(lengths)
        forward, backward = self._attention_compute(S, degree, "delta_rule" if delta_rule else entry.kind, window)
        return np.asarray(layer_time(self._layer_shape(S, degree, delta_rule, window), forward, backward,
                                     self._link(degree)),
                          dtype=np.float64)

    def seq_times(self, lengths, degree: int, strategy: str) -> np.ndarray:
        """``seq_time`` of many lengths at once (a float64 array). Raises as ``seq_time``."""
        parts = self._check(degree, strategy)
        S = self._lengths(lengths)
        m, c = self.model, self.coefficients
        dense_flops = 3.0 * 2.0 * (m.num_layers * m.layer_matmul_params + m.hidden * m.vocab)
        t = (S / degree * dense_flops / self._flops_per_s(c.dense_efficiency) + c.sequence_overhead_s
             + c.packed_sequence_s)
        for count, _, entry, delta_rule, window in self._layer_terms(parts):
            t = t + count * self.layer_times(S, degree, entry.name, delta_rule=delta_rule, window=window)
        return np.asarray(t * c.shape_scale(strategy, degree), dtype=np.float64)

    def seq_time(self, length: float, degree: int, strategy: str) -> float:
        """Seconds of one training step (forward + backward) of one sequence on a group of ``degree``.

        Raises:
            ValueError: ``length`` not positive, ``degree`` not a positive integer or above the world
                size, ``strategy`` unknown for this model or invalid at ``degree``.
        """
        return float(self.seq_times([length], degree, strategy)[0])

    def compute_times(self, lengths, degree: int) -> np.ndarray:
        """Per sequence, the compute alone on one rank of a group of ``degree`` (dense + every layer's attention
        compute, forward + backward; no communication, latency or overhead): a lower bound of any strategy's
        time, and ``degree * compute_times`` does not depend on ``degree``."""
        S = self._lengths(lengths)
        m, c = self.model, self.coefficients
        dense_flops = 3.0 * 2.0 * (m.num_layers * m.layer_matmul_params + m.hidden * m.vocab)
        t = S / degree * dense_flops / self._flops_per_s(c.dense_efficiency)
        counts = [*(("softmax", window, count) for window, count in m.softmax_windows),
                  ("linear", None, m.num_additive_linear_layers), ("delta_rule", None, m.delta_rule_layers)]
        for kind, window, count in counts:
            if count:
                forward, backward = self._attention_compute(S, degree, kind, window)
                t = t + count * (forward + backward)
        return np.asarray(t, dtype=np.float64)

    def call_time(self, lengths: Iterable[float], degree: int, strategy: str) -> float:
        """Seconds of ONE packed forward + backward of ``lengths`` on a group of ``degree`` (module docstring:
        dense compute on the total, attention compute per sequence, communication on the packed total,
        latency and ``sequence_overhead_s`` once). 0.0 for no sequences. Raises as ``seq_time``."""
        parts = self._check(degree, strategy)
        S = self._lengths(lengths if isinstance(lengths, np.ndarray) else list(lengths))
        if S.size == 0:
            return 0.0
        return self._packed_time(S, degree, parts)

    def _packed_time(self, S: np.ndarray, degree: int, parts) -> float:
        sums = [math.fsum(column.tolist()) for column in self.attention_terms(S, degree, parts).T]
        return self.packed_time_from_sums(math.fsum(S.tolist()), S.size, sums, float(S.min()), degree, parts)

    def attention_terms(self, S: np.ndarray, degree: int, parts) -> np.ndarray:
        """Each sequence's attention compute in a packed call on a group of ``degree``: shape ``(len(S), 2 T)``,
        forward and backward seconds of each of the T layer terms (``_layer_terms`` of ``parts``, the pair
        ``_check`` returns). A call's time depends on its sequences only through the column sums of these rows,
        its token total, its sequence count and its shortest sequence (``packed_time_from_sums``), so a search
        that moves sequences between groups updates those sums instead of re-timing the group."""
        columns = []
        for _, kind, _, _, window in self._layer_terms(parts):
            columns += self._attention_compute(S, degree, kind, window)
        return np.stack(columns, axis=1) if columns else np.zeros((S.size, 0))

    def packed_time_from_sums(self, total: float, count: int, sums: Sequence[float], shortest: float, degree: int,
                              parts) -> float:
        """``call_time`` of a packed call of ``count`` sequences, ``total`` tokens, shortest ``shortest`` tokens,
        whose ``attention_terms`` rows add up to ``sums`` (``packed_time_function``)."""
        return self.packed_time_function(degree, parts)(total, count, sums, shortest)

    def packed_time_function(self, degree: int, parts):
        """``f(total, count, sums, shortest)``: ``packed_time_from_sums`` on a group of ``degree`` with the
        strategy pair ``parts``, its per-shape terms resolved once (a search times thousands of calls of one shape).
        Module docstring: dense compute on the total, attention compute per sequence inside each layer's term,
        latency and ``sequence_overhead_s`` once."""
        m, c = self.model, self.coefficients
        dense_flops = 3.0 * 2.0 * (m.num_layers * m.layer_matmul_params + m.hidden * m.vocab)
        dense_per_token = dense_flops / degree / self._flops_per_s(c.dense_efficiency)
        link = self._link(degree)
        terms = [(layers, self._entry_layer_time(entry, delta_rule, degree), delta_rule, window)
                 for layers, _, entry, delta_rule, window in self._layer_terms(parts)]
        scale = c.shape_scale(_strategy_name(parts), degree)

        def packed_time(total: float, count: int, sums: Sequence[float], shortest: float) -> float:
            t = total * dense_per_token + c.sequence_overhead_s + count * c.packed_sequence_s
            for k, (layers, layer_time, delta_rule, window) in enumerate(terms):
                shape = self._layer_shape(total, degree, delta_rule, window, None if window is None else shortest)
                t = t + layers * float(layer_time(shape, sums[2 * k], sums[2 * k + 1], link))
            return float(t * scale)

        return packed_time

    def call_overhead(self, degree: int, strategy: str) -> float:
        """What a packed call costs whatever it carries: ``call_time`` as its tokens go to zero (latency per
        collective step, a per-call all-gather of states, ``sequence_overhead_s``)."""
        parts = self._check(degree, strategy)
        t = self.coefficients.sequence_overhead_s
        for count, _, entry, delta_rule, window in self._layer_terms(parts):
            layer = self._entry_layer_time(entry, delta_rule, degree)(
                self._layer_shape(0.0, degree, delta_rule, window), 0.0, 0.0, self._link(degree))
            t += count * float(layer)
        return float(t * self.coefficients.shape_scale(strategy, degree))

    def call_time_minorants(self, lengths, degree: int, strategy: str) -> tuple[np.ndarray, float, np.ndarray, float]:
        """Two additive lower bounds of ``call_time``, valid for any packed call of any subset of ``lengths``:
        ``(compute, compute_const, floor, floor_const)`` with, for every call on the sequences ``I``,

            call_time(I) >= compute_const + sum_{i in I} compute[i]      (compute: dense + attention, + overhead)
            call_time(I) >= floor_const + sum_{i in I} floor[i]

        ``floor`` charges each sequence its dense compute, its share of the communication with no attention
        compute to hide it (the layer term at zero compute is affine in the packed tokens: bytes are per local
        token, latency per step), and the part of its attention compute no strategy overlaps: ``rho`` per layer,
        the slope of ``layer_time`` in the compute at zero compute (1 for Ulysses, 1/P for ring: the first
        block). ``layer_time`` is convex in the compute (maxima and sums of affine terms), so it lies above that
        tangent: ``layer_time(N, A) >= layer_time(N, 0) + rho A``. A strategy whose zero-compute term is not
        affine in the tokens (a window's message count) gets no ``floor`` (its compute bound stands in).
        Packed calls and micro-batches only add calls, so a group's time is bounded by the same sums
        (``planner.makespan_lower_bound(refined=True)`` uses them).

        Raises as ``seq_time``.
        """
        parts = self._check(degree, strategy)
        S = self._lengths(lengths)
        m, c = self.model, self.coefficients
        compute = self.compute_times(S, degree) + c.packed_sequence_s  # (paid per sequence of a call)
        dense_flops = 3.0 * 2.0 * (m.num_layers * m.layer_matmul_params + m.hidden * m.vocab)
        floor = S / degree * dense_flops / self._flops_per_s(c.dense_efficiency) + c.packed_sequence_s
        floor_const = c.sequence_overhead_s
        link = self._link(degree)
        affine = True
        for count, kind, entry, delta_rule, window in self._layer_terms(parts):
            if window is not None:  # its messages depend on the shortest sequence of the call: not affine
                affine = False
                break
            layer_time = self._entry_layer_time(entry, delta_rule, degree)
            probes = np.array([0.0, 1024.0 * degree, 2048.0 * degree, 65536.0 * degree])
            zero = np.array([float(layer_time(self._layer_shape(float(n), degree, delta_rule), 0.0, 0.0, link))
                             for n in probes])
            slope = (zero[1] - zero[0]) / probes[1]
            if not np.allclose(zero, zero[0] + slope * probes, rtol=1e-9, atol=0.0):
                affine = False
                break
            rho = 1.0
            for n in probes[1:]:
                forward, backward = self._attention_compute(np.array([n]), degree, kind)
                shape = self._layer_shape(float(n), degree, delta_rule)
                base = float(layer_time(shape, 0.0, 0.0, link))
                eps = 1e-9 * max(base, 1e-12) / float(forward[0] + backward[0])
                bumped = float(layer_time(shape, eps * float(forward[0]), eps * float(backward[0]), link))
                rho = min(rho, (bumped - base) / (eps * float(forward[0] + backward[0])))
            rho = max(rho * (1 - 1e-6), 0.0)  # shaded: a finite difference of a convex function overstates
            forward, backward = self._attention_compute(S, degree, kind)
            floor = floor + count * (slope * S + rho * (forward + backward))
            floor_const += count * zero[0]
        if not affine:
            floor, floor_const = compute, c.sequence_overhead_s
        scale = c.shape_scale(strategy, degree)  # the call's time scales as a whole, and so do both bounds
        return (compute * scale, c.sequence_overhead_s * scale, np.asarray(floor * scale, dtype=np.float64),
                float(floor_const * scale))

    def group_time(self, lengths: Iterable[float], degree: int, strategy: str, *,
                   micro_batches: Sequence[Sequence[int]] | None = None) -> float:
        """Seconds one group of ``degree`` ranks needs for all of ``lengths``: one packed call
        (``call_time``), or, with ``micro_batches`` (lists of positions into ``lengths`` that partition them),
        one call per micro-batch, run one after another (the exactly rounded sum). A group without sequences
        runs one call of ``2 * degree`` padding tokens (``runtime.packing.pack_sequences``' placeholder, which
        keeps wrappers' collectives matched): its ``call_time``.

        Raises as ``seq_time``; ValueError if ``micro_batches`` does not partition the positions.
        """
        lengths = list(lengths)
        if not lengths and not micro_batches:
            return self.call_time([2 * degree], degree, strategy)
        if micro_batches is None:
            return self.call_time(lengths, degree, strategy)
        flat = sorted(i for mb in micro_batches for i in mb)
        if flat != list(range(len(lengths))):
            raise ValueError(f"micro_batches must partition positions 0..{len(lengths) - 1}, got {micro_batches}")
        return math.fsum(self.call_time([lengths[i] for i in mb], degree, strategy) for mb in micro_batches)

    def step_time(self, groups: Iterable[tuple[Sequence[int], float]]) -> float:
        """Seconds of a step whose groups, given as ``(ranks, group_time)``, run at once: the slowest group's time,
        unless the ranks share cores (``Cluster.cores_per_node``).

        Shared cores: group times are at full occupancy (every rank of the node busy, each at
        ``min(1, cores / ranks)`` of a core, as the calibration measured them). When ``A`` ranks of a node are
        still busy the scheduler shares the cores fairly, each at ``min(1, cores / A)`` of a core (processor
        sharing; a rank whose group is done waits for the step's gradient reduction without using a core), so a
        node's groups finish in the order of their times and each phase runs faster than at full occupancy by
        the ratio of the two rates. A group made of whole nodes shares them with no other group: its time. The
        step is the latest finish on any node; never more than the slowest group's time.
        """
        groups = [(tuple(ranks), float(t)) for ranks, t in groups]
        slowest = max((t for _, t in groups), default=0.0)
        cluster = self.cluster
        if not cluster.shares_cores:
            return slowest
        per_node = cluster.gpus_per_node
        cores = self.coefficients.effective_cores or cluster.cores_per_node
        nodes: dict[int, list[tuple[int, float]]] = {}
        step = 0.0
        for ranks, t in groups:
            if len(ranks) > per_node:  # whole nodes (plans are node-aligned): nothing else runs there
                step = max(step, t)
            else:
                nodes.setdefault(ranks[0] // per_node, []).append((len(ranks), t))
        for node, members in nodes.items():
            full = min(1.0, cores / cluster.ranks_on_node(node))  # a rank's share of a core at full occupancy
            busy = sum(d for d, _ in members)
            clock, done = 0.0, 0.0
            for degree, t in sorted(members, key=lambda m: m[1]):
                clock += (t - done) * full / min(1.0, cores / busy)
                done, busy = t, busy - degree
            step = max(step, clock)
        return min(step, slowest)

    # ---- memory ---------------------------------------------------------------------------------------------

    def model_state_bytes(self) -> float:
        """Parameter, gradient and optimizer bytes per rank (sharded over ``state_shards``, default the world)."""
        shards = self.cluster.world_size if self.state_shards is None else self.state_shards
        return self.model.state_bytes_per_param * self.model.num_params / shards

    def _transient_bytes(self, S: np.ndarray, P: int, strategy: str) -> np.ndarray:
        """The largest of the strategy's layers' ``transient_bytes`` (``delta_rule_transient_bytes`` for
        delta-rule layers); none at degree 1 (no SP buffers)."""
        out = np.zeros_like(S)
        if P == 1:
            return out
        for _, _, entry, delta_rule, _ in self._layer_terms(self.split_strategy(strategy)):
            transient = entry.delta_rule_transient_bytes if delta_rule else entry.transient_bytes
            out = np.maximum(out, transient(self._layer_shape(S, P, delta_rule)))
        return out

    def seq_memories(self, lengths, degree: int, strategy: str) -> np.ndarray:
        """``seq_memory`` of many lengths at once. Raises as ``seq_memory``."""
        self._check(degree, strategy)
        S = self._lengths(lengths)
        act = self.model.token_activation_bytes() * S / degree
        return self.model_state_bytes() + act + self._transient_bytes(S, degree, strategy)

    def seq_memory(self, length: float, degree: int, strategy: str) -> float:
        """Peak bytes per rank while one sequence runs on a group of ``degree`` (model state included).

        Compare with ``cluster.mem_bytes``. Raises as ``seq_time``.
        """
        return float(self.seq_memories([length], degree, strategy)[0])

    def call_memory(self, lengths: Iterable[float], degree: int, strategy: str) -> float:
        """Peak bytes per rank of ONE packed call of ``lengths`` on a group of ``degree`` (model state, the
        packed activations, the transient buffers on the packed total). Raises as ``seq_time``."""
        self._check(degree, strategy)
        S = self._lengths(list(lengths))
        total = math.fsum(S.tolist())
        return float(self.seq_memories([total], degree, strategy)[0]) if S.size else self.model_state_bytes()

    def max_call_tokens(self, degree: int, strategy: str) -> int:
        """The most tokens one packed call may hold on a group of ``degree`` within ``cluster.mem_bytes``
        (``call_memory`` grows with the packed total); 0 when even the model state does not fit.

        Cached per cost model, shape and registry entries (every plan asks it for every shape, and the search
        for the boundary takes a millisecond or more: a third of a small plan's budget on a CPU)."""
        return _cached_max_call_tokens(self, degree, strategy, tuple(map(id, self._registered(strategy))))

    def _max_call_tokens(self, degree: int, strategy: str) -> int:
        mem = self.cluster.mem_bytes

        def need(tokens: int) -> float:
            return float(self.seq_memories([max(tokens, 1)], degree, strategy)[0])

        if need(1) > mem:
            return 0
        # memory is affine in the packed tokens for every registered strategy: start from that solution,
        # then step to the exact boundary by doubling and bisection (a few evaluations)
        slope = need(2) - need(1)
        guess = int((mem - need(1)) / slope) + 1 if slope > 0 else 1 << 40
        lo, hi = 1, max(2, guess)
        if need(hi) <= mem:
            lo, hi = hi, hi + 1
            while need(hi) <= mem:
                lo, hi = hi, 2 * hi
                if hi > 1 << 50:
                    return hi
        elif need(hi - 1) <= mem:
            return hi - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if need(mid) <= mem else (lo, mid)
        return lo

    # ---- calibration ----------------------------------------------------------------------------------------

    def calibrate(self, measurements: Iterable[Measurement | tuple], *, max_iterations: int = 200,
                  measured_terms: bool = True) -> CostModel:
        """A copy whose ``coefficients`` best fit measured step times; of two forms, the one with the smaller
        squared log error on ``measurements``:

        * the link model: Levenberg-Marquardt over the five scalar ``CostCoefficients`` (efficiencies and latency
          scale in log space, kept within ``[1e-6, 1e3]``; the overhead linear and kept >= 0). Coefficients the
          measurements cannot see (e.g. the bandwidth when every measurement is at degree 1) stay where they
          are;
        * measured terms (``measured_terms=True``, a model with one attention kind, degree-1 measurements of three
          different calls or more, e.g. three lengths: only they separate the overhead, the dense and the attention
          terms once every degree has terms of its own): every measurement is ``overhead + (dense(S) / dense_efficiency
          + attention(S) / attention_efficiency) / P`` plus ``packed_sequence_s`` per sequence of the call plus, per
          layer at P > 1, its strategy's ``(P - 1) (per_step_s + per_token_s N / P)``, one pair per strategy and degree
          measured (``strategy_terms``; the link model is set aside for those; N the call's tokens) — linear in the
          unknowns, fitted by non-negative least squares on relative error (an efficiency the data cannot see is 1e6:
          that term is negligible). The compute is measured, not assumed: for machines whose links (and cores) the link
          model does not describe, like gloo on a shared CPU (bench/calibrate.py).

        The dense (linear in the length) and attention (quadratic) terms separate only with at least two lengths
        at one degree (three at degree 1 for the measured terms): ``seqpar.launch.calibrate.profile`` measures
        three. The copy's ``plan_margin`` is the chosen fit's RMS log error over all ``measurements`` (at most
        ``MAX_PLAN_MARGIN``): ``plan_step`` then leaves the fastest static plan only for a predicted gain larger
        than the model's own error.

        Args:
            measurements: ``Measurement`` or ``(length, degree, strategy, seconds)`` tuples.
            max_iterations: Levenberg-Marquardt iteration cap.
            measured_terms: also try the measured-terms form.

        Raises:
            ValueError: no measurements, a non-positive time, an invalid length/degree/strategy, or a single
                length (the dense and attention terms cannot be told apart).
        """
        data = [m if isinstance(m, Measurement) else Measurement(*m) for m in measurements]
        if not data:
            raise ValueError("measurements is empty; pass at least one (length, degree, strategy, seconds)")
        for m in data:
            _require_positive("measurement seconds", m.seconds)
            self._check(m.degree, m.strategy)
            self._lengths([m.length])
        if len({m.length for m in data}) < 2:
            raise ValueError("measurements: every one has the same length, so the dense (linear) and attention "
                             "(quadratic) efficiencies cannot be separated; measure at least two lengths")
        if self.coefficients.shape_scales:  # the fit is of the formulas; scales come after it, from whole plans
            return replace(self, coefficients=replace(self.coefficients, shape_scales=())).calibrate(
                data, max_iterations=max_iterations, measured_terms=measured_terms)
        # steps with idle groups measure how ranks share cores (effective_cores), not the terms of a call
        sharing = [m for m in data if m.busy_groups is not None]
        data = [m for m in data if m.busy_groups is None]
        link = self._calibrate_link(data, max_iterations)
        measured = self._calibrate_measured_terms(data) if measured_terms else None
        best = measured
        if measured is None or link.calibration_error(data) <= measured.calibration_error(data):
            best = link
        if sharing and self.cluster.shares_cores:
            best = best._calibrate_effective_cores(sharing)
        # the model's typical relative error on what it was fitted to (an under-estimate of its error on new
        # steps): plan_step's default min_gain (CostCoefficients.plan_margin)
        everything = data + sharing
        rms = math.sqrt(best.calibration_error(everything) / len(everything))
        return replace(best, coefficients=replace(best.coefficients, plan_margin=min(rms, MAX_PLAN_MARGIN)))

    def _calibrate_effective_cores(self, data: list[Measurement]) -> CostModel:
        """A copy whose ``effective_cores`` best fits ``data`` (steps with idle groups; squared log error), searched
        between ``Cluster.cores_per_node`` and the ranks of a node (there sharing changes nothing)."""
        low, high = float(self.cluster.cores_per_node), float(self.cluster.ranks_on_node(0))

        def error(cores: float) -> float:
            model = replace(self, coefficients=replace(self.coefficients, effective_cores=cores))
            return model.calibration_error(data)

        grid = np.linspace(low, high, 65)
        return replace(self, coefficients=replace(self.coefficients,
                                                  effective_cores=float(min(grid, key=error))))

    def calibration_error(self, measurements: Iterable[Measurement]) -> float:
        """Sum of squared log errors of ``seq_time`` against the measured seconds."""
        return float(sum(math.log(m.predicted(self) / m.seconds) ** 2 for m in measurements))

    def _calibrate_measured_terms(self, data: list[Measurement]) -> CostModel | None:
        """``calibrate``'s measured-terms form, or None when the data cannot give it."""
        if len(self._kinds()) != 1:
            return None
        ones = [m for m in data if m.degree == 1]
        # with a pair per strategy and degree, only degree 1 separates the overhead, dense and attention terms
        if len({tuple(m.call_lengths()) for m in ones}) < 3:
            return None
        unit = replace(self, coefficients=CostCoefficients(1.0, 1.0, 1.0, 1.0, 0.0))
        m_ = self.model
        dense_flops = 3.0 * 2.0 * (m_.num_layers * m_.layer_matmul_params + m_.hidden * m_.vocab)

        def dense(S: float) -> float:  # seconds at efficiency 1, degree 1
            return S * dense_flops / unit._flops_per_s(1.0)

        def attention(S: float) -> float:
            return float(unit.compute_times([S], 1)[0]) - dense(S)

        shapes = sorted({(m.strategy, m.degree) for m in data if m.degree > 1})
        layers = self.model.num_layers
        # one linear model of every measurement: overhead + (dense / dense_eff + attention / attention_eff) / P
        # + per layer (P - 1) (per_step + per_token S / P) of its strategy at its degree; non-negative, on
        # relative error (+ per packed sequence)
        basis = np.zeros((len(data), 4 + 2 * len(shapes)))
        for r, m in enumerate(data):
            call = m.call_lengths()
            tokens = sum(call)
            basis[r, :4] = (1.0, dense(tokens) / m.degree, sum(map(attention, call)) / m.degree, len(call))
            if m.degree > 1:
                k = 4 + 2 * shapes.index((m.strategy, m.degree))
                basis[r, k:k + 2] = layers * (m.degree - 1) * np.array([1.0, tokens / m.degree])
        seconds = np.array([m.seconds for m in data])
        if basis[:, 3].max() > 1:
            x = _nnls(basis / seconds[:, None], np.ones(len(data)))
        else:  # no packed call: the per-sequence column equals the per-call one, so it is left out (else the
            # split of the overhead between the two is arbitrary and changed with numpy's version)
            x = np.insert(_nnls(np.delete(basis, 3, axis=1) / seconds[:, None], np.ones(len(data))), 3, 0.0)
        overhead, inv_dense, inv_attention, per_sequence = x[:4]
        coefficients = CostCoefficients(
            attention_efficiency=1.0 / inv_attention if inv_attention > 1e-6 else 1e6,
            dense_efficiency=1.0 / inv_dense if inv_dense > 1e-6 else 1e6,
            bandwidth_efficiency=self.coefficients.bandwidth_efficiency,
            latency_scale=self.coefficients.latency_scale, sequence_overhead_s=float(overhead),
            strategy_terms=tuple((name, float(x[4 + 2 * k]), float(x[5 + 2 * k]), degree)
                                 for k, (name, degree) in enumerate(shapes)),
            packed_sequence_s=float(per_sequence))
        return replace(self, coefficients=coefficients)

    def _calibrate_link(self, data: list[Measurement], max_iterations: int) -> CostModel:
        """``calibrate``'s link-model form (Levenberg-Marquardt)."""
        measured = np.log([m.seconds for m in data])
        low, high = math.log(1e-6), math.log(1e3)

        def coefficients(theta: np.ndarray) -> CostCoefficients:
            return CostCoefficients(*np.exp(np.clip(theta[:4], low, high)).tolist(), max(float(theta[4]), 0.0))

        def residuals(theta: np.ndarray) -> np.ndarray:
            model = replace(self, coefficients=coefficients(theta))
            return np.log([m.predicted(model) for m in data]) - measured

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
                trial[:4] = np.clip(trial[:4], low, high)
                trial[4] = max(trial[4], 0.0)
                r_trial = residuals(trial)
                if r_trial @ r_trial < r @ r:
                    theta, r, damping, improved = trial, r_trial, max(damping / 10, 1e-12), True
                    break
                damping *= 10
            if not improved or np.max(np.abs(delta * scale)) < 1e-12:
                break
        return replace(self, coefficients=coefficients(theta))


def _strategy_name(parts: tuple[str | None, str | None]) -> str:
    """The strategy name ``CostModel.split_strategy`` took apart into ``parts``."""
    return "+".join(name for name in parts if name is not None)


def _nnls(basis: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares ``basis @ x ~ target`` with ``x >= 0`` (Lawson and Hanson 1974, the active-set method)."""
    n = basis.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(3 * n + 10):
        gradient = basis.T @ (target - basis @ x)
        candidates = np.flatnonzero(~passive & (gradient > 1e-12 * max(1.0, float(np.abs(gradient).max()))))
        if candidates.size == 0:
            break
        passive[candidates[np.argmax(gradient[candidates])]] = True
        while True:
            z = np.zeros(n)
            z[passive], *_ = np.linalg.lstsq(basis[:, passive], target, rcond=None)
            if (z[passive] > 0).all():
                x = z
                break
            blocking = passive & (z <= 0)
            step = np.min(x[blocking] / np.maximum(x[blocking] - z[blocking], 1e-300))
            x = x + step * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


@functools.lru_cache(maxsize=1024)
def _cached_max_call_tokens(cost_model: CostModel, degree: int, strategy: str, entries: tuple[int, ...]) -> int:
    """``CostModel.max_call_tokens``; ``entries`` (the ids of the strategy's registry entries) keys the cache on
    the registry too, so a re-registered strategy is measured anew."""
    return cost_model._max_call_tokens(degree, strategy)
