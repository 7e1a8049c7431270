"""seqpar.solver: cost-model formulas, plan validity, optimality against brute force, fallbacks, errors.

Optimality is checked against an independent brute force: every multiset of power-of-two group sizes that
sums to the world, every assignment of sequences to groups (subset DP), each group on its best strategy.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import math
import os
import signal
import time
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pulp
import pytest

from seqpar.launch.data import long_tail_lengths
from seqpar.solver.milp import _dp_ends, make_buckets, solve_milp
from seqpar.solver.planner import _homogeneous
from seqpar.solver.prefetch import WorkerExited
from seqpar.solver.problem import Problem
from seqpar.strategies import planner_defaults
from seqpar.solver import (
    Cluster,
    CostCoefficients,
    CostModel,
    Measurement,
    ModelSpec,
    Plan,
    PlanPrefetcher,
    makespan_lower_bound,
    plan_step,
    static_plan,
)

SMALL = ModelSpec(num_layers=4, hidden=1024, num_heads=8, num_kv_heads=2, head_dim=128, ffn_hidden=2816, vocab=32000)


def small_model(world: int, gpus_per_node: int, fit_tokens: int = 16384, *, intra_gbps: float = 200.0,
                latency_s: float = 20e-6) -> CostModel:
    """A small cluster where a sequence of about ``fit_tokens`` tokens just fits on one GPU."""
    state = SMALL.state_bytes_per_param * SMALL.num_params / world
    mem = state + SMALL.token_activation_bytes() * fit_tokens
    cluster = Cluster(world, gpus_per_node, 100.0, mem, intra_gbps, intra_gbps / 8, latency_s=latency_s)
    return CostModel(cluster, SMALL)


def slow_links_model(world: int, gpus_per_node: int) -> CostModel:
    """Slow links, high latency, little memory: short sequences want few ranks, long ones need many,
    so the optimum mixes group sizes and neither static plans nor the greedy find it."""
    return small_model(world, gpus_per_node, fit_tokens=4000, intra_gbps=10.0, latency_s=3e-4)


# ---------------------------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------------------------


def test_comm_bytes_match_the_collectives_formulas():
    model = ModelSpec(num_layers=2, hidden=4096, num_heads=32, num_kv_heads=2, head_dim=128, ffn_hidden=11008,
                      vocab=32000)
    cm = CostModel(Cluster(8, 8, 989.0, 80e9, 450.0, 50.0), model)
    S, P, b, H, kv, D = 8192, 4, 2, 32, 2, 128
    s = S / P
    assert cm.layer_comm_bytes(S, P, "ring") == pytest.approx(
        ((P - 1) * 2 * s * kv * D * b, (P - 1) * 2 * s * kv * D * b + (P - 1) * 2 * s * kv * D * 4), rel=1e-12)
    # seqpar.collectives.token_ring's docstring: zigzag causal mean factor 0.75 in both directions
    tr_fwd = 0.75 * (P - 1) * (s * H * D * b + s * H * (D * b + 4))
    tr_bwd = 0.75 * (P - 1) * (s * H * (3 * D * b + 4) + s * H * D * b)
    assert cm.layer_comm_bytes(S, P, "token_ring") == pytest.approx((tr_fwd, tr_bwd), rel=1e-12)
    # H_kv = 2 < P = 4: k and v heads are replicated to P heads before the all-to-all
    ulysses = (P - 1) / P * (s * H * D * b + 2 * s * P * D * b + s * H * D * b)
    assert cm.layer_comm_bytes(S, P, "ulysses") == pytest.approx((ulysses, ulysses), rel=1e-12)
    ag = (P - 1) * 2 * s * kv * D * b
    assert cm.layer_comm_bytes(S, P, "allgather_kv") == pytest.approx((ag, ag), rel=1e-12)
    state = H * D * D * 4  # float32 states, as lasp2.py / zeco.py send them
    # LASP-2 gathers each rank's total log decay (float32, one per head) with its state: slices may differ in length
    assert cm.layer_comm_bytes(S, P, "lasp2") == pytest.approx(((P - 1) * (state + 4 * H), (P - 1) * state), rel=1e-12)
    assert cm.layer_comm_bytes(S, P, "zeco") == pytest.approx((state, state), rel=1e-12)
    for name in ("ring", "token_ring", "ulysses", "allgather_kv", "lasp2", "zeco"):
        assert cm.layer_comm_bytes(S, 1, name) == (0.0, 0.0)


def test_seq_time_matches_hand_computed_flops_and_overlap():
    coeffs = CostCoefficients(attention_efficiency=0.4, dense_efficiency=0.5, bandwidth_efficiency=0.9,
                              latency_scale=1.0, sequence_overhead_s=0.0)
    cluster = Cluster(16, 8, 500.0, 1e12, 300.0, 40.0, latency_s=5e-6)
    cm = CostModel(cluster, SMALL, coeffs)
    L, h, H, kv, D, f, V = 4, 1024, 8, 2, 128, 2816, 32000
    matmul = h * (H * D + 2 * kv * D) + H * D * h + 3 * h * f
    S = 20000
    dense = 6 * (L * matmul + h * V) * S / (500e12 * 0.5)
    attn_fwd = 2 * S * S * H * D / (500e12 * 0.4)
    assert cm.seq_time(S, 1, "ring") == pytest.approx(dense + L * 3.5 * attn_fwd, rel=1e-12)

    # ring across two nodes (P = 16 > 8 GPUs per node): inter-node bandwidth, overlap per step
    P, s = 16, S / 16
    beta = 40e9 * 0.9
    a_f, a_b = attn_fwd / P, 2.5 * attn_fwd / P
    fwd = a_f / P + (P - 1) * (max(a_f / P, 2 * s * kv * D * 2 / beta) + 5e-6)
    bwd = a_b / P + (P - 1) * (max(a_b / P, 2 * s * kv * D * 6 / beta) + 5e-6)
    assert cm.seq_time(S, P, "ring") == pytest.approx(dense / P + L * (fwd + bwd), rel=1e-12)

    # ulysses inside one node (P = 8): not overlapped, four all-to-alls each way
    P, s = 8, S / 8
    beta = 300e9 * 0.9
    one_way = (P - 1) / P * (2 * s * H * D * 2 + 2 * s * max(kv, P) * D * 2) / beta + 4 * (P - 1) * 5e-6
    expected = dense / P + L * (3.5 * attn_fwd / P + 2 * one_way)
    assert cm.seq_time(S, P, "ulysses") == pytest.approx(expected, rel=1e-12)


def test_degree_one_is_the_same_for_every_strategy():
    cm = small_model(8, 8)
    times = {name: cm.seq_time(5000, 1, name) for name in ("ulysses", "ring", "token_ring", "allgather_kv")}
    assert len(set(times.values())) == 1
    mems = {name: cm.seq_memory(5000, 1, name) for name in ("ulysses", "ring", "token_ring", "allgather_kv")}
    assert len(set(mems.values())) == 1


@pytest.mark.parametrize("kv_heads, winner", [(32, "token_ring"), (8, "ring")])
def test_ring_beats_token_ring_exactly_when_gqa_ratio_exceeds_two(kv_heads, winner):
    model = ModelSpec(num_layers=2, hidden=4096, num_heads=32, num_kv_heads=kv_heads, head_dim=128,
                      ffn_hidden=11008, vocab=32000)
    cm = CostModel(Cluster.dgx_h100(64), model)
    # communication-bound: short shards across nodes
    ring, token = cm.seq_time(4096, 64, "ring"), cm.seq_time(4096, 64, "token_ring")
    assert (ring < token) == (winner == "ring")


def test_ulysses_needs_the_degree_to_divide_the_heads():
    cm = small_model(16, 8)  # 8 heads
    assert cm.strategy_valid(8, "ulysses") and not cm.strategy_valid(16, "ulysses")
    with pytest.raises(ValueError, match="ulysses"):
        cm.seq_time(1000, 16, "ulysses")
    assert "ulysses" not in cm.strategy_names(16)


def test_memory_grows_with_length_and_shrinks_with_degree():
    cm = small_model(16, 8)
    for name in ("ring", "token_ring", "ulysses"):
        assert cm.seq_memory(2000, 2, name) < cm.seq_memory(4000, 2, name)
        assert cm.seq_memory(40000, 4, name) < cm.seq_memory(40000, 2, name)
    assert cm.seq_memory(1, 1, "ring") > cm.model_state_bytes()


def test_hybrid_models_name_both_strategies():
    hybrid = CostModel(Cluster.dgx_h100(64), ModelSpec.llama("2-7b").with_linear_layers(4))
    assert hybrid.model.num_linear_layers == 24 and hybrid.model.num_softmax_layers == 8
    # many ranks: LASP-2's all-gather moves P-1 states, ZeCO's pipeline one; few ranks: ZeCO's hops dominate
    assert hybrid.seq_time(8192, 64, "ring+zeco") < hybrid.seq_time(8192, 64, "ring+lasp2")
    # two ranks: both send one state once (ZeCO's piece rule gives one piece at P = 2), so they tie
    assert hybrid.seq_time(8192, 2, "ring+lasp2") <= hybrid.seq_time(8192, 2, "ring+zeco")
    with pytest.raises(ValueError, match="ring\\+zeco"):
        hybrid.seq_time(8192, 4, "ring")
    assert "ulysses+zeco" in hybrid.strategy_names(4)


def test_calibrate_recovers_the_coefficients_that_made_the_measurements():
    cluster = Cluster(16, 8, 400.0, 1e12, 200.0, 25.0, latency_s=10e-6)
    truth = CostModel(cluster, SMALL, CostCoefficients(0.37, 0.71, 0.55, 2.0, 3e-4))
    data = [Measurement(length, degree, name, truth.seq_time(length, degree, name))
            for length in (256, 2048, 16384, 65536) for degree in (1, 2, 8, 16) for name in ("ulysses", "ring")
            if truth.strategy_valid(degree, name)]
    fitted = CostModel(cluster, SMALL).calibrate(data)
    for name in ("attention_efficiency", "dense_efficiency", "bandwidth_efficiency", "latency_scale",
                 "sequence_overhead_s"):
        assert getattr(fitted.coefficients, name) == pytest.approx(getattr(truth.coefficients, name), rel=1e-3)
    for m in data:
        assert fitted.seq_time(m.length, m.degree, m.strategy) == pytest.approx(m.seconds, rel=1e-5)


def test_cost_model_rejects_bad_input():
    with pytest.raises(ValueError, match="world_size"):
        Cluster(0, 8, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelSpec(2, 64, 8, 3, 8, 128, 100)
    with pytest.raises(ValueError, match="layer_kinds"):
        ModelSpec(2, 64, 8, 2, 8, 128, 100, layer_kinds=("softmax", "mamba"))
    cm = small_model(8, 8)
    with pytest.raises(ValueError, match="length"):
        cm.seq_time(0, 1, "ring")
    with pytest.raises(ValueError, match="degree"):
        cm.seq_time(10, 16, "ring")
    with pytest.raises(ValueError, match="strategy"):
        cm.seq_time(10, 2, "ringg")
    with pytest.raises(ValueError, match="measurements"):
        cm.calibrate([])


# ---------------------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------------------


def power_of_two_partitions(world: int) -> list[tuple[int, ...]]:
    """Every multiset of powers of two summing to ``world`` (non-increasing tuples)."""
    out = []

    def rec(left: int, largest: int, acc: tuple[int, ...]) -> None:
        if left == 0:
            out.append(acc)
            return
        d = largest
        while d >= 1:
            if d <= left:
                rec(left - d, d, acc + (d,))
            d //= 2

    rec(world, world, ())
    return out


def brute_force_makespan(lengths: list[int], cm: CostModel, strategies=None) -> float:
    """The optimum under the packed model: every multiset of power-of-two group sizes covering the world, every
    assignment of sequences to groups (subset DP), each group on its best strategy and its best split into
    packed calls that each fit in memory."""
    strategies = planner_defaults("softmax") if strategies is None else strategies
    n = len(lengths)
    full = (1 << n) - 1
    mem = cm.cluster.mem_bytes

    @lru_cache(maxsize=None)
    def one_call(degree: int, name: str, mask: int) -> float:
        seqs = [lengths[i] for i in range(n) if mask >> i & 1]
        return cm.call_time(seqs, degree, name) if cm.call_memory(seqs, degree, name) <= mem else math.inf

    @lru_cache(maxsize=None)
    def calls_cost(degree: int, name: str, mask: int) -> float:
        """Least time of ``mask`` as calls run one after another: every split into calls is enumerated once
        (the call holding the lowest sequence, then the rest)."""
        if mask == 0:
            return 0.0
        low = mask & -mask
        rest = mask ^ low
        best, sub = math.inf, rest
        while True:
            best = min(best, one_call(degree, name, sub | low) + calls_cost(degree, name, rest ^ sub))
            if sub == 0:
                return best
            sub = (sub - 1) & rest

    @lru_cache(maxsize=None)
    def subset_cost(degree: int, mask: int) -> float:
        names = [name for name in strategies if cm.strategy_valid(degree, name)]
        return min((calls_cost(degree, name, mask) for name in names), default=math.inf)

    best = math.inf
    for partition in power_of_two_partitions(cm.cluster.world_size):
        # f[mask]: best makespan giving exactly the sequences in mask to the groups seen so far
        f = {0: 0.0}
        for degree in partition:
            g = {}
            for mask in range(full + 1):
                value = math.inf
                sub = mask
                while True:  # every subset ``sub`` of ``mask`` goes to this group
                    rest = mask ^ sub
                    if rest in f:
                        value = min(value, max(f[rest], subset_cost(degree, sub)))
                    if sub == 0:
                        break
                    sub = (sub - 1) & mask
                if value < math.inf:
                    g[mask] = value
            f = g
        best = min(best, f.get(full, math.inf))
    return best


def tiny_instances():
    """(world, gpus per node, lengths, cost model family), seeded."""
    rng = np.random.default_rng(7)
    cases = []
    for world, per_node in ((4, 4), (8, 4), (8, 8)):
        for n in (1, 3, 5, 8):  # long-tail lengths on a fast cluster
            lengths = np.exp(rng.uniform(np.log(200), np.log(60000), n)).astype(int).tolist()
            cases.append((world, per_node, lengths, "fast"))
        for n in (4, 6, 8):  # similar lengths on slow links: the mix of group sizes matters
            cases.append((world, per_node, rng.integers(200, 9000, n).tolist(), "slow"))
    return cases


def tiny_model(world: int, per_node: int, family: str) -> CostModel:
    return small_model(world, per_node) if family == "fast" else slow_links_model(world, per_node)


def best_static_makespan(lengths, cm) -> float:
    best = math.inf
    degree = 1
    while degree <= cm.cluster.world_size:
        for name in ("ulysses", "ring", "token_ring"):
            try:
                best = min(best, static_plan(lengths, cm, degree, name).makespan_s)
            except ValueError:
                pass
        degree *= 2
    return best


@pytest.mark.parametrize("world, per_node, lengths, family", tiny_instances())
def test_plan_matches_brute_force_optimum_on_tiny_instances(world, per_node, lengths, family):
    cm = tiny_model(world, per_node, family)
    plan = plan_step(lengths, cm, time_limit_s=20.0)
    plan.validate(lengths, cm)
    optimum = brute_force_makespan(lengths, cm)
    assert plan.solver_status == "optimal"
    assert plan.bucket_cost_ratio == 1.0
    assert plan.makespan_s == pytest.approx(optimum, rel=1e-9)
    lower = makespan_lower_bound(lengths, cm)
    refined = makespan_lower_bound(lengths, cm, refined=True)
    assert lower <= refined <= optimum * (1 + 1e-12)


def solve_tiny_milp(world, per_node, lengths, family):
    """The MILP (CBC, to optimality) on a tiny instance, warm-started from its best homogeneous plan:
    ``(cost model, problem, that homogeneous plan, result)``."""
    cm = tiny_model(world, per_node, family)
    problem = Problem(lengths, cm, strategies=("ulysses", "ring", "token_ring"), linear_strategies=())
    homogeneous = min(_homogeneous(problem), key=lambda h: problem.makespan(h[1], h[2]))
    result = solve_milp(problem, make_buckets(problem, 16), [(homogeneous[1], homogeneous[2])],
                        time_limit_s=20.0, rel_gap=1e-9, solver="cbc")
    return cm, problem, homogeneous, result


@pytest.mark.parametrize("world, per_node, lengths, family", [c for c in tiny_instances() if c[3] == "slow"])
def test_milp_decodes_without_loss_and_packing_only_helps(world, per_node, lengths, family):
    # The MILP optimises the additive surrogate (Problem docstring); with a slot per group (world <= SLOTS) and
    # a bucket per length its solution decodes to a plan whose surrogate makespan IS its objective, and the
    # packed model (what the runtime runs) never scores that plan slower, for the softmax strategies.
    cm, problem, homogeneous, result = solve_tiny_milp(world, per_node, lengths, family)
    assert result.status == "optimal"
    # (CBC writes its objective with 8 or 9 significant digits)
    assert problem.makespan(result.group_shapes, result.assign) == pytest.approx(result.objective, rel=1e-7)
    packed = problem.to_plan(result.group_shapes, result.assign, status="feasible", note="")
    packed.validate(lengths, cm)
    assert packed.makespan_s >= brute_force_makespan(lengths, cm, ("ulysses", "ring", "token_ring")) * (1 - 1e-12)
    if packed.num_micro_batches == 1:  # (a group whose packed call does not fit pays per micro-batch)
        assert packed.makespan_s <= result.objective * (1 + 1e-7)


def test_tiny_instances_are_hard_enough_to_catch_a_weak_planner():
    # Guard for the tests above: on several slow-link instances the best static plan (the MILP's warm
    # start) is clearly worse than the optimum, so only a real optimiser passes.
    gaps = 0
    for world, per_node, lengths, family in tiny_instances():
        if family == "slow":
            cm = tiny_model(world, per_node, family)
            gaps += best_static_makespan(lengths, cm) > 1.05 * brute_force_makespan(lengths, cm)
    assert gaps >= 3


def test_bucketing_error_stays_within_the_documented_bound():
    # on the MILP's own (surrogate) terms: 3 buckets cost at most bucket_cost_ratio more than one per length
    cm = small_model(8, 4)
    lengths = [300, 900, 2500, 4000, 7000, 12000, 21000, 50000]
    problem = Problem(lengths, cm)
    homogeneous = min(_homogeneous(problem), key=lambda h: problem.makespan(h[1], h[2]))
    warm = [(homogeneous[1], homogeneous[2])]
    exact = solve_milp(problem, make_buckets(problem, 16), warm, time_limit_s=20.0, rel_gap=1e-9, solver="cbc")
    buckets = make_buckets(problem, 3)
    coarse = solve_milp(problem, buckets, warm, time_limit_s=20.0, rel_gap=1e-9, solver="cbc")
    assert exact.status == coarse.status == "optimal" and buckets.cost_ratio > 1.0
    assert exact.objective * (1 - 1e-9) <= problem.makespan(coarse.group_shapes, coarse.assign)
    assert problem.makespan(coarse.group_shapes, coarse.assign) <= coarse.objective * (1 + 1e-9)
    assert coarse.objective <= exact.objective * buckets.cost_ratio * (1 + 1e-9)


def test_dealing_charges_each_part_at_most_its_share_of_the_mean_plus_the_spread():
    # the lemma behind the pools' area charge (milp._deal): for ANY cost nondecreasing in the length
    from seqpar.solver.milp import _deal

    rng = np.random.default_rng(5)
    for _ in range(300):
        size = int(rng.integers(1, 40))
        lengths = np.sort(rng.integers(1, 1000, size))[::-1]  # longest first, as dealt
        cuts = np.sort(rng.choice(np.arange(1, size), int(rng.integers(0, min(size, 6))), replace=False)) if size > 1 \
            else np.array([], dtype=int)
        shares = np.diff(np.r_[0, cuts, size]).tolist()
        parts = _deal(np.arange(size), shares)
        assert [len(part) for part in parts] == shares
        assert sorted(itertools.chain(*parts)) == list(range(size))
        for cost in (lengths.astype(float), lengths.astype(float) ** 2, np.minimum(lengths, 500).astype(float)):
            mean, spread = cost.mean(), cost.max() - cost.min()
            for share, part in zip(shares, parts):
                assert cost[part].sum() <= share * mean + spread + 1e-9


def test_pool_charge_bounds_the_slowest_list_scheduled_group():
    # what makes the MILP's pools decode without loss: longest first to the least-loaded of m groups never
    # ends above pool_charge (computed from bucket bounds, as the MILP sees them)
    from seqpar.solver.milp import _lpt, pool_charge

    rng = np.random.default_rng(6)
    for _ in range(400):
        groups = int(rng.integers(1, 9))
        n_buckets = int(rng.integers(1, 5))
        edges = np.sort(rng.random(n_buckets + 1)) * 3
        count = rng.integers(0, 12, n_buckets)
        if count.sum() == 0:
            continue
        times = np.concatenate([rng.uniform(edges[b], edges[b + 1], count[b]) for b in range(n_buckets)])
        bucket = np.repeat(np.arange(n_buckets), count)
        area = np.bincount(bucket, weights=times, minlength=n_buckets)
        longest = np.where(count > 0, [times[bucket == b].max() if count[b] else 0 for b in range(n_buckets)], 0)
        loads = np.bincount(_lpt(times, groups), weights=times, minlength=groups)
        const = float(rng.random())
        assert const + loads.max() <= pool_charge(const, area, longest, count, groups) + 1e-12


@pytest.mark.parametrize("world, per_node", [(64, 8), (256, 8)])
def test_milp_with_pools_decodes_within_its_objective(world, per_node):
    # at large worlds small groups are pooled (m[s] groups of a shape sharing counts); the decoded plan's
    # surrogate makespan must not exceed the MILP's objective (the issue measured 22-29% lost by the old pools)
    cm = CostModel(Cluster(world, per_node, 989.0, 80e9, 450.0, 50.0), ModelSpec.llama("2-7b"))
    lengths = long_tail_lengths(4 * world, seed=1, max_len=65536).tolist()
    problem = Problem(lengths, cm)
    homogeneous = min(_homogeneous(problem), key=lambda h: problem.makespan(h[1], h[2]))
    solver = "highs" if importlib.util.find_spec("highspy") else "cbc"  # HiGHS returns the warm start at least
    result = solve_milp(problem, make_buckets(problem, 24), [(homogeneous[1], homogeneous[2])],
                        time_limit_s=10.0, rel_gap=1e-3, solver=solver)
    assert not isinstance(result, str), result
    assert "pooled shapes" in result.note and " 0 pooled" not in result.note
    assert result.decoded_s == pytest.approx(problem.makespan(result.group_shapes, result.assign), rel=1e-12)
    assert result.decoded_s <= result.objective * (1 + 1e-7)
    assert result.objective <= problem.makespan(homogeneous[1], homogeneous[2]) * 1.5  # it did not give up
    problem.to_plan(result.group_shapes, result.assign, status="feasible", note="").validate(lengths, cm)


@pytest.mark.parametrize("world, per_node, lengths, family", [c for c in tiny_instances() if c[0] == 8][::3])
def test_milp_pools_on_tiny_instances_decode_within_their_objective(world, per_node, lengths, family, monkeypatch):
    # two unit slots per size: groups of degree < 4 are pooled even at 8 ranks, where brute force is possible
    from seqpar.solver import milp

    monkeypatch.setattr(milp, "SLOTS", 2)
    cm, problem, homogeneous, result = solve_tiny_milp(world, per_node, lengths, family)
    assert result.status == "optimal"
    assert result.decoded_s <= result.objective * (1 + 1e-7)
    assert result.objective <= problem.makespan(homogeneous[1], homogeneous[2]) * (1 + 1e-7)  # the warm start
    packed = problem.to_plan(result.group_shapes, result.assign, status="feasible", note="")
    packed.validate(lengths, cm)
    assert packed.makespan_s >= brute_force_makespan(lengths, cm, ("ulysses", "ring", "token_ring")) * (1 - 1e-12)


def test_bucket_cuts_minimise_the_overstatement_exhaustively():
    rng = np.random.default_rng(3)

    def overstatement(ends, proxy, counts):
        total, lo = 0.0, 0
        for e in ends:
            total += float(((proxy[e] - proxy[lo:e + 1]) * counts[lo:e + 1]).sum())
            lo = e + 1
        return total

    for _ in range(150):
        n = int(rng.integers(2, 9))
        proxy, counts = np.sort(rng.random(n) * 10), rng.integers(1, 5, n)
        seg = np.sort(rng.integers(0, 2, n))  # a memory limit may split the lengths in two segments
        k = max(int(rng.integers(1, 5)), int(seg[-1] - seg[0]) + 1)
        ends = _dp_ends(proxy, counts, seg, k)
        best = math.inf
        for r in range(min(k, n)):
            for cuts in itertools.combinations(range(n - 1), r):
                e, lo, ok = list(cuts) + [n - 1], 0, True
                for x in e:
                    ok &= seg[lo] == seg[x]
                    lo = x + 1
                if ok:
                    best = min(best, overstatement(e, proxy, counts))
        assert len(ends) <= k and ends[-1] == n - 1
        assert overstatement(ends, proxy, counts) == pytest.approx(best, abs=1e-9)


def test_memory_decides_the_degree_when_a_sequence_is_too_long_for_one_gpu():
    cm = small_model(8, 8, fit_tokens=4000)
    lengths = [30000, 500, 500, 500]
    plan = plan_step(lengths, cm, time_limit_s=20.0)
    plan.validate(lengths, cm)
    long_group = next(g for g in plan.groups if 0 in g.seq_indices)
    assert long_group.degree >= 8  # 30000 / 4000 tokens per GPU, rounded up to a power of two


# ---------------------------------------------------------------------------------------------------------
# long-tail batches, baselines, fallbacks
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_tail():
    cm = CostModel(Cluster.dgx_h100(64), ModelSpec.llama("2-7b"))
    lengths = long_tail_lengths(512, seed=3, max_len=131072).tolist()
    # 3 s: the budget is a hard deadline, and on a loaded machine 1 s left the MILP no time (status "greedy")
    return cm, lengths, plan_step(lengths, cm, time_limit_s=3.0)


def test_plan_is_valid_and_never_slower_than_any_static_plan(long_tail):
    cm, lengths, plan = long_tail
    plan.validate(lengths, cm)
    assert plan.solver_status in ("optimal", "feasible")
    degrees = {g.degree for g in plan.groups if g.seq_indices}
    assert len(degrees) > 1, "a long-tail batch should use groups of different sizes"
    for degree in (1, 2, 4, 8, 16, 32, 64):
        for name in ("ulysses", "ring", "token_ring"):
            try:
                static = static_plan(lengths, cm, degree, name)
            except ValueError:
                continue  # too long for this degree, or ulysses cannot split the heads
            static.validate(lengths, cm)
            assert plan.makespan_s <= static.makespan_s
    assert plan.makespan_s >= makespan_lower_bound(lengths, cm, refined=True)


def test_plan_round_trips_through_json_exactly(long_tail):
    _, _, plan = long_tail
    text = plan.to_json()
    again = Plan.from_json(text.encode())
    assert again == plan and again.to_json() == text
    with pytest.raises(ValueError, match="Plan.to_json"):
        Plan.from_json('{"groups": 3}')


def test_validate_catches_broken_plans():
    cm = small_model(8, 4)
    lengths = [1000, 2000, 3000]
    good = static_plan(lengths, cm, 2, "ring")

    def broken(edit) -> Plan:
        plan = Plan.from_json(good.to_json())
        edit(plan)
        return plan

    def overlap(p):
        p.groups[1].ranks = p.groups[0].ranks

    def straddle(p):  # (3, 4) crosses the node boundary at rank 4 without covering whole nodes
        p.groups[1].ranks, p.groups[2].ranks = (3, 4), (2, 5)

    def lost(p):
        for g in p.groups:
            g.seq_indices = [i for i in g.seq_indices if i != 1]

    def slower(p):
        p.makespan_s *= 1.01

    for edit, message in ((overlap, "shares ranks"), (straddle, "straddle"), (lost, "sequences \\[1\\]"),
                          (slower, "makespan_s")):
        with pytest.raises(ValueError, match=message):
            broken(edit).validate(lengths, cm)
    tight = small_model(8, 4, fit_tokens=1500)
    with pytest.raises(ValueError, match="mem_bytes"):
        good.validate(lengths, tight)


def test_validate_checks_each_groups_strategy_pair_against_the_registry_and_the_layer_kinds():
    lengths = [1000, 2000, 3000]
    softmax_only = small_model(16, 8)
    hybrid = CostModel(softmax_only.cluster, SMALL.with_linear_layers(2))
    cases = [  # (cost model, static plan's strategy, group field, wrong value, message)
        (softmax_only, "ring", "linear_strategy", "zeco", "linear_strategy='zeco', but the model has no linear"),
        (softmax_only, "ring", "softmax_strategy", None, "softmax_strategy is None, but the model has softmax"),
        (softmax_only, "ring", "softmax_strategy", "zeco", "softmax_strategy: unknown softmax strategy 'zeco'"),
        (softmax_only, "ring", "softmax_strategy", "megatron", "softmax_strategy: unknown softmax strategy 'megatron'"),
        (hybrid, "ring+zeco", "linear_strategy", None, "linear_strategy is None, but the model has linear"),
        (hybrid, "ring+zeco", "linear_strategy", "ring", "linear_strategy: unknown linear strategy 'ring'"),
    ]
    for cm, strategy, field, value, message in cases:
        plan = static_plan(lengths, cm, 2, strategy)
        plan.validate(lengths, cm)
        setattr(plan.groups[1], field, value)
        with pytest.raises(ValueError, match=f"group 1 {message}"):
            plan.validate(lengths, cm)
    # a registered pair at a degree where it cannot run: 8 heads do not split 16 ways
    plan = static_plan(lengths, softmax_only, 16, "ring")
    plan.groups[0].softmax_strategy = "ulysses"
    with pytest.raises(ValueError, match="cannot run at degree 16: ulysses needs the degree 16 to divide num_heads=8"):
        plan.validate(lengths, softmax_only)


def test_falls_back_to_greedy_when_cbc_is_missing(monkeypatch):
    cm = small_model(8, 4)
    lengths = [400, 1200, 30000, 9000, 700, 2000, 5000, 300, 800]  # more than the exact search takes
    monkeypatch.setattr(pulp.PULP_CBC_CMD, "available", lambda self: False)
    plan = plan_step(lengths, cm, time_limit_s=5.0, solver="cbc")
    plan.validate(lengths, cm)
    assert plan.solver_status == "greedy" and "cbc is not available" in plan.note


def test_highs_without_highspy_is_unavailable_not_unbounded(monkeypatch):
    # a highs executable on PATH used to be run in highspy's place, with no way to stop it at the deadline
    cm = small_model(8, 4)
    lengths = [400, 1200, 30000, 9000, 700, 2000, 5000, 300, 800]
    monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
    monkeypatch.setattr(pulp.HiGHS_CMD, "available", lambda self: True)
    monkeypatch.setattr(pulp.HiGHS_CMD, "actualSolve", lambda self, lp, **kw: pytest.fail("ran HiGHS_CMD"))
    plan = plan_step(lengths, cm, time_limit_s=5.0, solver="highs")
    plan.validate(lengths, cm)
    assert plan.solver_status == "greedy" and "highs is not available (pip install highspy" in plan.note


def test_falls_back_to_greedy_when_the_solver_finds_nothing(monkeypatch):
    cm = small_model(8, 4)
    lengths = [400, 1200, 30000, 9000, 700, 2000, 5000, 300, 800]  # more than the exact search takes

    def no_solution(self, solver=None, **kwargs):
        self.status, self.sol_status = pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound
        return self.status

    monkeypatch.setattr(pulp.LpProblem, "solve", no_solution)
    plan = plan_step(lengths, cm, time_limit_s=5.0, solver="cbc")
    plan.validate(lengths, cm)
    assert plan.solver_status == "greedy" and "no solution" in plan.note
    assert plan_step(lengths, cm, solver="greedy").solver_status == "greedy"


def test_hybrid_model_plans_use_linear_strategies():
    cm = CostModel(Cluster.dgx_h100(16), ModelSpec.llama("3-8b").with_linear_layers(4))
    lengths = long_tail_lengths(64, seed=1, max_len=65536).tolist()
    plan = plan_step(lengths, cm, time_limit_s=2.0)
    plan.validate(lengths, cm)
    assert all("+" in g.strategy for g in plan.groups)


@pytest.mark.parametrize("use_process", [False, True])
def test_prefetcher_hands_back_the_plan_of_each_step(use_process):
    cm = small_model(8, 4)
    steps = {0: [500, 7000, 20000], 1: [100, 200, 300, 40000]}
    with PlanPrefetcher(cm, use_process=use_process, time_limit_s=10.0) as prefetcher:
        for step, lengths in steps.items():
            prefetcher.submit(step, lengths)
        for step, lengths in steps.items():
            plan = prefetcher.get(step, timeout=30)
            plan.validate(lengths, cm)
            assert plan.makespan_s == pytest.approx(brute_force_makespan(lengths, cm), rel=1e-9)
        with pytest.raises(ValueError, match="not submitted"):
            prefetcher.get(5)
        prefetcher.submit(2, [])
        with pytest.raises(ValueError, match="empty"):
            prefetcher.get(2, timeout=30)


def test_prefetcher_worker_process_returns_a_broadcastable_plan():
    cm = small_model(8, 4)
    lengths = [500, 7000, 20000]
    with PlanPrefetcher(cm, time_limit_s=10.0) as prefetcher:
        prefetcher.submit(0, lengths)
        plan = prefetcher.get(0, timeout=60)
    plan.validate(lengths, cm)
    assert Plan.from_json(plan.to_json()) == plan


def test_a_killed_prefetcher_worker_fails_the_waiting_step_instead_of_hanging():
    cm = small_model(8, 4)
    prefetcher = PlanPrefetcher(cm, time_limit_s=10.0)
    prefetcher.submit(0, [500, 7000, 20000])
    os.kill(prefetcher.worker_pid, signal.SIGKILL)  # before it can answer: its start-up alone takes longer
    started = time.perf_counter()
    with pytest.raises(WorkerExited, match="exited with code -9"):
        prefetcher.get(0, timeout=60)
    assert time.perf_counter() - started < 10
    with pytest.raises(WorkerExited, match="has exited"):
        prefetcher.submit(1, [100, 200])
    prefetcher.close()


def test_dropping_a_prefetcher_ends_its_worker_process():
    prefetcher = PlanPrefetcher(small_model(8, 4), time_limit_s=10.0)
    prefetcher.submit(0, [500, 7000])
    process = prefetcher._process
    del prefetcher
    gc.collect()
    assert process.wait(timeout=30) == 0  # its input closed: it finished the solve and exited by itself


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths, message", [
    ([], "empty"),
    ([100, 0], "seq_lens\\[1\\]=0 must be positive"),
    ([100, -5], "positive"),
    ([100, 2.5], "integer"),
    ([10_000_000], "does not fit in memory even on all 8 ranks"),
])
def test_plan_step_rejects_bad_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        plan_step(lengths, small_model(8, 4))


def test_plan_step_rejects_bad_clusters_and_options():
    lengths = [100, 200]
    with pytest.raises(ValueError, match="gpus_per_node=6"):
        plan_step(lengths, CostModel(Cluster(16, 6, 100.0, 80e9, 200.0, 25.0), SMALL))
    cm = small_model(8, 4)
    with pytest.raises(ValueError, match="strategies"):
        plan_step(lengths, cm, strategies=("ring", "megatron"))
    with pytest.raises(ValueError, match="solver"):
        plan_step(lengths, cm, solver="gurobi")
    with pytest.raises(ValueError, match="time_limit_s"):
        plan_step(lengths, cm, time_limit_s=0)
    with pytest.raises(ValueError, match="degree"):
        static_plan(lengths, cm, 3, "ring")
    with pytest.raises(ValueError, match="ulysses"):
        static_plan(lengths, small_model(16, 8), 16, "ulysses")
    with pytest.raises(ValueError, match="use a larger degree"):
        static_plan([30000], small_model(8, 4, fit_tokens=4000), 2, "ring")


def test_world_within_one_node_need_not_fill_it():
    cm = CostModel(Cluster(4, 8, 100.0, 80e9, 200.0, 25.0), SMALL)
    plan = plan_step([100, 5000, 9000], cm, time_limit_s=5.0)
    plan.validate([100, 5000, 9000], cm)
    assert sorted(r for g in plan.groups for r in g.ranks) == list(range(4))


def test_solver_sources_never_import_torch():
    # seqpar.solver must run where torch.distributed is absent (rank 0's planning worker); note that
    # ``import seqpar.solver`` still runs seqpar/__init__.py, so this checks the solver's own imports
    import ast
    import pathlib

    import seqpar.solver

    for path in pathlib.Path(seqpar.solver.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path.name


def test_partition_enumeration_is_complete():
    # the brute force is only as good as its enumeration: 8 has 10 partitions into powers of two
    parts = power_of_two_partitions(8)
    assert len(parts) == len(set(parts)) == 10
    assert all(sum(p) == 8 for p in parts)
    assert set(itertools.chain.from_iterable(parts)) == {1, 2, 4, 8}


def _fastest_static_s(lengths, cm):
    """The fastest static_plan over every degree and strategy, each timed on its own."""
    statics = []
    for degree in cm.cluster.degrees():
        for strategy in cm.strategy_names(degree):
            try:
                statics.append(static_plan(lengths, cm, degree, strategy).makespan_s)
            except ValueError:  # does not fit at this degree
                pass
    return min(statics)


@pytest.mark.parametrize("lengths", [[400, 1200, 30000, 9000, 700],
                                     [400, 1200, 30000, 9000, 700, 2000, 5000, 300, 800]],
                         ids=["exact search", "search"])
def test_plan_reports_the_fastest_static_plan(lengths):
    # Plan.static_makespan_s is what the runtime judges planning's gain by (StepRunner.plan_ahead_budget): it
    # must be the fastest static_plan of the step, every degree and strategy timed on their own
    cm = small_model(8, 4)
    plan = plan_step(lengths, cm, time_limit_s=2.0)
    assert plan.static_makespan_s == pytest.approx(_fastest_static_s(lengths, cm), rel=1e-12)
    assert plan.makespan_s <= plan.static_makespan_s
    assert Plan.from_json(plan.to_json()).static_makespan_s == plan.static_makespan_s


def test_min_gain_keeps_the_static_plan_unless_the_exact_plan_beats_it_by_more():
    # slow links: the optimum mixes group sizes and is 22% faster than any static plan; a plan is returned over the
    # fastest static one only when predicted faster by MORE than min_gain, so the threshold is tested at both sides
    cm = slow_links_model(8, 4)
    lengths = [1000, 1000, 9000, 6000, 6000]
    static_s = _fastest_static_s(lengths, cm)
    free = plan_step(lengths, cm, time_limit_s=2.0)
    gain = static_s / free.makespan_s - 1
    assert gain > 0.2 and free.solver_status == "optimal"
    taken = plan_step(lengths, cm, time_limit_s=2.0, min_gain=gain * (1 - 1e-6))
    assert taken.makespan_s == pytest.approx(free.makespan_s, rel=1e-12) and taken.solver_status == "optimal"
    kept = plan_step(lengths, cm, time_limit_s=2.0, min_gain=gain * (1 + 1e-6))
    kept.validate(lengths, cm)
    assert kept.makespan_s == pytest.approx(static_s, rel=1e-12)
    assert kept.static_makespan_s == pytest.approx(static_s, rel=1e-12)
    assert len({(g.degree, g.softmax_strategy) for g in kept.groups if g.seq_indices}) == 1
    assert kept.solver_status != "optimal" and "kept the fastest static plan" in kept.note


def test_plan_margin_is_min_gains_default_in_the_search():
    cm = slow_links_model(8, 4)
    lengths = [6000, 300, 200, 250, 400, 350, 500, 220, 260, 5000, 310]  # past the exact search: MILP and searches
    static_s = _fastest_static_s(lengths, cm)
    assert plan_step(lengths, cm, time_limit_s=2.0).makespan_s < static_s * (1 - 0.03)  # 6% faster
    wary = replace(cm, coefficients=replace(cm.coefficients, plan_margin=0.5))
    kept = plan_step(lengths, wary, time_limit_s=2.0)
    kept.validate(lengths, wary)
    # one degree and strategy for every group (the planner's own static layout may pack a little better)
    assert len({(g.degree, g.softmax_strategy) for g in kept.groups}) == 1
    assert kept.makespan_s <= static_s * (1 + 1e-12) and "kept the fastest static plan" in kept.note
    taken = plan_step(lengths, wary, time_limit_s=2.0, min_gain=0.03)  # the argument wins over the default
    assert taken.makespan_s < static_s * (1 - 0.03)
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="min_gain"):
            plan_step(lengths, cm, min_gain=bad)
    with pytest.raises(ValueError, match="plan_margin"):
        CostCoefficients(plan_margin=1.0)


def test_calibrate_sets_plan_margin_to_the_fits_rms_relative_error():
    cluster = Cluster(16, 8, 400.0, 1e12, 200.0, 25.0, latency_s=10e-6)
    truth = CostModel(cluster, SMALL, CostCoefficients(0.37, 0.71, 0.55, 2.0, 3e-4))
    shapes = [(length, degree, name) for length in (256, 2048, 16384, 65536) for degree in (1, 2, 8, 16)
              for name in ("ulysses", "ring") if truth.strategy_valid(degree, name)]
    exact = truth.calibrate([Measurement(n, p, s, truth.seq_time(n, p, s)) for n, p, s in shapes])
    assert exact.coefficients.plan_margin < 1e-4  # measurements the model's form describes exactly
    # +-10% noise: the fit absorbs part of it, the rest is the margin, recomputed here from the fitted times
    noisy = [Measurement(n, p, s, truth.seq_time(n, p, s) * math.exp(0.1 if k % 2 else -0.1))
             for k, (n, p, s) in enumerate(shapes)]
    fitted = CostModel(cluster, SMALL).calibrate(noisy)
    rms = math.sqrt(sum(math.log(fitted.seq_time(m.length, m.degree, m.strategy) / m.seconds) ** 2
                        for m in noisy) / len(noisy))
    assert fitted.coefficients.plan_margin == pytest.approx(rms, rel=1e-9)
    assert 0.05 < fitted.coefficients.plan_margin <= 0.1


# ---------------------------------------------------------------------------------------------------------
# shape_scales: static plans timed on the run's own batches set each shape's level
# ---------------------------------------------------------------------------------------------------------


def _scaled(cm: CostModel, **scales: float) -> CostModel:
    """``cm`` with ``shape_scales`` from ``strategy_degree=scale`` keywords (``ring_2=1.7``)."""
    entries = tuple((key.rsplit("_", 1)[0], int(key.rsplit("_", 1)[1]), value) for key, value in scales.items())
    return replace(cm, coefficients=replace(cm.coefficients, shape_scales=entries))


def test_shape_scales_multiply_every_time_of_their_shape_and_no_other():
    cm = slow_links_model(8, 4)
    scaled = _scaled(cm, ring_2=1.7, ulysses_1=0.6)
    lengths = [3000, 250, 700, 40]
    for (degree, name), factor in {(2, "ring"): 1.7, (1, "ulysses"): 0.6, (2, "ulysses"): 1.0,
                                   (4, "ring"): 1.0}.items():
        assert scaled.call_time(lengths, degree, name) == pytest.approx(factor * cm.call_time(lengths, degree, name),
                                                                        rel=1e-12)
        np.testing.assert_allclose(scaled.seq_times(lengths, degree, name),
                                   factor * cm.seq_times(lengths, degree, name), rtol=1e-12)
        assert scaled.call_overhead(degree, name) == pytest.approx(factor * cm.call_overhead(degree, name),
                                                                   rel=1e-12)
        for got, want in zip(scaled.call_time_minorants(lengths, degree, name),
                             cm.call_time_minorants(lengths, degree, name)):
            np.testing.assert_allclose(got, factor * np.asarray(want), rtol=1e-12)
    # the planner's plans are scored with the scaled times (validate re-derives every group's time)
    plan = plan_step(lengths * 3, scaled, time_limit_s=2.0)
    plan.validate(lengths * 3, scaled)


def test_lower_bound_scales_with_the_shapes_so_it_stays_below_every_plan():
    cm = slow_links_model(8, 4)
    lengths = [900] * 40  # the compute rank-seconds term of the bound dominates
    half = _scaled(cm, **{f"{name}_{degree}": 0.5 for degree in (1, 2, 4, 8)
                          for name in cm.strategy_names(degree)})
    assert makespan_lower_bound(lengths, half) == pytest.approx(0.5 * makespan_lower_bound(lengths, cm), rel=1e-12)
    one_fast = _scaled(cm, ulysses_1=0.25)  # only degree 1 runs faster: no plan beats the bound
    plan = plan_step(lengths, one_fast, time_limit_s=2.0)
    assert makespan_lower_bound(lengths, one_fast) <= plan.makespan_s * (1 + 1e-12)


def test_calibrate_static_scales_makes_static_plans_predict_their_measurements():
    from seqpar.solver import StaticPlanMeasurement, calibrate_static_scales

    cm = slow_links_model(8, 4)
    batches = [[3000, 250, 700, 40, 90], [1200, 1100, 30]]
    shapes = [(1, "ulysses"), (2, "ring"), (4, "ulysses")]
    truth = {(1, "ulysses"): 0.8, (2, "ring"): 1.3, (4, "ulysses"): 2.0}
    # one batch per shape: the scaled static plans take exactly what was measured
    once = [StaticPlanMeasurement(tuple(batches[0]), d, s, truth[(d, s)] * static_plan(batches[0], cm, d, s).makespan_s)
            for d, s in shapes]
    fitted = calibrate_static_scales(cm, once)
    for m in once:
        assert static_plan(list(m.lengths), fitted, m.degree, m.strategy).makespan_s == pytest.approx(m.seconds,
                                                                                                    rel=1e-9)
    assert fitted.coefficients.plan_margin == 0.0  # nothing left over: the model's own margin (0) stands
    # two batches per shape measured 10% above and below the truth: the geometric mean, and the spread as margin
    twice = [StaticPlanMeasurement(tuple(b), d, s, truth[(d, s)] * math.exp(sign * 0.1)
                                   * static_plan(b, cm, d, s).makespan_s)
             for d, s in shapes for b, sign in zip(batches, (1, -1))]
    fitted = calibrate_static_scales(_scaled(cm, ring_2=5.0), twice)  # scales already there are replaced
    assert dict(((s, d), scale) for s, d, scale in fitted.coefficients.shape_scales) == pytest.approx(
        {(s, d): v for (d, s), v in truth.items()}, rel=1e-12)
    # residuals +-0.1 on 6 measurements, 3 scales fitted: sqrt(6 * 0.01 / 3)
    assert fitted.coefficients.plan_margin == pytest.approx(math.sqrt(0.02), rel=1e-9)
    with pytest.raises(ValueError, match="measurements is empty"):
        calibrate_static_scales(cm, [])
    with pytest.raises(ValueError, match="seconds"):
        StaticPlanMeasurement((10,), 1, "ulysses", 0.0)


def test_shape_scales_survive_json_and_bad_entries_are_refused():
    import json
    from dataclasses import asdict

    coefficients = CostCoefficients(shape_scales=(("ring", 2, 1.25), ("ulysses", 1, 0.5)))
    assert CostCoefficients(**json.loads(json.dumps(asdict(coefficients)))) == coefficients
    assert coefficients.shape_scale("ring", 2) == 1.25 and coefficients.shape_scale("ring", 4) == 1.0
    for bad in ((("ring", 2, 0.0),), (("ring", 0, 1.0),), (("ring", 2, float("inf")),), (("ring", 2),),
                (("ring", 2, 1.0), ("ring", 2, 2.0)), (("ring", True, 1.0),)):
        with pytest.raises(ValueError, match="shape_scales"):
            CostCoefficients(shape_scales=bad)
    cm = slow_links_model(8, 4)
    for misspelt in (("rign", 2, 1.5), ("ring", 16, 1.5)):  # unknown strategy; a degree above the world
        with pytest.raises(ValueError, match="shape_scales"):
            _scaled(cm, **{f"{misspelt[0]}_{misspelt[1]}": misspelt[2]})


def test_calibrate_fits_the_formulas_without_the_scales():
    cluster = Cluster(16, 8, 400.0, 1e12, 200.0, 25.0, latency_s=10e-6)
    truth = CostModel(cluster, SMALL, CostCoefficients(0.37, 0.71, 0.55, 2.0, 3e-4))
    data = [Measurement(n, p, "ring", truth.seq_time(n, p, "ring")) for n in (256, 4096, 65536) for p in (1, 2, 8)]
    fitted = _scaled(CostModel(cluster, SMALL), ring_2=3.0).calibrate(data)
    assert fitted.coefficients.shape_scales == ()
    assert fitted.coefficients.plan_margin < 1e-4
