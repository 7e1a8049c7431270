"""parallelize(model) on real gloo ranks: loss and every parameter gradient equal a single-process float64 run
of the same model (transformers' own eager attention, or plain PyTorch math) on the whole batch."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tests.checks import rel_err, value_errors
from tests.harness import run_distributed

import seqpar


transformers = pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def tiny_minimax():
    """Hybrid: a lightning (linear) attention layer, then a softmax one; MoE with top-2 of 4 experts (top-1 would
    normalise the routing weight to exactly 1 and give the router a zero gradient: nothing to compare)."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    torch.manual_seed(0)
    config = MiniMaxConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=1024, block_size=16,
                           layer_types=["linear_attention", "full_attention"], sliding_window=None)
    return MiniMaxForCausalLM(config)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class TinyGPT(nn.Module):
    """A plain PyTorch GPT: learned absolute positions, pre-norm blocks, SDPA attention."""

    def __init__(self, vocab=96, dim=64, heads=4, layers=2, max_len=1024):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(dim), "attn": CausalSelfAttention(dim, heads), "ln2": nn.LayerNorm(dim),
                           "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))})
            for _ in range(layers)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None]
        x = self.tok(input_ids) + self.pos(position_ids)
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(x)


MODELS = {"llama": tiny_llama, "minimax": tiny_minimax, "gpt": TinyGPT}


# ---------------------------------------------------------------------------------------------------
# the single-process float64 reference
# ---------------------------------------------------------------------------------------------------


REFERENCE_ATTENTION = "float64_eager"


def float64_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                            s_aux=None, **kwargs):
    """transformers' eager attention with every step in the input dtype (transformers' own eager attention takes
    the softmax in float32, which caps a float64 reference at ~1e-7): q (B, H, S, D_qk), k (B, H_kv, S, D_qk),
    v (B, H_kv, S, D_v); the mask (transformers' eager mask, sliding windows included) is added to the scores;
    ``softcap`` caps them with tanh; ``s_aux`` (per-head sink logits) joins only the softmax's denominator."""
    assert not dropout
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    if s_aux is not None:
        sinks = s_aux.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), None


def use_reference_attention(model):
    """Switch a transformers model to ``float64_eager_attention`` (registered once) for a reference run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REFERENCE_ATTENTION, float64_eager_attention)
    AttentionMaskInterface.register(REFERENCE_ATTENTION, eager_mask)
    model.set_attn_implementation(REFERENCE_ATTENTION)


def reference_loss_and_grads(model, sequences):
    """Token-mean causal-LM loss over the whole batch on one process, float64, the model's own attention math
    (``float64_eager_attention``, in float64 throughout)."""
    ref = copy.deepcopy(model).double()
    if hasattr(ref, "set_attn_implementation"):
        use_reference_attention(ref)
    for module in ref.modules():  # MiniMax's lightning attention tabulates its decays at init, in float32
        if hasattr(module, "decay_factors") and hasattr(module, "slope_rate"):
            module.query_decay, module.key_decay, module.diagonal_decay = module.decay_factors(module.slope_rate)
    if hasattr(ref, "set_experts_implementation"):  # grouped_mm has no float64 kernel; eager MoE is plain math
        ref.set_experts_implementation("eager")
    total, count = 0.0, 0
    for seq in sequences:  # one sequence at a time: no padding, no cross-sequence attention
        logits = ref(seq[None]) if not hasattr(ref, "config") else ref(input_ids=seq[None], use_cache=False).logits
        total = total + F.cross_entropy(logits[0, :-1].double(), seq[1:], reduction="sum")
        count += seq.numel() - 1
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}


def cpu_cost_model():
    """A cost model shaped like this CPU with gloo (slow compute, millisecond latency), for which the planner
    splits the longest sequence and runs the short ones unsplit."""
    from seqpar.solver import Cluster, CostModel, ModelSpec

    spec = ModelSpec(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden=128, vocab=96)
    cluster = Cluster(world_size=4, gpus_per_node=4, peak_tflops=0.01, mem_bytes=80e9, intra_node_gbps=100.0,
                      inter_node_gbps=100.0, latency_s=0.01)
    return CostModel(cluster, spec)


def sp_matches_reference(model_name, strategy, lengths, linear_strategy="zeco", batch_form="list"):
    model = MODELS[model_name]()
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 96, (n,), generator=gen) for n in lengths]
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)

    cost_model = cpu_cost_model() if strategy == "auto" else None
    sp_model = seqpar.parallelize(model, strategy=strategy, linear_strategy=linear_strategy, cost_model=cost_model)
    batch = {"input_ids": torch.stack(sequences)} if batch_form == "padded" else sequences
    local = sp_model.prepare(batch)
    out = sp_model(**local)
    out.loss.backward()
    sp_model.sync_gradients()
    grad_errors = {n: rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads}
    plan_sizes = None if out.plan is None else sorted(len(g.ranks) for g in out.plan.groups)
    missing = [n for n, p in model.named_parameters() if n in ref_grads and p.grad is None]
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), max(grad_errors.values()), missing, plan_sizes


@pytest.mark.parametrize("strategy", ["ring", "token_ring", "ulysses", "allgather_kv"])
def test_llama_loss_and_gradients_equal_single_process(strategy):
    for loss_err, grad_err, missing, _ in run_distributed(sp_matches_reference, 4, "llama", strategy, [256, 256],
                                                          batch_form="padded"):
        assert loss_err < 1e-5 and grad_err < 1e-4 and not missing, (loss_err, grad_err)


def test_llama_packed_variable_lengths():
    for loss_err, grad_err, _, _ in run_distributed(sp_matches_reference, 3, "llama", "ring", [37, 120, 5, 64]):
        assert loss_err < 1e-5 and grad_err < 1e-4


@pytest.mark.parametrize("linear_strategy", ["lasp2", "zeco"])
def test_minimax_hybrid_linear_and_softmax_layers(linear_strategy):
    results = run_distributed(sp_matches_reference, 4, "minimax", "ring", [128, 96], linear_strategy=linear_strategy)
    for loss_err, grad_err, _, _ in results:
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)


def test_plain_pytorch_gpt_through_sdpa():
    for loss_err, grad_err, _, _ in run_distributed(sp_matches_reference, 4, "gpt", "ring", [128, 64, 200]):
        assert loss_err < 1e-5 and grad_err < 1e-4


def test_auto_strategy_plans_heterogeneous_groups():
    lengths = [512, 16, 40, 300, 24, 64]
    results = run_distributed(sp_matches_reference, 4, "llama", "auto", lengths)
    for loss_err, grad_err, _, plan_sizes in results:
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)
    assert len(set(results[0][3])) > 1, results[0][3]  # groups of different sizes
    assert all(r[3] == results[0][3] for r in results)  # every rank used rank 0's plan


# ---------------------------------------------------------------------------------------------------
# errors at parallelize time
# ---------------------------------------------------------------------------------------------------


class NoSDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, input_ids):
        return self.lin(input_ids.float())


class HandRolledAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class WithHandRolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = HandRolledAttention()


def parallelize_errors():
    import transformers as tf

    tiny = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4)
    cases = {
        "no-attention": lambda: seqpar.parallelize(NoSDPA()),
        "hand-rolled": lambda: seqpar.parallelize(WithHandRolled()),
        "mha": lambda: seqpar.parallelize(nn.Sequential(nn.MultiheadAttention(8, 2))),
        "strategy": lambda: seqpar.parallelize(TinyGPT(), strategy="magic"),
        "dropout": lambda: seqpar.parallelize(tf.LlamaForCausalLM(tf.LlamaConfig(**tiny, attention_dropout=0.1))),
        # the bad-model table: each family's own config field, at parallelize time (not at the first forward)
        "gpt2-dropout": lambda: seqpar.parallelize(tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=32, n_embd=32, n_layer=1, n_head=4))),  # GPT2's default attn_pdrop is 0.1
        "falcon-alibi": lambda: seqpar.parallelize(tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True))),
        "bloom": lambda: seqpar.parallelize(tf.BloomForCausalLM(tf.BloomConfig(
            vocab_size=32, hidden_size=32, n_layer=1, n_head=4))),
        "mpt": lambda: seqpar.parallelize(tf.MptForCausalLM(tf.MptConfig(
            vocab_size=32, d_model=32, n_layers=1, n_heads=4))),
        "mamba": lambda: seqpar.parallelize(tf.MambaForCausalLM(tf.MambaConfig(
            vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=1))),
        "mamba-auto": lambda: seqpar.parallelize(tf.MambaForCausalLM(tf.MambaConfig(
            vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=1)), strategy="auto"),
        "ulysses-heads": lambda: seqpar.parallelize(tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=32, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=3,
            num_key_value_heads=3)), strategy="ulysses"),
    }
    return value_errors(cases)


def test_unreachable_or_unsupported_attention_fails_at_parallelize_time():
    per_rank = run_distributed(parallelize_errors, 2, timeout=120)
    assert per_rank[0] == per_rank[1]  # every rank raises, with the same message
    messages = per_rank[0]
    assert "found no attention" in messages["no-attention"]
    assert "attn (HandRolledAttention)" in messages["hand-rolled"]
    assert "MultiheadAttention" in messages["mha"]
    assert messages["strategy"].startswith("strategy:")
    assert "config.attention_dropout=0.1" in messages["dropout"]
    assert "config.attn_pdrop=0.1" in messages["gpt2-dropout"]
    assert "ALiBi" in messages["falcon-alibi"] and "config.alibi=True" in messages["falcon-alibi"]
    assert "ALiBi" in messages["bloom"]
    assert "ALiBi" in messages["mpt"] and "config.attn_config.alibi" in messages["mpt"]
    for name in ("mamba", "mamba-auto"):
        assert messages[name].startswith("model: MambaForCausalLM has no attention layer"), messages[name]
    assert "Ulysses" in messages["ulysses-heads"] and "ring" in messages["ulysses-heads"]


def one_rank_fails(strategy):
    """Rank 1 builds its model with attention dropout, the others without: every rank must raise quickly."""
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    dropout = 0.1 if torch.distributed.get_rank() == 1 else 0.0
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout))
    start = time.monotonic()
    try:
        seqpar.parallelize(model, strategy=strategy, cost_model=cpu_cost_model() if strategy == "auto" else None)
        message = None
    except ValueError as err:
        message = str(err)
    return message, time.monotonic() - start


@pytest.mark.parametrize("strategy", ["auto", "ring"])
def test_a_failure_on_one_rank_reaches_every_rank_within_seconds(strategy):
    # without the agreement on the local checks, rank 0 would wait in the model probe's collectives for rank 1
    # until the communication timeout (300 s)
    results = run_distributed(one_rank_fails, 4, strategy, timeout=120)
    for rank, (message, seconds) in enumerate(results):
        assert message is not None and "attention_dropout=0.1" in message, (rank, message)
        assert seconds < 45, (rank, seconds)  # not the 300 s timeout (~10 s here when 7 test runs share 2 cores)
    assert results[0][0].startswith("model: parallelize failed on rank 1"), results[0][0]


def planner_fails_on_rank_0():
    class BrokenCostModel:  # the planner reads its cluster, then fails with something other than ValueError
        cluster = type("Cluster", (), {"world_size": torch.distributed.get_world_size()})()

    sp_model = seqpar.parallelize(tiny_llama(), strategy="auto", cost_model=BrokenCostModel(), verify_model=False)
    try:
        sp_model.prepare([torch.arange(16), torch.arange(8)])
    except ValueError as err:
        return str(err)
    return None


def test_a_planner_crash_on_rank_0_reaches_every_rank():
    for message in run_distributed(planner_fails_on_rank_0, 2, timeout=60):
        assert message is not None and message.startswith("plan: planning failed on rank 0"), message


def test_auto_with_fewer_sequences_than_groups_leaves_idle_ranks_correct():
    # two short sequences on four ranks: some groups get no sequence; their ranks still join the loss and the
    # gradient all-reduce, and everything equals the single-process run
    results = run_distributed(sp_matches_reference, 4, "llama", "auto", [24, 16])
    for loss_err, grad_err, _, plan_sizes in results:
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err, plan_sizes)
