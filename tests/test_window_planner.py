"""The planner knows sliding windows: ``ModelSpec.layer_windows`` makes the cost model charge a windowed layer its
windowed compute and the registry's windowed bytes and steps, so a windowed model is planned with its real cost;
``default_cost_model`` reads each layer's window from a transformers model (what its attention calls pass)."""

from dataclasses import replace

import pytest
import torch.distributed as dist
from tests.harness import run_distributed

import seqpar
from seqpar import strategies
from seqpar.solver import Cluster, CostCoefficients, CostModel, ModelSpec, plan_step
from seqpar.strategies import LayerShape

# One softmax layer, H = H_kv = 1, D = 64, bf16, hidden = ffn = vocab = 64; the cluster at 1 TFLOP/s, 1 GB/s,
# 10 us, efficiencies 1, so every term below is a plain product.
S, W, D, B = 4096, 64, 64, 2
F, BETA, LAM = 1e12, 1e9, 1e-5


def windowed_model(window: int | None) -> CostModel:
    spec = ModelSpec(num_layers=1, hidden=64, num_heads=1, num_kv_heads=1, head_dim=D, ffn_hidden=64, vocab=64,
                     bytes_per_param=B, layer_windows=(window,))
    cluster = Cluster(2, 2, F / 1e12, 1e15, BETA / 1e9, BETA / 1e9, latency_s=LAM)
    return CostModel(cluster, spec, coefficients=CostCoefficients(1.0, 1.0, 1.0, 1.0, 0.0))


def hand_times(window: int | None) -> tuple[float, float]:
    """``(alone, ring on 2)``: the step of one sequence of S tokens on one rank, and with ring on two.

    Dense: 6 FLOPs per token and weight, 64 (64 + 2 64) + 64 64 + 3 64 64 + 64 64 = 32768 weights. Attention
    forward 2 S^2 H D FLOPs, with the window 2 (2 S W - W^2) H D (each query sees at most W keys), backward 2.5x.
    Ring on 2 ranks: each pass is its first block (a quarter of the layer: half the pairs per rank, half of those
    in the first block) then the second block overlapped with one K/V message: 2 (S/2) D b forward, with the
    float32 dK/dV 2 (S/2) D (b + 4) backward, + one latency. At P = 2 a window of W < S/4 still meets both
    shards (zigzag: each rank's chunks touch the other's), so the bytes are the same with and without it."""
    dense = S * 6 * 32768 / F
    pairs = S * S if window is None else 2 * S * window - window * window
    forward = 2 * pairs * D / F
    backward = 2.5 * forward
    alone = dense + forward + backward
    kv_forward, kv_backward = 2 * (S / 2) * D * B / BETA, 2 * (S / 2) * D * (B + 4) / BETA
    ring = (dense / 2 + forward / 4 + max(forward / 4, kv_forward) + LAM
            + backward / 4 + max(backward / 4, kv_backward) + LAM)
    return alone, ring


def test_the_plan_changes_because_of_the_window():
    """Full attention: the quadratic compute makes two ranks worth their K/V message (4.4 ms against 8.3 ms
    alone). With a 64-token window the layer's compute is 32x smaller, the message is not hidden any more, and
    one rank alone (1.04 ms) beats two (2.6 ms): the planner runs the sequence on one rank."""
    degrees = {}
    for window in (None, W):
        cm = windowed_model(window)
        alone, ring = hand_times(window)
        assert cm.seq_time(S, 1, "ring") == pytest.approx(alone, rel=1e-12), window
        assert cm.seq_time(S, 2, "ring") == pytest.approx(ring, rel=1e-12), window
        plan = plan_step([S], cm, strategies=("ring",), time_limit_s=5.0)
        plan.validate([S], cm)
        (group,) = [g for g in plan.groups if g.seq_indices]
        degrees[window] = group.degree
        assert plan.makespan_s == pytest.approx(min(alone, ring), rel=1e-9), window
    assert degrees == {None: 2, W: 1}


def test_windowed_layers_are_charged_their_bytes_steps_and_compute():
    """A model of two windowed and two full layers costs two of each: the registry's windowed bytes (ring at
    P = 8: 14 messages of a pass instead of 56 with a window below a chunk) and windowed compute."""
    spec = ModelSpec(num_layers=4, hidden=256, num_heads=8, num_kv_heads=2, head_dim=64, ffn_hidden=512,
                     vocab=1000, layer_windows=(W, None, W, None))
    cluster = Cluster(8, 8, 100.0, 1e15, 10.0, 10.0)
    cm = CostModel(cluster, spec)
    full = CostModel(cluster, replace(spec, layer_windows=None))
    length = 8 * 2 * 1024  # zigzag chunks of 1024 tokens: a 64-token window meets only the neighbours
    shape = LayerShape(seq_len=length, degree=8, heads=8, kv_heads=2, head_dim=64, elem_bytes=2)
    windowed_bytes = cm.layer_comm_bytes(length, 8, "ring", window=W)
    assert windowed_bytes == pytest.approx([b * 14 / 56 for b in strategies.get("ring").comm_bytes(shape)])
    for name in ("ring", "token_ring", "ulysses"):
        w_time = float(cm.layer_times([length], 8, name, window=W)[0])
        f_time = float(cm.layer_times([length], 8, name)[0])
        assert w_time < f_time, name
        dense = full.seq_time(length, 8, name) - 4 * f_time
        assert cm.seq_time(length, 8, name) == pytest.approx(dense + 2 * w_time + 2 * f_time, rel=1e-12)
    with pytest.raises(ValueError, match="layer_windows"):
        ModelSpec(num_layers=2, hidden=64, num_heads=1, num_kv_heads=1, head_dim=64, ffn_hidden=64, vocab=64,
                  layer_kinds=("linear", "softmax"), layer_windows=(W, None))


def wrapped_windows(names: list[str]) -> dict[str, tuple]:
    """Each tiny model wrapped with strategy='auto' (parallelize builds default_cost_model(model)): the windows
    its cost model plans with."""
    from tests.test_model_matrix import BUILDERS

    windows = {}
    for name in names:
        sp_model = seqpar.parallelize(BUILDERS[name](), strategy="auto", group=dist.group.WORLD, verify_model=False)
        windows[name] = sp_model.config.cost_model.model.layer_windows
        sp_model.unwrap()
    return windows


def test_default_cost_model_reads_each_layers_window_from_a_wrapped_model():
    """Wrapped (strategy='auto' on 2 ranks) Mistral and Gemma2 plan with their layers' windows; the other rules
    (per-layer windows of Qwen2 and Gemma3, none for Llama) on ``default_cost_model`` directly."""
    pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")
    from tests.test_model_matrix import BUILDERS, WINDOW

    from seqpar.wrapper import default_cost_model

    results = run_distributed(wrapped_windows, 2, ["mistral-window", "gemma2"])
    assert results[0] == results[1] == {
        "mistral-window": (WINDOW, WINDOW),  # Mistral passes config.sliding_window to every layer
        "gemma2": (WINDOW, None),  # alternating: sliding, full
    }
    expected = {
        "mistral": (4096, 4096),  # its default: for sequences up to 4096 tokens the full cost
        "qwen2-window": (None, WINDOW),  # max_window_layers=1: layer 0 full, layer 1 windowed
        "gemma3": (WINDOW, None),
        "llama": (None, None),
    }
    assert {name: default_cost_model(BUILDERS[name](), 2).model.layer_windows for name in expected} == expected
