"""The planner charges delta-rule layers (Gated DeltaNet, KDA) what the delta-rule ops cost (issue 20, item 4).

The cost model's bytes for a delta-rule layer are the registry's ``delta_rule_comm_bytes`` and what the ops send
under ``count_comm``; its time is the delta-rule local pass plus the transfer, so LASP-2's all-gather of A_r can
make ZeCO the faster choice where the additive ops' charge would not; a linear strategy without a delta-rule
variant is never planned for such a model; ``default_cost_model`` finds the delta-rule layers of a transformers
model.
"""

from __future__ import annotations

from dataclasses import replace

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


def test_delta_rule_layer_time_is_the_local_pass_plus_the_transfer():
    cm = CostModel(Cluster(mem_bytes=80e9, **SLOW), delta_model())
    P, H, D, C = 2, 4, 64, 64
    beta = 1e9 * cm.coefficients.bandwidth_efficiency
    lam = SLOW["latency_s"] * cm.coefficients.latency_scale
    forward = LENGTH / P * H * (7 * C * D + 12 * D * D) / (100e12 * cm.coefficients.attention_efficiency)
    compute = forward + 2 * forward
    state = H * D * D * 4
    pieces = strategies.zeco_pieces(cm._layer_shape(LENGTH, P), cm._link(P))
    lasp2 = compute + (P - 1) * (2 * state + state) / beta + 2 * (P - 1) * lam  # A_r and B_r fwd, dB_r bwd
    zeco = compute + 2 * (P - 1 + pieces - 1) * (state / pieces / beta + lam)
    assert cm.layer_times([LENGTH], P, "lasp2", delta_rule=True)[0] == pytest.approx(lasp2, rel=1e-12)
    assert cm.layer_times([LENGTH], P, "zeco", delta_rule=True)[0] == pytest.approx(zeco, rel=1e-12)
    assert zeco < lasp2 - 0.5 * state / beta  # one state's transfer apart, ~80 us
    # the whole step adds up the two delta-rule layers on top of the dense part
    dense = LENGTH / P * 6 * (2 * cm.model.layer_matmul_params + 256 * 1000) / (100e12 * 0.6)
    assert cm.seq_time(LENGTH, P, "lasp2") == pytest.approx(dense + 2 * lasp2, rel=1e-12)
    # the delta-rule local pass carries D_k extra value columns: (7 C D + 12 D^2) / (2 C D + 4 D^2) = 3.2 here
    additive = replace(cm, model=delta_model(0))
    ratio = (cm.compute_times([LENGTH], P) - dense) / (additive.compute_times([LENGTH], P) - dense)
    assert ratio[0] == pytest.approx((7 * C * D + 12 * D * D) / (2 * C * D + 4 * D * D), rel=1e-12)


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
    cm = default_cost_model(tiny_qwen3_next(), 2)
    assert cm.model.layer_kinds == ("linear", "softmax") and cm.model.num_additive_linear_layers == 0
    plan = plan_step([96, 40], cm, time_limit_s=5.0)  # what strategy='auto' plans with it
    plan.validate([96, 40], cm)
    assert all(strategies.get(g.linear_strategy).delta_rule_op is not None for g in plan.groups)
