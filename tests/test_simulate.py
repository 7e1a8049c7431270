"""bench/simulate.py: every reproduced comparison comes from the cost model and points the way its paper does.

Fast (a few seconds): the analytic comparisons are closed-form; the FlexSP one runs ``plan_step`` once, greedy,
at 16 ranks. Each test prints the model's number next to the paper's (``pytest -s`` shows them).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from seqpar.solver import CostCoefficients, CostModel, ModelSpec

_PATH = Path(__file__).resolve().parents[1] / "bench" / "simulate.py"
_spec = importlib.util.spec_from_file_location("bench_simulate", _PATH)
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


@pytest.fixture(scope="module")
def lasp2():
    return sim.compare_lasp2()


@pytest.fixture(scope="module")
def zeco():
    return sim.compare_zeco()


@pytest.fixture(scope="module")
def tokenring():
    return sim.compare_tokenring()


@pytest.fixture(scope="module")
def flexsp():
    return sim.compare_flexsp(worlds=(16,), solver="greedy", time_limit_s=0.5, no_latency_check=False)


def test_per_layer_terms_are_the_ones_seq_time_sums():
    cl = sim.cluster("A100", 64)
    lin, soft = CostModel(cl, sim.LINEAR_LLAMA3_1B), CostModel(cl, sim.SOFTMAX_LLAMA3_1B)
    S = 2048 * sim.K
    dense = [sim.dense_time(lin, S, 64, "lasp2"), sim.dense_time(lin, S, 64, "zeco"),
             sim.dense_time(soft, S, 64, "ring"), sim.dense_time(soft, S, 64, "token_ring"),
             sim.dense_time(soft, S, 64, "allgather_kv")]
    print("dense part of the step, s:", dense)
    # same shapes, so the same GEMMs: the attention terms account for every strategy's whole difference
    assert max(dense) == pytest.approx(min(dense), rel=1e-12)
    assert dense[0] == pytest.approx(sim.dense_time(lin, S, 1, "lasp2") / 64, rel=1e-12)  # linear in S / P


def test_lasp1_model():
    cm = CostModel(sim.cluster("A100", 64), sim.LINEAR_LLAMA3_1B)
    assert sim.lasp1_seq_time(cm, 32768, 1) == pytest.approx(cm.seq_time(32768, 1, "lasp2"), rel=1e-12)
    for p in (2, 8, 64):
        S = 32768 * p
        beta = cm.cluster.link_bytes_per_s(p) * cm.coefficients.bandwidth_efficiency
        chain = sum(cm.layer_comm_bytes(S, p, "lasp2")) / beta + 2 * (p - 1) * cm.cluster.latency_s
        compute = sim.attention_layer_time(cm, S / p, 1, "lasp2")
        assert sim.lasp1_layer_time(cm, S, p) == pytest.approx(compute + chain, rel=1e-12)
        assert sim.lasp1_seq_time(cm, S, p) > cm.seq_time(S, p, "lasp2")  # no overlap: never faster


def test_lasp2_beats_ring_and_lasp1(lasp2):
    h = lasp2["headline"]
    S, P = 2048 * sim.K, 64
    ring = CostModel(sim.cluster("A100", P), sim.SOFTMAX_LLAMA3_1B).seq_time(S, P, "ring")
    lin = CostModel(sim.cluster("A100", P), sim.LINEAR_LLAMA3_1B)
    print(f"LASP-2 vs ring: model {h['ring_over_lasp2']:.4g}x, paper {sim.PAPER['lasp2_over_ring']}x")
    print(f"LASP-2 vs LASP-1: model {h['lasp1_over_lasp2']:.4g}x, paper {sim.PAPER['lasp2_over_lasp1']}x "
          f"(at most {h['lasp1_over_lasp2_max_over_bandwidth']:.4g}x over any inter-node bandwidth)")
    assert h["ring_over_lasp2"] == pytest.approx(ring / lin.seq_time(S, P, "lasp2"), rel=1e-12)
    assert h["lasp1_over_lasp2"] == pytest.approx(sim.lasp1_seq_time(lin, S, P) / lin.seq_time(S, P, "lasp2"))
    # the paper's direction: LASP-2 is the fastest of the three
    assert h["ring_over_lasp2"] > 1 and h["lasp1_over_lasp2"] > 1
    assert h["ring_fits"] and h["lasp2_fits"]  # 2048K on 64 A100-80GB fits both ways
    # any K/V ring's messages alone already cost more than LASP-2's whole step on 25 GB/s links
    assert h["ring_bytes_only_s"] > h["lasp2_s"]
    assert h["lasp1_over_lasp2"] <= h["lasp1_over_lasp2_max_over_bandwidth"] + 1e-12


def test_zeco_beats_lasp2(zeco):
    h = zeco["headline"]
    S, P = 8 * sim.M, 256
    cm = CostModel(sim.cluster("H100", P), sim.LINEAR_LLAMA3_1B)
    print(f"ZeCO vs LASP-2 at 8M / 256: step {h['lasp2_over_zeco']:.4g}x, attention layer "
          f"{h['layer_lasp2_over_zeco']:.4g}x, paper {sim.PAPER['zeco_over_lasp2']}x")
    print(f"ZeCO 8M/256 over 1 GPU at 32K: {h['zeco_over_single_gpu']:.4g} (paper ~1); "
          f"with 2 us messages {h['latency_2us']['zeco_over_single_gpu']:.4g}")
    assert h["lasp2_over_zeco"] == pytest.approx(cm.seq_time(S, P, "lasp2") / cm.seq_time(S, P, "zeco"), rel=1e-12)
    assert h["lasp2_over_zeco"] > 1 and h["layer_lasp2_over_zeco"] > h["lasp2_over_zeco"]
    # near-linear weak scaling: ZeCO's step over the single-GPU step grows slower than LASP-2's
    sweep = zeco["weak_sweep_32k_per_gpu"]
    big = [r for r in sweep if r["world"] >= 64]
    assert all(r["zeco_s"] < r["lasp2_s"] for r in big)
    assert h["zeco_over_single_gpu"] >= 1


def test_tokenring_transfers_match_the_paper_anchor(tokenring):
    h = tokenring["headline"]
    print(f"per step, ms: TokenRing queries {h['tokenring_query_ms']:.3f} (paper 3.5), queries + outputs "
          f"{h['tokenring_both_ms']:.3f} (paper 4.6), ring K+V {h['ring_kv_ms']:.3f} (paper 7.6)")
    # seqpar.collectives.token_ring's anchor: 6000 * 32 * 128 * 2 bytes of queries, twice that of K+V
    assert h["query_bytes"] == 6000 * 32 * 128 * 2 == 49_152_000
    assert h["kv_bytes"] == 2 * h["query_bytes"]
    assert h["partial_bytes"] == 6000 * 32 * (128 * 2 + 4)
    assert h["tokenring_query_ms"] == pytest.approx(1e3 * h["query_bytes"] / 14e9)
    assert h["tokenring_query_ms"] < h["tokenring_both_ms"] < h["ring_kv_ms"]  # the paper's order
    # attention layer: TokenRing wins without GQA on PCIe, ring wins with GQA 4 once communication binds
    assert h["layer_mha"]["ring_over_token_ring"] > 1
    gqa8 = [r for r in tokenring["pcie_strong_24000"]["gqa"] if r["world"] == 8][0]
    assert gqa8["ring_over_token_ring"] < 1


def test_flexsp_plans_beat_static(flexsp):
    (run,) = flexsp["runs"]
    print(f"16 A100s, one long-tail batch (longest {run['longest']}): static Ulysses / plan "
          f"{run['ulysses_over_planner']:.4g}, static ring / plan {run['ring_over_planner']:.4g}, paper 1.46-1.98")
    for strategy in ("ulysses", "ring"):
        assert run[f"{strategy}_over_planner"] >= 1 - 1e-9  # plan_step is never slower than a static plan
    assert max(run["ulysses_over_planner"], run["ring_over_planner"]) > 1.2


def test_table(lasp2, zeco, tokenring, flexsp):
    rows = sim.table(lasp2, zeco, tokenring, flexsp)
    for r in rows:
        print(f"{r['comparison']:<48} model {r['model']:.4g}  paper {r['paper']:<9}  "
              f"model/paper {r['model/paper']:.3g}")
        assert math.isfinite(r["model"]) and r["model"] > 0
    names = " ".join(r["comparison"] for r in rows)
    for needle in ("Ring Attention", "LASP-1", "ZeCO vs LASP-2", "TokenRing", "Ulysses", "Megatron CP"):
        assert needle in names
    first = rows[0]
    assert first["model/paper"] == pytest.approx(first["model"] / sim.PAPER["lasp2_over_ring"])
    ranged = sim._row("x", "h", "s", "m", 1.7, (1.46, 1.98))
    assert ranged["model/paper"] == 1.0  # inside the paper's range
    assert sim._row("x", "h", "s", "m", 2.97, (1.46, 1.98))["model/paper"] == pytest.approx(1.5)


def test_bandwidth_efficiency_one_for_tokenring():
    cm = CostModel(sim.cluster("A10", 4), ModelSpec.llama("2-7b"), CostCoefficients(bandwidth_efficiency=1.0))
    assert cm.cluster.link_bytes_per_s(4) == 14e9
    assert np.isclose(sim.tokenring_step_ms()["ring_kv_ms"], 1e3 * 98_304_000 / 14e9)


def test_seqpar_bench_dispatcher(capsys):
    from seqpar.launch import bench

    assert bench.bench_dir() == _PATH.parent  # the checkout's bench/, found from the installed package
    assert bench.main(["list"]) == 0
    assert "simulate" in capsys.readouterr().out
    assert bench.main(["no-such-bench"]) == 2
    assert bench.main([]) == 2
    assert bench._nproc(["--smoke", "--nproc-per-node", "4"]) == (4, ["--smoke"])
    assert bench._nproc(["--nproc-per-node=3"]) == (3, [])
