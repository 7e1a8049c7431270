"""Reversible wrapping: outside an SP step the parallelized model runs as the original (a plain forward, eval,
``generate``), and ``SPModel.unwrap()`` restores its attention implementation, adapters and hooks."""

import copy

import pytest
import torch
from tests.harness import run_distributed
from tests.test_parallelize import TinyGPT, tiny_llama, tiny_minimax

import seqpar

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")


def seqpar_patched(model):
    """Modules whose forward seqpar replaced (adapters, the SDPA routing)."""
    return [name for name, m in model.named_modules() if "_seqpar_original_forward" in m.__dict__
            or "forward" in m.__dict__]


def generate_after_parallelize():
    model = tiny_llama()
    twin = copy.deepcopy(model)  # never wrapped
    original_attention = model.config._attn_implementation
    sp_model = seqpar.parallelize(model, strategy="ring", overlap_grad_sync=True)
    sp_model(**sp_model.prepare([torch.arange(1, 40) % 96])).loss.backward()  # an SP step first
    sp_model.sync_gradients()
    prompt = torch.tensor([[5, 17, 42, 3, 9, 77]])
    results = {}
    for when in ("wrapped", "unwrapped"):
        model.eval()
        twin.eval()
        with torch.no_grad():
            logits_err = (model(prompt).logits - twin(prompt).logits).abs().max().item()
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
        expected = twin.generate(prompt, max_new_tokens=8, do_sample=False)
        results[when] = (logits_err, torch.equal(generated, expected), generated[0, 6:].tolist())
        if when == "wrapped":
            assert sp_model.unwrap() is model
    hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return results, model.config._attn_implementation == original_attention, hooks


def test_generate_on_the_wrapped_model_equals_the_never_wrapped_model():
    for results, attention_restored, hooks in run_distributed(generate_after_parallelize, 2):
        for when, (logits_err, same_tokens, tokens) in results.items():
            assert logits_err < 1e-5 and same_tokens, (when, logits_err, tokens)
        assert attention_restored and hooks == 0


def plain_forward_after_parallelize(name):
    model = {"gpt": TinyGPT, "minimax": tiny_minimax}[name]()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(m):
        out = m(ids) if name == "gpt" else m(input_ids=ids, use_cache=False).logits
        return out.detach()

    seqpar.parallelize(model, strategy="ring")
    patched = seqpar_patched(model)
    wrapped_err = (logits(model) - logits(twin)).abs().max().item()
    sp_model = seqpar.parallelize(model, strategy="ring")  # wrapping twice, then unwrapping, is clean too
    sp_model.unwrap()
    unwrapped_err = (logits(model) - logits(twin)).abs().max().item()
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    restored = implementation == getattr(getattr(twin, "config", None), "_attn_implementation", None)
    return patched, wrapped_err, unwrapped_err, seqpar_patched(model), restored


@pytest.mark.parametrize("name", ["gpt", "minimax"])
def test_sdpa_and_adapter_models_run_as_the_original_outside_sp_steps(name):
    for patched, wrapped_err, unwrapped_err, left, restored in run_distributed(plain_forward_after_parallelize, 2,
                                                                                name):
        assert patched  # seqpar did route something, and undid it
        assert wrapped_err < 1e-5 and unwrapped_err < 1e-5, (wrapped_err, unwrapped_err)
        assert left == [] and restored, (left, restored)  # MiniMax: its own implementation, even wrapped twice
