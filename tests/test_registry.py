"""The strategy registry (seqpar/strategies.py) is the code's: every entry's byte formula equals what its op sends
under ``seqpar.count_comm`` on real gloo ranks, every name the solver can emit resolves to an op the runtime can
call, and the planner considers a newly registered strategy without being told.

Driven by the registry: a strategy registered tomorrow is checked by these tests without editing them.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from tests.harness import run_distributed

from seqpar import strategies
from seqpar.collectives import count_comm
from seqpar.collectives.layout import shard_sequence
from seqpar.solver import Cluster, CostModel, ModelSpec, plan_step
from seqpar.solver.problem import Problem
from seqpar.strategies import LayerShape, Strategy

BYTE_WORLD_SIZES = (2, 3, 4)
# (H, H_kv) tried in order; each strategy is measured on the first one it is valid for (GQA first)
HEAD_LAYOUTS = ((4, 2), (6, 2), (6, 3), (8, 2), (6, 1), (8, 8))
HEAD_DIM = 16
TOKENS_PER_RANK = 8  # even: the zigzag layout cuts each rank's share into two halves
DTYPES = (torch.float32, torch.bfloat16)


def heads_for(strategy: Strategy, degree: int) -> tuple[int, int] | None:
    """The first head layout ``strategy`` can run on ``degree`` ranks with, or None."""
    return next(((h, kv) for h, kv in HEAD_LAYOUTS if strategy.valid(degree, h, kv)), None)


def byte_cases(degree: int) -> list[tuple[str, int, int, torch.dtype]]:
    """(name, H, H_kv, dtype) of every registered strategy that can run on ``degree`` ranks."""
    cases = []
    for name in strategies.names():
        strategy = strategies.get(name)
        heads = heads_for(strategy, degree)
        if heads is not None:
            dtypes = DTYPES if strategy.kind == "softmax" else (torch.float32,)  # linear states travel in fp32
            cases += [(name, *heads, dtype) for dtype in dtypes]
    return cases


def layer_shape(degree: int, heads: int, kv_heads: int, dtype: torch.dtype) -> LayerShape:
    return LayerShape(seq_len=degree * TOKENS_PER_RANK, degree=degree, heads=heads, kv_heads=kv_heads,
                      head_dim=HEAD_DIM, elem_bytes=torch.empty(0, dtype=dtype).element_size(),
                      state_bytes=heads * HEAD_DIM * HEAD_DIM * 4)


# ----------------------------------------------------------------------------------------------------
# rank functions
# ----------------------------------------------------------------------------------------------------


def measure_op_bytes(cases: list[tuple[str, int, int, torch.dtype]]) -> list[tuple[int, int]]:
    """(forward, backward) bytes this rank sends for one causal layer of each case, through the registry's op."""
    p = dist.get_world_size()
    seq_len = p * TOKENS_PER_RANK
    out = []
    for i, (name, h, h_kv, dtype) in enumerate(cases):
        strategy = strategies.get(name)
        op = strategy.load_op()
        gen = torch.Generator().manual_seed(i)
        kv_heads = h_kv if strategy.kind == "softmax" else h
        q, k, v, dout = (torch.randn(1, seq_len, n, HEAD_DIM, generator=gen, dtype=torch.float64)
                         for n in (h, kv_heads, kv_heads, h))
        layout = strategy.layouts[0]  # softmax: zigzag; linear: contiguous (the only one it has)
        ql, kl, vl = (shard_sequence(t, layout=layout).to(dtype).requires_grad_(True) for t in (q, k, v))
        if strategy.kind == "softmax":
            options = dict(causal=True, layout=layout)
        else:  # a per-head decay (whole on every rank): the decay never travels
            log_decay = -(0.05 + 0.5 * torch.rand(h, generator=gen, dtype=torch.float64))
            options = dict(log_decay=log_decay.to(dtype).requires_grad_(True), layout=layout)
        with count_comm() as forward:
            result = op(ql, kl, vl, **options)
        with count_comm() as backward:
            result.backward(shard_sequence(dout, layout=layout).to(dtype))
        out.append((forward.bytes_sent, backward.bytes_sent))
    return out


# ----------------------------------------------------------------------------------------------------
# bytes: the formula is the code's
# ----------------------------------------------------------------------------------------------------


def test_every_strategy_is_measured_at_some_world_size():
    for name in strategies.names():
        degrees = [p for p in BYTE_WORLD_SIZES if heads_for(strategies.get(name), p) is not None]
        assert degrees, f"{name} is valid at none of {BYTE_WORLD_SIZES} with heads {HEAD_LAYOUTS}; add a case"
    assert strategies.get("zeco").layouts == ("contiguous",) and strategies.get("ring").layouts[0] == "zigzag"


@pytest.mark.parametrize("world_size", BYTE_WORLD_SIZES)
def test_comm_bytes_equal_what_the_op_sends(world_size):
    cases = byte_cases(world_size)
    names = {c[0] for c in cases}
    assert {"ring", "token_ring", "allgather_kv", "lasp2", "zeco"} <= names
    assert ("ulysses" in names) and ("ulysses", 6, 2, torch.float32) not in cases  # H_kv = 2 does not split 3
    per_rank = run_distributed(measure_op_bytes, world_size, cases)
    for i, (name, h, h_kv, dtype) in enumerate(cases):
        strategy = strategies.get(name)
        formula = strategy.comm_bytes(layer_shape(world_size, h, h_kv, dtype))
        for phase, expected in zip(("forward", "backward"), formula):
            sent = [rank_results[i][phase == "backward"] for rank_results in per_rank]
            assert expected > 0, (name, phase)
            how = strategy.comm_bytes_over_ranks
            if how == "each":
                assert sent == pytest.approx([expected] * world_size, rel=1e-12), (name, dtype, phase, sent)
            elif how == "mean":
                assert sum(sent) / world_size == pytest.approx(expected, rel=1e-12), (name, dtype, phase, sent)
            else:
                assert max(sent) == pytest.approx(expected, rel=1e-12), (name, dtype, phase, sent)


def test_one_rank_sends_nothing_and_takes_its_compute_alone():
    # the planner keeps one strategy at degree 1, so every strategy that runs alone must cost the same there
    link = strategies.Link(bytes_per_s=1e9, latency_s=1e-3)
    for name in strategies.names():
        strategy = strategies.get(name)
        if strategy.min_degree == 1:
            shape = layer_shape(1, 4, 2, torch.float32)
            assert strategy.comm_bytes(shape) == (0, 0), name
            assert strategy.layer_time(shape, 0.25, 0.5, link) == 0.75, name


# ----------------------------------------------------------------------------------------------------
# names the solver emits: each resolves to an op the runtime can call
# ----------------------------------------------------------------------------------------------------

MODELS = {
    "softmax": ModelSpec(num_layers=4, hidden=512, num_heads=8, num_kv_heads=2, head_dim=64, ffn_hidden=1408,
                         vocab=1000),
    "linear": ModelSpec(num_layers=4, hidden=512, num_heads=8, num_kv_heads=8, head_dim=64, ffn_hidden=1408,
                        vocab=1000, layer_kinds=("linear",) * 4),
    "hybrid": ModelSpec(num_layers=4, hidden=512, num_heads=8, num_kv_heads=4, head_dim=64, ffn_hidden=1408,
                        vocab=1000).with_linear_layers(2),
}


def check_op_is_callable_by_the_runtime(name: str, kind: str) -> None:
    op = strategies.get(name, kind).load_op()
    params = inspect.signature(op).parameters
    expected = strategies.OP_KEYWORDS[kind]
    missing = [k for k in expected if k not in params]
    assert not missing, f"{name}'s op {op.__qualname__} lacks the {kind} keywords {missing}"
    # everything but the three tensors and the kind's keywords must have a default: the runtime passes no more
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert len(required) == 3 and not set(required) & set(expected), (name, required)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_name_the_solver_can_emit_resolves_to_a_runnable_op(model_name):
    model = MODELS[model_name]
    kinds = set(model.layer_kinds)
    cm = CostModel(Cluster(8, 8, 100.0, 80e9, 200.0, 25.0), model)
    emitted = set()
    for degree in range(1, 9):
        emitted |= set(cm.strategy_names(degree))  # the planner's defaults
        emitted |= set(cm.strategy_names(degree, strategies.names("softmax"), strategies.names("linear")))
    emitted |= {name for _, name in Problem([1000, 5000], cm).shapes}  # every group shape plan_step may use
    plan = plan_step([300, 900, 2500, 7000, 12000, 30000], cm, solver="greedy", time_limit_s=2.0)
    plan.validate([300, 900, 2500, 7000, 12000, 30000], cm)
    assert emitted and {g.strategy for g in plan.groups} <= emitted
    for group in plan.groups:
        assert (group.softmax_strategy is not None) == ("softmax" in kinds), group
        assert (group.linear_strategy is not None) == ("linear" in kinds), group
    for name in sorted(emitted):
        softmax, linear = cm.split_strategy(name)
        assert (softmax is not None) == ("softmax" in kinds) and (linear is not None) == ("linear" in kinds), name
        for kind, part in (("softmax", softmax), ("linear", linear)):
            if part is not None:
                check_op_is_callable_by_the_runtime(part, kind)


# ----------------------------------------------------------------------------------------------------
# a strategy registered later is planned for without being named
# ----------------------------------------------------------------------------------------------------


def _no_comm_time(shape, compute_fwd_s, compute_bwd_s, link):
    return compute_fwd_s + compute_bwd_s + 0.0 * link.latency_s


def _heads_split(degree: int, heads: int, kv_heads: int) -> str | None:
    return None if heads % degree == 0 else f"needs the degree {degree} to divide num_heads={heads}"


@contextmanager
def registered(strategy: Strategy):
    strategies.register(strategy)
    try:
        yield strategy
    finally:
        strategies.unregister(strategy.name)


STAND_IN = Strategy(
    name="stand_in_2d", kind="softmax", op="seqpar.collectives.ring:ring_attention",
    summary="a test's stand-in for a 2-D strategy: no communication time at all",
    comm_bytes=lambda shape: (0.0, 0.0), layer_time=_no_comm_time, transient_bytes=lambda shape: 0.0,
    min_degree=4, invalid_reason=_heads_split,
)


def test_the_planner_considers_a_newly_registered_strategy_where_it_is_valid():
    model = ModelSpec(num_layers=4, hidden=1024, num_heads=8, num_kv_heads=2, head_dim=128, ffn_hidden=2816,
                      vocab=32000)
    wide = CostModel(Cluster(16, 8, 100.0, 80e9, 200.0, 25.0), model)
    # 8 ranks whose memory holds about 16K tokens each: the 60K sequence needs a group of 4 or 8
    mem = model.state_bytes_per_param * model.num_params / 8 + model.token_activation_bytes() * 16384
    cm = CostModel(Cluster(8, 8, 100.0, mem, 200.0, 25.0, latency_s=20e-6), model)
    lengths = [60000, 2000, 9000, 500]
    assert all(name != STAND_IN.name for _, name in Problem(lengths, wide).shapes)
    with registered(STAND_IN):
        assert STAND_IN.name in strategies.planner_defaults("softmax")
        degrees = sorted(d for d, name in Problem(lengths, wide).shapes if name == STAND_IN.name)
        assert degrees == [4, 8]  # not below min_degree 4, not at 16 (8 heads do not split 16 ways)
        plan = plan_step(lengths, cm, time_limit_s=5.0)
        plan.validate(lengths, cm)
        # at 4 or 8 ranks it costs the compute alone, less than any other strategy there, so the group that
        # runs the 60K sequence (it needs 4 ranks or more) uses it
        (long_group,) = [g for g in plan.groups if 0 in g.seq_indices]
        assert long_group.degree >= 4 and long_group.softmax_strategy == STAND_IN.name, plan.groups
    assert STAND_IN.name not in strategies.names()
    with pytest.raises(ValueError, match="stand_in_2d"):
        plan.validate(lengths, cm)  # unregistered: a plan naming it no longer validates


# ----------------------------------------------------------------------------------------------------
# the registry's own contract
# ----------------------------------------------------------------------------------------------------


def test_registry_rejects_bad_entries_and_names():
    with pytest.raises(ValueError, match="name: strategy 'ring' is already registered"):
        strategies.register(strategies.get("ring"))
    with pytest.raises(ValueError, match="strategy: unknown softmax strategy 'zeco'"):
        strategies.get("zeco", "softmax")
    with pytest.raises(ValueError, match="name: unknown strategy 'megatron'"):
        strategies.unregister("megatron")
    with pytest.raises(ValueError, match="kind"):
        strategies.names("mamba")
    good = dict(name="x", kind="softmax", op="m:f", summary="", comm_bytes=None, layer_time=None,
                transient_bytes=None)
    for field, value in (("name", "ring+zeco"), ("name", ""), ("kind", "ssm"), ("op", "no_colon"),
                         ("comm_bytes_over_ranks", "median")):
        with pytest.raises(ValueError, match=field):
            Strategy(**{**good, field: value})
    # every softmax strategy is planned for by default except allgather_kv, which opts out
    assert strategies.planner_defaults("softmax")[:3] == ("ulysses", "ring", "token_ring")
    assert set(strategies.planner_defaults("softmax")) == set(strategies.names("softmax")) - {"allgather_kv"}
    assert strategies.planner_defaults("linear") == ("lasp2", "zeco")


def test_validity_reasons_name_the_fix():
    ulysses = strategies.get("ulysses")
    assert ulysses.valid(4, 8, 2) and ulysses.valid(2, 8, 8) and ulysses.valid(3, 6, 3)
    assert not ulysses.valid(3, 6, 2)  # 3 divides 6 but neither 2 | 3 nor 3 | 2
    assert "num_heads=8" in ulysses.why_invalid(16, 8, 2)
    assert strategies.get("ring").valid(3, 6, 2) and strategies.get("ring").why_invalid(7, 1, 1) is None
