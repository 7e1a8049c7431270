"""Compositions a real training job uses, on real gloo ranks: each case runs one training step of an unchanged
model through ``parallelize`` combined with the other things such a job turns on (FSDP2, torch.compile,
``strategy="auto"``, activation checkpointing, micro-batches, a delta-rule model, unequal shards at an odd world
size, strided views), and compares the loss and EVERY parameter gradient, after the step's gradient
reduction, with one float64 process of the same model on the whole batch.

The models run in float64, so the tolerances (1e-6 on the loss and the gradients, relative) are far above
float64 rounding but far below any missing term: a gradient summed twice, a shard's tokens or a recomputed layer
left out, a state not carried across a rank boundary."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import (
    CausalSelfAttention,
    TinyGPT,
    reference_loss_and_grads,
    tiny_llama,
    tiny_minimax,
)

import seqpar

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

TOL = 1e-6


def _sequences(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=gen) for n in lengths]


def _dense(grad):
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _fully_shard(model):
    """FSDP2 as a training job applies it: each block, then the root, over the whole world (TinyGPT's blocks
    are ModuleDicts, which have no forward: their attention and MLP modules instead)."""
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "model"):
        blocks = list(model.model.layers)
    else:
        blocks = [blk[part] for blk in model.blocks for part in ("attn", "mlp")]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------


def _eager_experts(model):
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel; eager MoE is plain math
    return model


def _qwen3_next():
    from tests.test_delta_rule_models import tiny_qwen3_next

    return _eager_experts(tiny_qwen3_next().double())


class SlicedAttention(CausalSelfAttention):
    """q, k and v as slices of one fused projection along the feature dim (strides of 3 x dim, not contiguous)."""

    def forward(self, x):
        b, s, d = x.shape
        qkv = self.qkv(x)
        q, k, v = (qkv[..., i * d:(i + 1) * d].unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2)
                   for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class SlicedGPT(TinyGPT):
    """TinyGPT whose hidden states are strided views, as models make them with a slice: the token embedding is
    twice as wide and the blocks add its two halves taken feature by feature (``wide[..., ::2]``), the first
    block's attention gets a hidden state that is a stride-2 view (not copied before SDPA), and every attention
    slices q, k and v out of one fused projection."""

    def __init__(self, dim=64, heads=4):
        super().__init__(dim=dim, heads=heads)
        torch.manual_seed(1)
        self.tok = nn.Embedding(96, 2 * dim)
        for blk in self.blocks:
            blk["attn"] = SlicedAttention(dim, heads)

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:  # the one-process reference
            position_ids = torch.arange(input_ids.shape[1])[None]
        wide = self.tok(input_ids)
        x = wide[..., ::2] + wide[..., 1::2] + self.pos(position_ids)
        for i, blk in enumerate(self.blocks):
            h = blk["ln1"](x)
            if i == 0:
                h = torch.stack([h, torch.zeros_like(h)], dim=-1)[..., 0]  # h itself, as a stride-2 view
                assert h.stride(-1) == 2
            x = x + blk["attn"](h)
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(x)


MODELS = {
    "llama": lambda: tiny_llama().double(),
    "gpt": lambda: TinyGPT().double(),
    "minimax": lambda: _eager_experts(tiny_minimax().double()),
    "qwen3_next": _qwen3_next,
    "sliced_gpt": lambda: SlicedGPT().double(),
}


# ---------------------------------------------------------------------------------------------------
# one step of a composed job against one float64 process
# ---------------------------------------------------------------------------------------------------


def _cost_model(model_name: str, world: int, mem_tokens: int | None):
    if model_name == "qwen3_next":
        from tests.test_delta_rule_models import hybrid_cost_model

        return hybrid_cost_model(world)
    from tests.test_planner_runtime import cost_model_for

    return cost_model_for(world, mem_tokens)


def _reference(model_name: str, model, sequences):
    guard = contextlib.nullcontext()
    if model_name == "qwen3_next":  # transformers' delta rule computes in float32 whatever the model's dtype
        from tests.test_delta_rule_models import float64_delta_rules

        guard = float64_delta_rules()
    with guard:
        return reference_loss_and_grads(model, sequences)


def composed_step_matches_reference(model_name, lengths, *, strategy="ring", linear_strategy="zeco", fsdp=False,
                                    checkpointing=None, compile=False, budget=None, mem_tokens=None,
                                    batch_form="list", overlap=False, dp_sp=False):
    """One training step with the given composition on every rank. Returns the loss's and the worst gradient's
    relative error (and that gradient's name), parameters left without a gradient, the step's plan group sizes,
    the number of forwards it ran (micro-batches) and, compiled, the SP attention calls in the captured graphs.

    ``dp_sp``: a ("dp", "sp") mesh of 2 replicas; replica r trains on sequences r, r + 2, ... and the reference
    is one process on all of them."""
    world = torch.distributed.get_world_size()
    model = MODELS[model_name]()
    sequences = _sequences(lengths)
    ref_loss, ref_grads = _reference(model_name, model, sequences)
    mesh = None
    if dp_sp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "sp"))
        sequences, lengths = sequences[mesh.get_local_rank("dp")::2], lengths[mesh.get_local_rank("dp")::2]
        world //= 2
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    if fsdp:
        _fully_shard(model)
    cost_model = _cost_model(model_name, world, mem_tokens) if strategy == "auto" else None
    sp_model = seqpar.parallelize(model, mesh=mesh, strategy=strategy, linear_strategy=linear_strategy,
                                  cost_model=cost_model, overlap_grad_sync=overlap)
    call, recorder = sp_model, None
    if compile:
        from tests.test_compile import GraphRecorder

        torch._dynamo.reset()
        recorder = GraphRecorder()  # aot_eager, keeping the graphs Dynamo captured
        call = torch.compile(sp_model, backend=recorder)
    if batch_form == "packed":  # one flat row and its boundaries, as a packing data loader hands it over
        bounds = torch.tensor([0] + [int(n) for n in lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch = {"input_ids": torch.cat(sequences)[None], "cu_seqlens": bounds}
    elif batch_form == "strided_padded":  # (B, S) ids and mask, right-padded, as every other column of a buffer
        ids, mask = torch.full((len(lengths), 2 * max(lengths)), 7), torch.zeros(len(lengths), 2 * max(lengths))
        for row, seq in enumerate(sequences):
            ids[row, : 2 * len(seq): 2], mask[row, : 2 * len(seq): 2] = seq, 1
        batch = {"input_ids": ids[:, ::2], "attention_mask": mask[:, ::2]}
        assert not batch["input_ids"].is_contiguous()
    else:
        batch = sequences
    from tests.test_planner_runtime import train_micro_batches

    loss, plan, ran = train_micro_batches(call, sp_model.prepare(batch, max_tokens_per_rank=budget))
    sp_model.sync_gradients()  # a no-op under FSDP2, whose reduce-scatter already summed
    grads = {n: _dense(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    missing = sorted(set(ref_grads) - set(grads))
    errors = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
    worst = max(errors, key=errors.get)
    sizes = None if plan is None else sorted(len(g.ranks) for g in plan.groups)
    compiled_sp_calls = None
    if compile:  # the SP attention calls the compiled graphs hold (0: Dynamo ran nothing of the model)
        compiled_sp_calls = recorder.count(torch.ops.seqpar.softmax_attention.default)
        torch._dynamo.reset()
    return (abs(loss - ref_loss) / abs(ref_loss), (worst, errors[worst]), missing, sizes, ran, compiled_sp_calls)


def check(results, *, replicas=1):
    for loss_err, (worst, grad_err), missing, *_ in results:
        assert loss_err < TOL and grad_err < TOL and not missing, (loss_err, worst, grad_err, missing)
    per_replica = len(results) // replicas
    for r in range(replicas):  # every rank of a replica ran its rank 0's plan
        mine = results[r * per_replica:(r + 1) * per_replica]
        assert all(x[3] == mine[0][3] for x in mine), [x[3] for x in mine]


# ---------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------


def test_compiled_model_under_fsdp2():
    # the plain GPT (SDPA): its capture costs a fraction of the Llama's (test_compile.py compiles both unwrapped)
    results = run_distributed(composed_step_matches_reference, 2, "gpt", [40, 17], fsdp=True, compile=True,
                              timeout=900)
    check(results)
    # Dynamo captured the SP attention call (FSDP2's blocks are separate frames; both layers reuse one graph)
    assert all(r[5] >= 1 for r in results), [r[5] for r in results]


def test_auto_under_fsdp2_at_three_ranks():
    # an odd world: the plan's groups are 2 + 1 ranks; FSDP2 shards every parameter over all 3
    results = run_distributed(composed_step_matches_reference, 3, "llama", [512, 16, 40, 24], strategy="auto",
                              fsdp=True)
    check(results)
    sizes = results[0][3]
    assert sum(sizes) == 3 and len(sizes) > 1 and max(sizes) > 1, sizes  # the 512 split, the rest on one rank


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_auto_with_activation_checkpointing(checkpointing):
    results = run_distributed(composed_step_matches_reference, 3, "llama", [512, 16, 40, 24], strategy="auto",
                              checkpointing=checkpointing)
    check(results)
    assert max(results[0][3]) > 1, results[0][3]  # some sequence was split: the recomputation ran SP ops


def test_auto_planned_micro_batches_under_fsdp2():
    # memory for ~160 packed tokens per rank: the plan runs groups as several calls; FSDP2's collectives must
    # stay matched while groups run different numbers of real micro-batches
    results = run_distributed(composed_step_matches_reference, 2, "llama", [150, 150, 150, 150, 20],
                              strategy="auto", fsdp=True, mem_tokens=160)
    check(results)
    assert all(r[4] > 1 for r in results)


def test_auto_budget_micro_batches_under_fsdp2_with_checkpointing():
    results = run_distributed(composed_step_matches_reference, 4, "llama", [40, 36, 32, 28, 20, 12],
                              strategy="auto", fsdp=True, budget=40, checkpointing="non_reentrant")
    check(results)
    assert all(r[4] == 2 for r in results)


@pytest.mark.parametrize("model_name, linear_strategy", [("qwen3_next", "zeco"), ("qwen3_next", "lasp2"),
                                                         ("minimax", "lasp2"), ("minimax", "zeco")])
def test_linear_models_with_checkpointing_under_fsdp2(model_name, linear_strategy):
    """Gated DeltaNet (a delta-rule SP op and the sharded conv1d) and MiniMax's lightning attention (a linear SP
    op), both hybrids with a softmax layer, recomputed by non-reentrant checkpointing inside FSDP2 blocks."""
    results = run_distributed(composed_step_matches_reference, 2, model_name, [40, 13],
                              linear_strategy=linear_strategy, fsdp=True, checkpointing="non_reentrant")
    check(results)


@pytest.mark.parametrize("model_name", ["llama", "qwen3_next"])
def test_unequal_shards_of_a_packed_batch_at_three_ranks(model_name):
    # 23 + 5 + 36 = 64 tokens, no length a multiple of 3 (nor of zigzag's 6), the 5-token sequence shorter than
    # a rank's share of the conv1d's halo (width 4): every shard is padded, some shards hold padding only
    results = run_distributed(composed_step_matches_reference, 3, model_name, [23, 5, 36], batch_form="packed",
                              linear_strategy="lasp2")
    check(results)


@pytest.mark.parametrize("strategy, batch_form", [("ring", "strided_padded"), ("ulysses", "list")])
def test_strided_hidden_states(strategy, batch_form):
    """Strided hidden states inside the model; with "strided_padded" the batch's ids and padding mask are also
    column views of a wider buffer."""
    results = run_distributed(composed_step_matches_reference, 2, "sliced_gpt", [48, 19], strategy=strategy,
                              batch_form=batch_form)
    check(results)


@pytest.mark.parametrize("model_name, lengths, options", [
    ("llama", [512, 16, 40, 24], dict(strategy="auto", checkpointing="non_reentrant")),
    ("minimax", [40, 8, 13, 6], dict(linear_strategy="zeco", checkpointing="non_reentrant", budget=20)),
])
def test_dp_sp_mesh_under_fsdp2(model_name, lengths, options):
    """Two replicas of 2 ranks, each on its own half of the batch (sequences 0, 2 and 1, 3), FSDP2 over all 4
    ranks, checkpointed. "auto" plans each replica on its own: replica 0 splits its 512 tokens over both ranks,
    replica 1 runs its two short sequences unsplit. The linear model's replica 0 needs 2 micro-batches under the
    budget, replica 1 one: it runs a placeholder second, so FSDP2's collectives stay matched."""
    results = run_distributed(composed_step_matches_reference, 4, model_name, lengths, fsdp=True, dp_sp=True,
                              **options)
    check(results, replicas=2)
    if "strategy" in options:
        assert results[0][3] == [2] and results[2][3] == [1, 1], (results[0][3], results[2][3])
    else:
        assert all(r[4] == 2 for r in results)


# ---------------------------------------------------------------------------------------------------
# wrappers applied to the SPModel itself
# ---------------------------------------------------------------------------------------------------


def wrapped_around_sp_model(wrap):
    """FSDP2 with the SPModel as its root (the layers inside it sharded first), or DDP around the SPModel: the
    loss and gradient errors of one step, or the ValueError's message."""
    model = tiny_llama().double()
    sequences = _sequences([40, 13])
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    sp_model = seqpar.parallelize(model, strategy="ring")
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        outer = fully_shard(sp_model)
    else:
        outer = torch.nn.parallel.DistributedDataParallel(sp_model)
    try:
        out = outer(**sp_model.prepare(sequences))
    except ValueError as err:
        return str(err)
    out.loss.backward()  # FSDP2's reduce-scatter gives the gradients: sync_gradients must do nothing more
    sp_model.sync_gradients()
    grad_err = max(rel_err(_dense(p.grad), ref_grads[n]) for n, p in model.named_parameters())
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err


def test_fully_shard_with_the_sp_model_as_root():
    # before: the root's parameters (embedding, final norm, head) kept FSDP's average, off by the world size
    for loss_err, grad_err in run_distributed(wrapped_around_sp_model, 2, "fsdp"):
        assert loss_err < TOL and grad_err < TOL, (loss_err, grad_err)


def test_ddp_around_the_sp_model_is_refused():
    # DDP would average the ranks' shares (the gradient is their sum); wrapping the model before parallelize works
    for message in run_distributed(wrapped_around_sp_model, 2, "ddp"):
        assert isinstance(message, str) and message.startswith("model: DistributedDataParallel wraps the SPModel")
        assert "parallelize(DistributedDataParallel(model)" in message, message
