"""parallelize refuses models whose sequence-mixing modules seqpar does not route (issue 14, finding 0).

A tiny Qwen3-Next (Gated DeltaNet layers + softmax layers) used to train silently wrong under SP; plain PyTorch
models with a causal convolution or a cumsum over the sequence are the same bug in miniature. The probe must
name the module on every rank, and must not refuse the models seqpar does run correctly (no false positive),
nor disturb the caller's RNG streams or train/eval flags."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn as nn
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_delta_rule_models import tiny_qwen3_next
from tests.test_parallelize import MODELS, CausalSelfAttention, sp_matches_reference

import seqpar
from seqpar.collectives import count_comm

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")


class CausalConv(nn.Module):
    """A depthwise causal convolution over the sequence (as in Mamba / Gated DeltaNet front ends)."""

    def __init__(self, dim, kernel=4):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1)

    def forward(self, x):  # x: (B, S, D)
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class CumsumMixer(nn.Module):
    """A running mean over the sequence: token t sees every token before it, with no attention call."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return self.proj(x.cumsum(dim=1) / counts)


class GPTWithMixer(nn.Module):
    """Embedding, then a sequence mixer seqpar does not know, then an SDPA attention block, then the head."""

    def __init__(self, mixer, vocab=96, dim=32, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, dim)
        self.mixer = mixer
        self.attn = CausalSelfAttention(dim, heads)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids=None):
        x = self.tok(input_ids)
        x = x + self.mixer(x)
        x = x + self.attn(x)
        return self.head(x)


@contextlib.contextmanager
def without_delta_rule_adapters():
    """Qwen3-Next's Gated DeltaNet as it was before seqpar routed it (issue 20): no adapter registered."""
    from seqpar import integrations, integrations_delta

    with mock.patch.dict(integrations._ADAPTERS, clear=True), \
            mock.patch.object(integrations_delta, "register_delta_adapters", lambda register: None):
        yield


def refusals():
    """The ValueError message parallelize gives for each model (None: it did not refuse)."""
    builders = {
        "qwen3-next-ring": (tiny_qwen3_next, "ring"),
        "qwen3-next-ulysses": (tiny_qwen3_next, "ulysses"),
        "conv": (lambda: GPTWithMixer(CausalConv(32)), "ring"),
        "cumsum": (lambda: GPTWithMixer(CumsumMixer(32)), "token_ring"),
    }
    messages = {}
    for name, (build, strategy) in builders.items():
        try:
            with without_delta_rule_adapters():
                seqpar.parallelize(build(), strategy=strategy)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    seqpar.parallelize(tiny_qwen3_next(), strategy="ring")  # routed now (issue 20): the probe accepts it
    messages["qwen3-next-routed"] = None
    return messages


def test_unrouted_sequence_mixing_is_refused_on_every_rank_naming_the_module():
    per_rank = run_distributed(refusals, 2)
    assert per_rank[0] == per_rank[1]  # every rank raised, with the same verdict
    messages = per_rank[0]
    assert messages.pop("qwen3-next-routed") is None
    for name, message in messages.items():
        assert message is not None and message.startswith("model:"), (name, message)
        assert "mixes tokens along the sequence" in message and "register_adapter" in message, message
    assert "model.layers.0.linear_attn (Qwen3NextGatedDeltaNet)" in messages["qwen3-next-ring"]
    assert "model.layers.0.linear_attn (Qwen3NextGatedDeltaNet)" in messages["qwen3-next-ulysses"]
    assert "mixer (CausalConv)" in messages["conv"]
    assert "mixer (CumsumMixer)" in messages["cumsum"]


def qwen3_next_error_without_the_probe():
    """The bug the probe prevents: with verify_model=False, Qwen3-Next's SP logits are off (relative error of
    this rank's logits against the single-process logits at its positions)."""
    import torch.distributed as dist

    from seqpar.collectives.layout import shard_indices

    model = tiny_qwen3_next()
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), without_delta_rule_adapters():
        reference = model(input_ids=ids, use_cache=False).logits
        sp_model = seqpar.parallelize(model, strategy="ring", verify_model=False)
        logits = sp_model(**sp_model.prepare({"input_ids": ids})).logits
    index = shard_indices(64, dist.get_world_size(), dist.get_rank(), layout="zigzag")
    return rel_err(logits, reference[:, index])


def test_the_refused_model_would_indeed_compute_wrong_logits():
    errors = run_distributed(qwen3_next_error_without_the_probe, 2)
    assert max(errors) > 1e-2, errors  # far above the SP ops' float32 error (~1e-6)


def probe_leaves_no_trace_and_accepts(model_name):
    """parallelize with the probe on: it communicates (so it ran), leaves the caller's RNG and train flags as
    they were, creates no gradients; then the wrapped model still equals one process."""
    model = MODELS[model_name]()
    model.train()
    model.get_submodule(next(n for n, _ in model.named_modules() if n)).eval()  # mixed flags are kept as they are
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with count_comm() as stats:
        seqpar.parallelize(model, strategy="ring")
    untouched = (torch.equal(torch.get_rng_state(), rng), [m.training for m in model.modules()] == flags,
                 all(p.grad is None for p in model.parameters()))
    loss_err, grad_err, _, _ = sp_matches_reference(model_name, "ring", [40, 24])
    return sum(stats.calls.values()), untouched, loss_err, grad_err


@pytest.mark.parametrize("model_name", ["llama", "minimax", "gpt"])
def test_models_seqpar_runs_correctly_are_accepted(model_name):
    for calls, untouched, loss_err, grad_err in run_distributed(probe_leaves_no_trace_and_accepts, 2, model_name):
        assert calls > 0  # the probe ran the SP path
        assert untouched == (True, True, True), untouched
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)
