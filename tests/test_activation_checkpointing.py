"""Activation checkpointing under parallelize on 4 real gloo ranks: transformers' gradient checkpointing
(reentrant and not) and torch.utils.checkpoint on user blocks, with every registered softmax strategy. The
recomputed forward runs inside the original forward's SP context (before: "attention was called outside a
seqpar-parallelized forward" during backward), gives the single-process float64 gradients, and repeats the
forward's communication exactly once."""

import pytest
import torch
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import TinyGPT, reference_loss_and_grads, tiny_llama
from torch.utils.checkpoint import checkpoint

import seqpar
from seqpar import strategies

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

LENGTHS = [48, 32]


def _step(sp_model, sequences):
    """One step; the communication of the forward and of the backward, counted separately."""
    local = sp_model.prepare(sequences)
    with seqpar.count_comm() as forward:
        out = sp_model(**local)
    with seqpar.count_comm() as backward:
        out.loss.backward()
    sp_model.sync_gradients()
    return out.loss.item(), forward, backward


def _without_loss_all_reduce(stats):
    """Bytes by op of the model's own forward: the forward's count minus the loss's one all-reduce."""
    assert stats.calls.get("all_reduce") == 1, stats.calls  # the SP ops here do not all-reduce
    return {op: n for op, n in stats.bytes_by_op.items() if op != "all_reduce"}


def checkpointed_llama_matches_reference(strategy):
    """For a plain run and each HF checkpointing mode: (loss error, worst gradient error, forward bytes by op,
    recomputation bytes by op = backward bytes minus the plain run's backward bytes)."""
    sequences = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    ref_loss, ref_grads = reference_loss_and_grads(tiny_llama().double(), sequences)
    results, plain_backward = {}, None
    for mode in ("plain", "reentrant", "non_reentrant"):
        model = tiny_llama().double().train()
        if mode != "plain":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        sp_model = seqpar.parallelize(model, strategy=strategy, verify_model=False)
        loss, forward, backward = _step(sp_model, sequences)
        if mode == "plain":
            plain_backward = backward.bytes_by_op
        recomputed = {op: n - plain_backward.get(op, 0) for op, n in backward.bytes_by_op.items()}
        grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters())
        results[mode] = (abs(loss - ref_loss) / abs(ref_loss), grad_err, _without_loss_all_reduce(forward),
                         {op: n for op, n in recomputed.items() if n})
    return results


@pytest.mark.parametrize("strategy", strategies.names("softmax"))
def test_hf_gradient_checkpointing_equals_single_process_and_repeats_forward_comm(strategy):
    for rank_results in run_distributed(checkpointed_llama_matches_reference, 4, strategy):
        forward_bytes = rank_results["plain"][2]
        assert sum(forward_bytes.values()) > 0
        assert rank_results["plain"][3] == {}
        for mode, (loss_err, grad_err, forward, recomputed) in rank_results.items():
            assert loss_err < 1e-6 and grad_err < 1e-6, (mode, loss_err, grad_err)
            assert forward == forward_bytes, mode
            if mode != "plain":  # the recomputation sends exactly the forward's bytes once more
                assert recomputed == forward_bytes, (mode, recomputed, forward_bytes)


class CheckpointedGPT(TinyGPT):
    """TinyGPT whose attention blocks run under torch.utils.checkpoint (non-reentrant), as a user writes it."""

    def forward(self, input_ids, position_ids=None):
        x = self.tok(input_ids) + self.pos(position_ids)
        for blk in self.blocks:
            x = x + checkpoint(lambda h, blk=blk: blk["attn"](blk["ln1"](h)), x, use_reentrant=False)
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(x)


def checkpointed_gpt_matches_reference(strategy):
    sequences = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    ref_loss, ref_grads = reference_loss_and_grads(TinyGPT().double(), sequences)
    _, _, plain_backward = _step(seqpar.parallelize(TinyGPT().double(), strategy=strategy), sequences)
    model = CheckpointedGPT().double()
    loss, forward, backward = _step(seqpar.parallelize(model, strategy=strategy), sequences)
    grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    recomputed = {op: n - plain_backward.bytes_by_op.get(op, 0) for op, n in backward.bytes_by_op.items()}
    return (abs(loss - ref_loss) / abs(ref_loss), grad_err, _without_loss_all_reduce(forward),
            {op: n for op, n in recomputed.items() if n})


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_torch_checkpoint_on_user_sdpa_blocks(strategy):
    for loss_err, grad_err, forward, recomputed in run_distributed(checkpointed_gpt_matches_reference, 4, strategy):
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)
        # the recomputed SDPA calls were routed to the SP op again (a local SDPA would send nothing)
        assert recomputed == forward, (recomputed, forward)


def checkpointed_fsdp_llama(reentrant):
    from torch.distributed.fsdp import fully_shard

    sequences = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    ref_loss, ref_grads = reference_loss_and_grads(tiny_llama().double(), sequences)
    model = tiny_llama().double().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sp_model = seqpar.parallelize(model, strategy="ring")
    out = sp_model(**sp_model.prepare(sequences))
    out.loss.backward()
    grad_err = max(rel_err(p.grad.full_tensor(), ref_grads[n]) for n, p in model.named_parameters())
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_under_fsdp(reentrant):
    for loss_err, grad_err in run_distributed(checkpointed_fsdp_llama, 4, reentrant):
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)
