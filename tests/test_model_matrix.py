"""The transformers model matrix (issue 18): each architecture, unchanged, through ``parallelize`` with every
strategy that applies at the world size; the loss and EVERY parameter gradient equal one float64 process
(``reference_loss_and_grads``: the model's own code with float64 eager attention and transformers' own masks,
so each layer's sliding window, softcap and sinks are the model's, not seqpar's reading of them).

Windows are shorter than every test sequence and than a rank's shard, so a window read wrongly (W instead of
W - 1 keys, or not per layer) changes the numbers. Gemma2's softcap is set low, with weights large enough that
the cap bends the scores. DeepSeek-V3 has query/key head size 24 and value head size 16 (MLA).
"""

import copy

import pytest
import torch
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import reference_loss_and_grads, tiny_minimax

import seqpar
from seqpar import strategies

transformers = pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

VOCAB = 96
WINDOW = 5  # transformers' sliding_window: each query sees itself and the 4 keys before it
LENGTHS = (23, 16)  # packed, one not a multiple of the layout's
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _build(config_name, model_name, **options):
    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**{**TINY, **options})
        return getattr(transformers, model_name)(config)
    return build


MOE = dict(num_local_experts=4, num_experts_per_tok=2)  # top-2: top-1 gives the router a zero gradient
BUILDERS = {
    "llama": _build("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _build("MistralConfig", "MistralForCausalLM"),  # its default sliding_window (4096)
    "mistral-window": _build("MistralConfig", "MistralForCausalLM", sliding_window=WINDOW),
    "qwen2-window": _build("Qwen2Config", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=WINDOW,
                           max_window_layers=1),  # layer 0 full attention, layer 1 windowed
    "gemma2": _build("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=WINDOW,
                     attn_logit_softcapping=1.0, query_pre_attn_scalar=8, initializer_range=0.3),  # alternating
    "gemma3": _build("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=WINDOW,
                     layer_types=["sliding_attention", "full_attention"]),
    "phi3": _build("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt-neox": _build("GPTNeoXConfig", "GPTNeoXForCausalLM", num_key_value_heads=None),
    "olmo2": _build("Olmo2Config", "Olmo2ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "deepseek-v3": _build("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=16, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
                          topk_group=1),
    "mixtral": _build("MixtralConfig", "MixtralForCausalLM", **MOE),
    "gpt-oss": _build("GptOssConfig", "GptOssForCausalLM", head_dim=8, sliding_window=WINDOW, **MOE),  # sinks
    "minimax": tiny_minimax,
}


# Parameters whose gradient the model itself accumulates in float32 even in a float64 model (Gemma's RMSNorm
# multiplies by (1 + weight.float()), DeepSeek-V3's router runs its linear in float32): summed over a different
# split of the tokens (packed and sharded here, one sequence at a time in the reference) they agree to float32
# rounding only (measured 2.2e-7), so they are held to 1e-6; every other gradient to 1e-10.
FLOAT32_BY_MODEL = {"gemma2": "norm.weight", "gemma3": "norm.weight", "deepseek-v3": "mlp.gate.weight"}
FLOAT32_TOLERANCE = 1e-6

# Models whose attention needs the SP ops' window / softcap / sinks options or a value head size other than the
# query/key one (Mistral passes its default window of 4096 to every layer).
NEEDS_WINDOW_SOFTCAP_SINKS_MLA = ["mistral", "mistral-window", "qwen2-window", "gemma2", "gemma3", "deepseek-v3",
                                  "gpt-oss"]
PLAIN = [name for name in BUILDERS if name not in NEEDS_WINDOW_SOFTCAP_SINKS_MLA]


def _sequences():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENGTHS]


def matrix_errors(names, dtype=torch.float64, only=None):
    """{(model, strategy): (loss error, worst gradient error, parameters without a gradient)} on this rank, for
    every registered softmax strategy valid at this world size (or those in ``only``)."""
    world = torch.distributed.get_world_size()
    sequences = _sequences()
    results = {}
    for name in names:
        model = BUILDERS[name]()
        ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
        text = model.config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        for strategy in only or strategies.names("softmax"):
            if not strategies.get(strategy).valid(world, heads, kv_heads):
                continue
            sp_model = copy.deepcopy(model).to(dtype)
            if hasattr(sp_model, "set_experts_implementation"):  # grouped_mm has no float64 kernel
                sp_model.set_experts_implementation("eager")
            wrapped = seqpar.parallelize(sp_model, strategy=strategy, verify_model=False)
            out = wrapped(**wrapped.prepare(sequences))
            out.loss.backward()
            wrapped.sync_gradients()
            params = dict(sp_model.named_parameters())
            missing = [n for n in ref_grads if params[n].grad is None]
            errors = {n: rel_err(params[n].grad, g) for n, g in ref_grads.items() if n not in missing}
            float32_part = FLOAT32_BY_MODEL.get(name, "\0")
            grad_err = max(e for n, e in errors.items() if float32_part not in n)
            float32_err = max((e for n, e in errors.items() if float32_part in n), default=0.0)
            if float32_err > FLOAT32_TOLERANCE:
                grad_err = max(grad_err, float32_err)  # reported as a failure at any tolerance below it
            results[name, strategy] = (abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err, missing)
    return results


def _check(per_rank, loss_tol, grad_tol, expected_cases):
    for results in per_rank:
        assert len(results) == expected_cases, sorted(results)
        bad = {case: r for case, r in results.items() if not (r[0] < loss_tol and r[1] < grad_tol and not r[2])}
        assert not bad, bad


def test_models_float64_every_strategy_at_2_ranks():
    # ulysses, ring, token_ring, allgather_kv (USP needs 4 ranks with these head counts)
    _check(run_distributed(matrix_errors, 2, PLAIN), 1e-10, 1e-10, 4 * len(PLAIN))


def test_windowed_softcapped_sink_and_mla_models_float64_every_strategy_at_2_ranks():
    names = NEEDS_WINDOW_SOFTCAP_SINKS_MLA
    _check(run_distributed(matrix_errors, 2, names), 1e-10, 1e-10, 4 * len(names))


def test_windowed_softcapped_sink_and_mla_models_float64_at_3_and_4_ranks():
    # a window of 5 spans up to 3 of the 4 ranks' shards here (6 or 4 tokens each)
    names = ["gemma2", "gpt-oss"]
    _check(run_distributed(matrix_errors, 4, names, only=("usp", "ring")), 1e-10, 1e-10, 2 * len(names))
    _check(run_distributed(matrix_errors, 3, ["qwen2-window"], only=("token_ring",)), 1e-10, 1e-10, 1)


def test_models_float32_ring_at_2_ranks():
    names = ["llama", "mixtral", "minimax", "gemma2", "gpt-oss", "deepseek-v3"]
    _check(run_distributed(matrix_errors, 2, names, torch.float32, only=("ring",)), 1e-5, 1e-4, len(names))
