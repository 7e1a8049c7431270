"""parallelize composed with FSDP2 (fully_shard per layer + root) and DistributedDataParallel, and a dp x sp
device mesh, on 4 real gloo ranks: after ``out.loss.backward()`` (no extra call) every gradient equals the
single-process float64 gradient of the same model on the same (union of the) data."""

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import cpu_cost_model, reference_loss_and_grads, tiny_llama

import seqpar

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

# short sequences of different lengths: with "auto" some plan groups get several, and with [24, 16] some none
LENGTHS = [64, 24, 16]


def _sequences(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=gen) for n in lengths]


def _fully_shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _dense(grad):
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def wrapped_matches_reference(wrap, strategy, lengths, order="before"):
    """Loss error, worst gradient error, parameters without a gradient and whether the rank's plan group got a
    sequence, for one training step of the wrapped tiny Llama against one process."""
    model = tiny_llama().double()
    sequences = _sequences(lengths)
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    if wrap == "fsdp" and order == "before":
        _fully_shard(model)
    elif wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    cost_model = cpu_cost_model() if strategy == "auto" else None
    sp_model = seqpar.parallelize(model, strategy=strategy, cost_model=cost_model)
    if wrap == "fsdp" and order == "after":
        _fully_shard(sp_model.module)
    local = sp_model.prepare(sequences)
    out = sp_model(**local)
    out.loss.backward()  # no sync_gradients: the wrapper's own reduction must give the single-device gradient
    grads = {n: _dense(p.grad) for n, p in sp_model.inner_model.named_parameters() if p.grad is not None}
    missing = sorted(set(ref_grads) - set(grads))
    grad_err = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads if n in grads)
    real_tokens = bool((local["labels"] != -100).any())
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err, missing, real_tokens


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "token_ring", "auto"])
@pytest.mark.parametrize("wrap", ["fsdp", "ddp"])
def test_wrapped_gradients_equal_single_process(wrap, strategy):
    results = run_distributed(wrapped_matches_reference, 4, wrap, strategy, LENGTHS)
    for loss_err, grad_err, missing, _ in results:
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (loss_err, grad_err, missing)


def test_auto_under_fsdp_with_idle_groups():
    # two short sequences on four ranks: some plan groups get none and run a padding placeholder, so FSDP's
    # all-gathers and reduce-scatters stay matched (before, those ranks skipped the forward and everyone hung)
    results = run_distributed(wrapped_matches_reference, 4, "fsdp", "auto", [24, 16])
    assert not all(real for *_, real in results)  # some rank really was idle
    for loss_err, grad_err, missing, _ in results:
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (loss_err, grad_err)


def test_fully_shard_after_parallelize():
    for loss_err, grad_err, missing, _ in run_distributed(wrapped_matches_reference, 4, "fsdp", "ring", LENGTHS,
                                                          order="after"):
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (loss_err, grad_err)


# ---------------------------------------------------------------------------------------------------
# dp x sp mesh
# ---------------------------------------------------------------------------------------------------

REPLICA_LENGTHS = ([48, 20], [32, 40, 8])  # replica 0's batch, replica 1's batch: different data


def replica_cost_model():
    """``cpu_cost_model`` for the 2 ranks of one replica: "auto" plans inside each replica's sp ranks."""
    from dataclasses import replace

    from seqpar.solver import CostModel

    four = cpu_cost_model()
    return CostModel(replace(four.cluster, world_size=2, gpus_per_node=2), four.model)


def mesh_matches_reference(strategy, wrap):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    replica = mesh.get_local_rank("dp")
    batches = [_sequences(lengths, seed=10 + r) for r, lengths in enumerate(REPLICA_LENGTHS)]
    model = tiny_llama().double()
    ref_loss, ref_grads = reference_loss_and_grads(model, batches[0] + batches[1])  # one process, the union
    if wrap == "fsdp":
        _fully_shard(model)
    cost_model = replica_cost_model() if strategy == "auto" else None
    sp_model = seqpar.parallelize(model, mesh=mesh, strategy=strategy, cost_model=cost_model)
    out = sp_model(**sp_model.prepare(batches[replica]))
    out.loss.backward()
    sp_model.sync_gradients()  # the bucketed all-reduce without a wrapper; a no-op under FSDP
    grads = {n: _dense(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    grad_err = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    sp_size = dist.get_world_size(sp_model.group)
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err, sp_size, out.num_tokens


@pytest.mark.parametrize("strategy,wrap", [("ring", None), ("auto", None), ("ulysses", "fsdp")])
def test_dp_sp_mesh_equals_one_process_on_the_union(strategy, wrap):
    results = run_distributed(mesh_matches_reference, 4, strategy, wrap)
    union_labels = sum(n - 1 for lengths in REPLICA_LENGTHS for n in lengths)
    for loss_err, grad_err, sp_size, num_tokens in results:
        assert sp_size == 2 and num_tokens == union_labels
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)


def mesh_errors():
    from tests.checks import value_errors
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    bad_names = init_device_mesh("cpu", (2, 2), mesh_dim_names=("x", "y"))
    sp_only = seqpar.parallelize(tiny_llama(), mesh=init_device_mesh("cpu", (4,), mesh_dim_names=("sp",)),
                                 verify_model=False)  # a 1-D mesh named "sp" is one replica over all ranks
    assert sp_only.world_size == 4 and sp_only.config.dp_group is None
    return value_errors({
        "both": lambda: seqpar.parallelize(tiny_llama(), mesh=mesh, group=dist.group.WORLD),
        "names": lambda: seqpar.parallelize(tiny_llama(), mesh=bad_names),
        "not-a-mesh": lambda: seqpar.parallelize(tiny_llama(), mesh="dp,sp"),
    })


def test_bad_mesh_is_refused_naming_the_argument():
    for messages in run_distributed(mesh_errors, 4):
        assert messages["both"].startswith("mesh:") and "not both" in messages["both"]
        assert messages["names"].startswith("mesh:") and "('dp', 'sp')" in messages["names"]
        assert messages["not-a-mesh"].startswith("mesh:")


# ---------------------------------------------------------------------------------------------------
# sync_gradients without a wrapper: bounded buckets, optionally started from backward hooks
# ---------------------------------------------------------------------------------------------------


def bucketed_sync_matches_reference(overlap, micro_batches):
    """Gradient error, the number of buckets, and the all-reduces started in each backward and in
    sync_gradients (every all-reduce but the loss's one per forward)."""
    model = tiny_llama().double()
    sequences = _sequences(LENGTHS)
    _, ref_grads = reference_loss_and_grads(model, sequences)
    bucket_bytes = 64 * 1024  # the tiny Llama's ~0.5 MB of float64 gradients: several buckets
    sp_model = seqpar.parallelize(model, strategy="ring", grad_bucket_bytes=bucket_bytes, overlap_grad_sync=overlap)
    inputs = sp_model.prepare(sequences, max_tokens_per_rank=16 if micro_batches else None)
    started_in_backward = []
    for local in inputs if micro_batches else [inputs]:
        out = sp_model(**local)
        with seqpar.count_comm() as backward:
            out.loss.backward()
        started_in_backward.append(backward.calls.get("all_reduce", 0))
    with seqpar.count_comm() as sync:
        sp_model.sync_gradients()
    buckets = sp_model._grad_sync.buckets
    largest = max(sum(p.numel() * p.element_size() for p in b) for b in buckets if len(b) > 1)
    grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    return grad_err, len(buckets), largest <= bucket_bytes, started_in_backward, sync.calls.get("all_reduce", 0)


@pytest.mark.parametrize("overlap", [False, True])
def test_bucketed_sync_gradients(overlap):
    for grad_err, buckets, bounded, in_backward, in_sync in run_distributed(bucketed_sync_matches_reference, 4,
                                                                            overlap, False):
        assert grad_err < 1e-6 and buckets > 3 and bounded
        if overlap:  # every bucket was started by backward hooks; sync_gradients only waited
            assert in_backward == [buckets] and in_sync == 0
        else:
            assert in_backward == [0] and in_sync == buckets


def test_overlapped_sync_starts_only_in_the_last_micro_batch():
    for grad_err, buckets, _, in_backward, in_sync in run_distributed(bucketed_sync_matches_reference, 4,
                                                                      True, True):
        assert grad_err < 1e-6 and len(in_backward) > 1
        assert in_backward == [0] * (len(in_backward) - 1) + [buckets] and in_sync == 0
