"""Micro-batches: ``prepare(batch, max_tokens_per_rank=...)`` splits a step; each micro-batch's loss is divided by
the WHOLE step's labelled-token count, so the losses sum to the step loss and the accumulated gradients equal one
process on the whole batch (float64, 4 real gloo ranks)."""

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import cpu_cost_model, reference_loss_and_grads, tiny_llama

import seqpar

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

# zigzag on 4 ranks pads to multiples of 8; tokens per rank: 16, 12, 10, 8, 4. A budget of 24 per rank splits
# greedily into [64], [48, 40], [32, 16]: three micro-batches.
LENGTHS = [64, 48, 40, 32, 16]
BUDGET = 24


def _sequences(lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=gen) for n in lengths]


def micro_batches_match_reference(strategy, budget, wrap=None, overlap=False, padded=False, lengths=LENGTHS):
    """Loss error, gradient error, the number of micro-batches, the largest per-rank token count of any, and the
    labelled tokens of each."""
    model = tiny_llama().double()
    sequences = _sequences(lengths if not padded else [40] * 5)
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    cost_model = cpu_cost_model() if strategy == "auto" else None
    sp_model = seqpar.parallelize(model, strategy=strategy, cost_model=cost_model, overlap_grad_sync=overlap)
    batch = {"input_ids": torch.stack(sequences)} if padded else sequences
    micro_batches = sp_model.prepare(batch, max_tokens_per_rank=budget)
    total = 0.0
    for mb in micro_batches:
        out = sp_model(**mb)
        out.loss.backward()
        total += out.loss.item()
    sp_model.sync_gradients()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in model.named_parameters()}
    grad_err = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    largest = max(mb["input_ids"].numel() for mb in micro_batches)
    labelled = [int((mb["labels"] != -100).sum()) for mb in micro_batches]
    return abs(total - ref_loss) / abs(ref_loss), grad_err, len(micro_batches), largest, labelled


@pytest.mark.parametrize("strategy,wrap,overlap", [("ring", None, False), ("ulysses", None, True),
                                                   ("ring", "fsdp", False)])
def test_three_micro_batches_equal_one_process(strategy, wrap, overlap):
    for loss_err, grad_err, count, largest, _ in run_distributed(micro_batches_match_reference, 4, strategy, BUDGET,
                                                                 wrap=wrap, overlap=overlap):
        assert count == 3 and largest <= BUDGET
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)


def test_padded_batch_rows_split_into_micro_batches():
    # five rows of 40 tokens (10 per rank): a budget of 20 holds two rows per micro-batch: 3 micro-batches
    for loss_err, grad_err, count, largest, _ in run_distributed(micro_batches_match_reference, 4, "ring", 20,
                                                                 padded=True):
        assert count == 3 and largest <= 20
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)


def test_auto_plan_groups_get_the_same_number_of_micro_batches():
    # the CPU cost model runs these six sequences unsplit on single-rank groups, two of them with two sequences
    # (56 and 32 tokens): those split in two micro-batches under a budget of 40, the other groups run a padding
    # placeholder as their second
    results = run_distributed(micro_batches_match_reference, 4, "auto", 40, lengths=[40, 36, 32, 28, 20, 12])
    assert [count for _, _, count, _, _ in results] == [2, 2, 2, 2]
    assert any(labelled[1] == 0 for *_, labelled in results)  # a placeholder ran
    for loss_err, grad_err, count, largest, _ in results:
        assert largest <= 40
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)


def mesh_micro_batches(budget):
    """2 replicas x 2-rank SP; replica 1's batch needs more micro-batches than replica 0's."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    batches = [_sequences([24, 8], seed=5), _sequences([40, 32, 24], seed=6)]
    model = tiny_llama().double()
    ref_loss, ref_grads = reference_loss_and_grads(model, batches[0] + batches[1])
    sp_model = seqpar.parallelize(model, mesh=mesh, strategy="ring")
    micro_batches = sp_model.prepare(batches[mesh.get_local_rank("dp")], max_tokens_per_rank=budget)
    total = 0.0
    for mb in micro_batches:
        out = sp_model(**mb)
        out.loss.backward()
        total += out.loss.item()
    sp_model.sync_gradients()
    grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    return abs(total - ref_loss) / abs(ref_loss), grad_err, len(micro_batches), dist.get_rank()


def test_mesh_replicas_run_the_same_number_of_micro_batches():
    results = run_distributed(mesh_micro_batches, 4, 20)
    # replica 1 alone needs 3 micro-batches of at most 20 tokens per rank (its sequences put 20, 16, 12 on each
    # of its 2 ranks); replica 0 needs 1 and runs 2 placeholders
    assert [r[2] for r in results] == [3, 3, 3, 3]
    for loss_err, grad_err, _, _ in results:
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)


def too_long_sequence():
    from tests.checks import value_errors

    sp_model = seqpar.parallelize(tiny_llama(), strategy="ring", verify_model=False)
    return value_errors({"long": lambda: sp_model.prepare(_sequences([64, 200]), max_tokens_per_rank=32),
                         "zero": lambda: sp_model.prepare(_sequences([64]), max_tokens_per_rank=0)})


def test_sequence_over_the_budget_alone_is_refused():
    for messages in run_distributed(too_long_sequence, 4):
        assert messages["long"].startswith("max_tokens_per_rank:") and "sequence 1" in messages["long"]
        assert messages["zero"].startswith("max_tokens_per_rank:")
