"""Tiny random Qwen3-Next (Gated DeltaNet + gated softmax attention) and Kimi Linear (KDA + MLA) under
parallelize: loss and every parameter gradient equal one float64 process of the unchanged model, with each
delta-rule strategy (LASP-2, ZeCO) combined with ring and Ulysses, and with strategy='auto'; the model probe
accepts the routed delta-rule layers."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import seqpar
from seqpar.kernels.reference import reference_gated_delta_rule
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import reference_loss_and_grads

transformers = pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")


def tiny_qwen3_next():
    """One Gated DeltaNet layer (grouped q/k heads: 2 key heads, 4 value heads; conv width 4), one gated softmax
    layer; MoE top-2 of 4 with a shared expert."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=1024)
    return _moderate_decays(Qwen3NextForCausalLM(config))


def tiny_kimi_linear():
    """One KDA layer (per-channel decay, conv width 4), one MLA softmax layer; a dense MLP."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(0)
    config = KimiLinearConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, q_lora_rank=None, kv_lora_rank=32, linear_head_dim=8, linear_num_heads=4,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_token=2, num_shared_experts=1,
        mlp_layer_types=["dense", "dense"], layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=1024, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return _moderate_decays(KimiLinearForCausalLM(config))


def _moderate_decays(model):
    """Decay rates exp(A_log) in [0.05, 0.5] instead of the init's up to 16: with those the state is forgotten
    within a token or two, the state crossing a rank boundary is ~0 and the test could not see it (and the
    decay parameters' gradients are ~1e-10, all rounding)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 0.5, generator=gen).log())
    return model


MODELS = {"qwen3_next": tiny_qwen3_next, "kimi_linear": tiny_kimi_linear}


def float64_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                       use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' chunked delta-rule functions compute in float32 whatever the model dtype; the reference
    runs the naive float64 recurrence instead, with their conventions (grouped heads repeated, l2norm, scale)."""
    dtype = query.dtype
    query, key, value, g, beta = (x.double() for x in (query, key, value, g, beta))
    if key.shape[2] != value.shape[2]:
        rep = value.shape[2] // key.shape[2]
        query, key = query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2)
    if use_qk_l2norm_in_kernel:
        query, key = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (query, key))
    out, final = reference_gated_delta_rule(query, key, value, beta, g, initial_state=initial_state)
    float64_delta_rule.calls += 1
    return out.to(dtype), final if output_final_state else None


float64_delta_rule.calls = 0


@contextlib.contextmanager
def float64_delta_rules():
    from transformers.models.kimi_linear import modeling_kimi_linear
    from transformers.models.qwen3_next import modeling_qwen3_next

    with mock.patch.object(modeling_qwen3_next, "torch_chunk_gated_delta_rule", float64_delta_rule), \
            mock.patch.object(modeling_kimi_linear, "chunk_kimi_delta_attention", float64_delta_rule):
        yield


def hybrid_cost_model(world_size: int):
    """A CPU-shaped cost model whose layer kinds are the models' (one linear, one softmax layer)."""
    from seqpar.solver import Cluster, CostModel, ModelSpec

    spec = ModelSpec(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden=64, vocab=96,
                     layer_kinds=("linear", "softmax"))
    cluster = Cluster(world_size=world_size, gpus_per_node=world_size, peak_tflops=0.01, mem_bytes=80e9,
                      intra_node_gbps=100.0, inter_node_gbps=100.0, latency_s=1e-4)  # splits the 96 tokens
    return CostModel(cluster, spec)


def sp_matches_reference(model_name: str, strategy: str, linear_strategy: str, lengths: list[int]):
    """(relative loss error, largest relative gradient error, parameters without a gradient, plan sizes)."""
    model = MODELS[model_name]()
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 96, (n,), generator=gen) for n in lengths]
    calls = float64_delta_rule.calls
    with float64_delta_rules():
        ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    assert float64_delta_rule.calls == calls + len(sequences)  # the reference ran the float64 recurrence
    world = torch.distributed.get_world_size()
    cost_model = hybrid_cost_model(world) if strategy == "auto" else None
    sp_model = seqpar.parallelize(model, strategy=strategy, linear_strategy=linear_strategy, cost_model=cost_model)
    out = sp_model(**sp_model.prepare(sequences))
    out.loss.backward()
    sp_model.sync_gradients()
    grads = {n: rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads}
    missing = [n for n, p in model.named_parameters() if n in ref_grads and p.grad is None]
    worst = max(grads, key=grads.get)
    plan_sizes = None if out.plan is None else sorted(len(g.ranks) for g in out.plan.groups)
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), (worst, grads[worst]), missing, plan_sizes


def check(results) -> None:
    for loss_err, (worst, grad_err), missing, _ in results:
        assert loss_err < 1e-5 and grad_err < 1e-4 and not missing, (loss_err, worst, grad_err, missing)


@pytest.mark.parametrize("world_size, strategy, linear_strategy", [
    (2, "ring", "lasp2"), (4, "ulysses", "zeco"), (4, "ring", "zeco"), (2, "ulysses", "lasp2"),
])
def test_qwen3_next_equals_one_float64_process(world_size, strategy, linear_strategy):
    check(run_distributed(sp_matches_reference, world_size, "qwen3_next", strategy, linear_strategy, [40, 13]))


@pytest.mark.parametrize("world_size, model_name", [(4, "qwen3_next"), (2, "kimi_linear"), (4, "kimi_linear")])
def test_auto(world_size, model_name):
    results = run_distributed(sp_matches_reference, world_size, model_name, "auto", "zeco", [96, 12, 20])
    check(results)
    assert all(r[3] == results[0][3] for r in results)  # every rank ran rank 0's plan
    assert max(results[0][3]) > 1, results[0][3]  # some sequence was split: the delta-rule SP ops ran


@pytest.mark.parametrize("linear_strategy", ["lasp2", "zeco"])
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_kimi_linear_equals_one_float64_process(world_size, strategy, linear_strategy):
    """The full matrix (W x softmax strategy x linear strategy; ``auto`` in test_auto): each case is ~1 s on the
    session's reused rank processes."""
    check(run_distributed(sp_matches_reference, world_size, "kimi_linear", strategy, linear_strategy, [40, 13]))
