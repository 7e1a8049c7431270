"""The planner charges delta-rule layers (Gated DeltaNet, KDA) what the delta-rule ops cost (issue 20, item 4).

The cost model's bytes for a delta-rule layer are the registry's ``delta_rule_comm_bytes`` and what the ops send
under ``count_comm``, sized with the layers' own heads and D_k, D_v; its time is the delta-rule local pass with
the transfer overlapped with the output pass (by hand), so LASP-2's all-gather of A_r can
make ZeCO the faster choice where the additive ops' charge would not; a linear strategy without a delta-rule
variant is never planned for such a model; ``default_cost_model`` finds the delta-rule layers of a transformers
model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from tests.harness import run_distributed
from tests.test_registry import _no_comm_time, registered

from seqpar import strategies
from seqpar.solver import Cluster, CostModel, ModelSpec, plan_step
from seqpar.strategies import Strategy


def delta_model(delta_rule_layers: int = 2, heads: int = 4, head_dim: int = 64) -> ModelSpec:
    return ModelSpec(num_layers=2, hidden=256, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                     ffn_hidden=512, vocab=1000, layer_kinds=("linear", "linear"),
                     delta_rule_layers=delta_rule_layers)


def test_model_spec_checks_delta_rule_layers_against_the_linear_layers():
    with pytest.raises(ValueError, match="delta_rule_layers"):
        replace(delta_model(), layer_kinds=("linear", "softmax"))  # 2 delta-rule layers, 1 linear layer
    with pytest.raises(ValueError, match="delta_rule_layers"):
        delta_model(delta_rule_layers=-1)
    assert delta_model(1).num_additive_linear_layers == 1 and delta_model(1).num_linear_layers == 2


# ----------------------------------------------------------------------------------------------------
# bytes: cost model == registry == count_comm
# ----------------------------------------------------------------------------------------------------


def test_delta_rule_layer_bytes_equal_the_registry_and_what_the_ops_send():
    from tests.test_delta_rule_sp import DK, H, registry_bytes  # B = 1: one sequence

    world_size = 2
    per_rank = run_distributed(registry_bytes, world_size)  # {op: (forward, backward)} at D_k = D_v = DK
    cm = CostModel(Cluster(world_size, world_size, 1.0, 80e9, 1.0, 1.0), delta_model(heads=H, head_dim=DK))
    state = H * DK * DK * 4
    hand = {"lasp2": ((world_size - 1) * 2 * state, (world_size - 1) * state), "zeco": (state, state)}
    for op in ("lasp2", "zeco"):
        charged = cm.layer_comm_bytes(4 * world_size, world_size, op, delta_rule=True)
        entry = strategies.get(op)
        assert charged == entry.delta_rule_comm_bytes(cm._layer_shape(4 * world_size, world_size)) == hand[op], op
        sent = [got[op] for got in per_rank]
        busiest = (max(f for f, _ in sent), max(b for _, b in sent))
        assert charged == busiest, (op, sent)
    # the additive op's charge differs (LASP-2: no A_r, a decay per head): the delta-rule one is not it
    assert cm.layer_comm_bytes(8, world_size, "lasp2") != cm.layer_comm_bytes(8, world_size, "lasp2", delta_rule=True)


# ----------------------------------------------------------------------------------------------------
# time: A_r's bytes make LASP-2 slower than ZeCO; the planner picks ZeCO
# ----------------------------------------------------------------------------------------------------

# a slow link (1 GB/s) and a short latency: the per-layer transfer, not latency or compute, decides
SLOW = dict(world_size=2, gpus_per_node=2, peak_tflops=100.0, intra_node_gbps=1.0, inter_node_gbps=1.0,
            latency_s=1e-6)
LENGTH = 8192


def hand_overlapped(compute_fwd, dk, dv, comm_fwd, comm_bwd, C=64):
    """The delta-rule pass by hand: forward state pass, max(output pass, transfer), read-out; backward (2x) the
    read-out's L_r, max(output pass backward, transfer), the state pass backward."""
    wide = dk + dv
    state, output, read = C * (2 * dk + wide) + 4 * dk * wide, C * (dk + wide) + 2 * dk * wide, 2 * dk * dv
    total = state + output + read
    f = compute_fwd / total
    return (f * state + max(f * output, comm_fwd) + f * read) + (2 * f * read + max(2 * f * output, comm_bwd)
                                                                 + 2 * f * state)


def test_delta_rule_layer_time_overlaps_the_transfer_with_the_output_pass():
    cm = CostModel(Cluster(mem_bytes=80e9, **SLOW), delta_model())
    P, H, D, C = 2, 4, 64, 64
    beta = 1e9 * cm.coefficients.bandwidth_efficiency
    lam = SLOW["latency_s"] * cm.coefficients.latency_scale
    forward = LENGTH / P * H * (7 * C * D + 14 * D * D) / (100e12 * cm.coefficients.attention_efficiency)
    state = H * D * D * 4
    pieces = strategies.zeco_pieces(cm._layer_shape(LENGTH, P), cm._link(P))
    lasp2 = hand_overlapped(forward, D, D, (P - 1) * (2 * state / beta + lam), (P - 1) * (state / beta + lam))
    scan = (P - 1 + pieces - 1) * (state / pieces / beta + lam)
    zeco = hand_overlapped(forward, D, D, scan, scan)
    assert cm.layer_times([LENGTH], P, "lasp2", delta_rule=True)[0] == pytest.approx(lasp2, rel=1e-12)
    assert cm.layer_times([LENGTH], P, "zeco", delta_rule=True)[0] == pytest.approx(zeco, rel=1e-12)
    assert zeco < lasp2 - 0.5 * state / beta  # one state's transfer apart, ~80 us
    assert lasp2 < 3 * forward + 3 * state / beta  # some of the transfer hides behind the output pass
    # the whole step adds up the two delta-rule layers on top of the dense part
    dense = LENGTH / P * 6 * (2 * cm.model.layer_matmul_params + 256 * 1000) / (100e12 * 0.6)
    assert cm.seq_time(LENGTH, P, "lasp2") == pytest.approx(dense + 2 * lasp2, rel=1e-12)
    # the delta-rule local pass carries D_k extra value columns and the read-out: (7 C D + 14 D^2) / (2 C D + 4 D^2)
    additive = replace(cm, model=delta_model(0))
    ratio = (cm.compute_times([LENGTH], P) - dense) / (additive.compute_times([LENGTH], P) - dense)
    assert ratio[0] == pytest.approx((7 * C * D + 14 * D * D) / (2 * C * D + 4 * D * D), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# delta-rule layers sized with their own heads and D_k, D_v
# ----------------------------------------------------------------------------------------------------


def test_delta_rule_layers_are_sized_with_their_own_heads_and_dims():
    """Softmax heads 4 x 64, delta-rule heads 8 with D_k = 32, D_v = 48: bytes, compute and time by hand."""
    P, H, DK, DV, C = 4, 8, 32, 48, 64
    model = replace(delta_model(), delta_rule_heads=H, delta_rule_key_dim=DK, delta_rule_value_dim=DV)
    cluster = Cluster(world_size=P, gpus_per_node=P, peak_tflops=100.0, mem_bytes=80e9, intra_node_gbps=1.0,
                      inter_node_gbps=1.0, latency_s=1e-6)
    cm = CostModel(cluster, model)
    state, transition = H * DK * DV * 4, H * DK * DK * 4  # 49152 and 32768 bytes
    assert cm.layer_comm_bytes(LENGTH, P, "lasp2", delta_rule=True) == (3 * (transition + state), 3 * state)
    assert cm.layer_comm_bytes(LENGTH, P, "zeco", delta_rule=True) == (state, state)
    # compute: C (3 D_k + 2 V') + 6 D_k V' + 2 D_k D_v FLOPs per token and head, V' = D_k + D_v = 80
    per_token = C * (3 * DK + 2 * 80) + 6 * DK * 80 + 2 * DK * DV
    assert per_token == 34816
    flops_per_s = 100e12 * cm.coefficients.attention_efficiency
    forward = LENGTH / P * H * per_token / flops_per_s
    dense = cm.compute_times([LENGTH], P)[0] - 2 * 3 * forward
    additive = replace(cm, model=replace(model, delta_rule_layers=0))
    softmax_sized = LENGTH / P * 4 * (2 * C * 64 + 4 * 64 * 64) / flops_per_s  # the additive layers' own
    assert dense == pytest.approx(additive.compute_times([LENGTH], P)[0] - 2 * 3 * softmax_sized, rel=1e-9)
    # time: the transfers overlap the output pass; ZeCO cuts the state along D_v
    beta = 1e9 * cm.coefficients.bandwidth_efficiency
    lam = 1e-6 * cm.coefficients.latency_scale
    lasp2 = hand_overlapped(forward, DK, DV, 3 * ((transition + state) / beta + lam), 3 * (state / beta + lam))
    assert cm.layer_times([LENGTH], P, "lasp2", delta_rule=True)[0] == pytest.approx(lasp2, rel=1e-12)
    from seqpar.collectives.scan import choose_pieces

    pieces = choose_pieces(P, state, DV, latency_bytes=lam * beta)
    scan = (P - 1 + pieces - 1) * (state / pieces / beta + lam)
    zeco = hand_overlapped(forward, DK, DV, scan, scan)
    assert cm.layer_times([LENGTH], P, "zeco", delta_rule=True)[0] == pytest.approx(zeco, rel=1e-12)
    # transient memory: LASP-2 holds the P gathered maps and states, ZeCO two states and its own map
    assert cm._transient_bytes(np.array([LENGTH]), P, "zeco")[0] == 2 * state + transition
    assert cm._transient_bytes(np.array([LENGTH]), P, "lasp2")[0] == P * (state + transition)
    # the defaults are the softmax heads and head size
    assert delta_model().delta_rule_dims == (4, 64, 64)
    with pytest.raises(ValueError, match="delta_rule_key_dim"):
        replace(model, delta_rule_key_dim=0)


def uneven_bytes() -> dict:
    """Forward and backward bytes of the ops at D_k = 4, D_v = 3 (tests.test_delta_rule_sp), no final state."""
    from tests.test_delta_rule_sp import measure_bytes

    return {op: measure_bytes(op, False, None) for op in ("lasp2", "zeco")}


def test_delta_rule_bytes_at_unequal_key_and_value_dims_equal_what_the_ops_send():
    from tests.test_delta_rule_sp import DK, DV_BYTES, H

    world_size = 2
    per_rank = run_distributed(uneven_bytes, world_size)
    model = replace(delta_model(), delta_rule_heads=H, delta_rule_key_dim=DK, delta_rule_value_dim=DV_BYTES)
    cm = CostModel(Cluster(world_size, world_size, 1.0, 80e9, 1.0, 1.0), model)
    for op in ("lasp2", "zeco"):
        charged = cm.layer_comm_bytes(4 * world_size, world_size, op, delta_rule=True)
        sent = [got[op] for got in per_rank]
        assert charged == (max(f for f, _ in sent), max(b for _, b in sent)), (op, charged, sent)


def test_the_planner_picks_zeco_where_a_r_makes_lasp2_slower():
    model = delta_model()
    # each rank holds ~60% of the sequence's activations: the sequence needs both ranks
    mem = model.state_bytes_per_param * model.num_params / 2 + model.token_activation_bytes() * 0.6 * LENGTH
    cm = CostModel(Cluster(mem_bytes=mem, **SLOW), model)
    plan = plan_step([LENGTH], cm, time_limit_s=5.0)
    plan.validate([LENGTH], cm)
    (group,) = plan.groups
    assert len(group.ranks) == 2 and group.linear_strategy == "zeco", group
    # charged as additive layers (what the cost model did before), LASP-2 is at least as fast: the choice
    # above comes from the delta-rule terms
    additive = replace(cm, model=delta_model(0))
    assert additive.seq_time(LENGTH, 2, "lasp2") <= additive.seq_time(LENGTH, 2, "zeco")


# ----------------------------------------------------------------------------------------------------
# a linear strategy without a delta-rule variant is never planned for delta-rule layers
# ----------------------------------------------------------------------------------------------------

FREE_LINEAR = Strategy(
    name="free_linear", kind="linear", op="seqpar.collectives.lasp2:lasp2_linear_attention",
    summary="a test's stand-in: additive linear SP with no communication time and no delta-rule variant",
    comm_bytes=lambda shape: (0.0, 0.0), layer_time=_no_comm_time, transient_bytes=lambda shape: 0.0,
    layouts=("contiguous",),
)


def test_a_strategy_without_a_delta_rule_variant_is_invalid_for_delta_rule_layers():
    model = delta_model()
    mem = model.state_bytes_per_param * model.num_params / 2 + model.token_activation_bytes() * 0.6 * LENGTH
    with registered(FREE_LINEAR):
        delta = CostModel(Cluster(mem_bytes=mem, **SLOW), model)
        additive = replace(delta, model=delta_model(0))
        for degree in (1, 2):
            assert "no delta-rule variant" in delta.why_invalid(degree, "free_linear")
            assert additive.strategy_valid(degree, "free_linear")
        assert "free_linear" not in delta.strategy_names(2, linear_strategies=("lasp2", "zeco", "free_linear"))
        with pytest.raises(ValueError, match="free_linear"):
            delta.seq_time(LENGTH, 2, "free_linear")
        # it sends nothing, so it is the one picked wherever it is valid: for the additive model, not this one
        for cm, expected in ((additive, {"free_linear"}), (delta, {"zeco"})):
            plan = plan_step([LENGTH], cm, linear_strategies=("lasp2", "zeco", "free_linear"), time_limit_s=5.0)
            plan.validate([LENGTH], cm)
            assert {g.linear_strategy for g in plan.groups} == expected


# ----------------------------------------------------------------------------------------------------
# default_cost_model finds the delta-rule layers
# ----------------------------------------------------------------------------------------------------


def test_default_cost_model_lists_the_delta_rule_layers_of_a_transformers_model():
    pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")
    from tests.test_delta_rule_models import tiny_kimi_linear, tiny_qwen3_next
    from tests.test_parallelize import tiny_minimax

    from seqpar.wrapper import default_cost_model

    for make, delta_rule_layers in ((tiny_qwen3_next, 1), (tiny_kimi_linear, 1), (tiny_minimax, 0)):
        spec = default_cost_model(make(), 2).model
        assert spec.layer_kinds.count("linear") >= 1, make.__name__  # MiniMax: additive linear layers
        assert spec.delta_rule_layers == delta_rule_layers, make.__name__
    # the delta-rule layers' own heads and dims, not the softmax layers' (4 heads of 16 in both tiny models)
    assert default_cost_model(tiny_kimi_linear(), 2).model.delta_rule_dims == (4, 8, 8)  # linear_num_heads, _head_dim
    from transformers import Qwen3NextForCausalLM

    config = tiny_qwen3_next().config
    config.linear_num_value_heads, config.linear_value_head_dim = 6, 12  # key heads 2, D_k 8
    spec = default_cost_model(Qwen3NextForCausalLM(config), 2).model
    assert (spec.num_heads, spec.head_dim, spec.delta_rule_dims) == (4, 16, (6, 8, 12))
    cm = default_cost_model(tiny_qwen3_next(), 2)
    assert cm.model.layer_kinds == ("linear", "softmax") and cm.model.num_additive_linear_layers == 0
    plan = plan_step([96, 40], cm, time_limit_s=5.0)  # what strategy='auto' plans with it
    plan.validate([96, 40], cm)
    assert all(strategies.get(g.linear_strategy).delta_rule_op is not None for g in plan.groups)
