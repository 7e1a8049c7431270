"""Device-correct communication: every tensor seqpar hands to torch.distributed lives on the device its group's
backend requires (CUDA for NCCL, CPU for gloo), checked by ``comm.device_audit``.

The trick that makes this testable on a CPU-only machine: every tensor is on the CPU, so a tensor created
without an explicit device would land on the right device by luck. The audited code therefore runs under
``torch.set_default_device("meta")``, with its inputs created explicitly on the CPU beforehand. A tensor that
seqpar derives from its inputs (``empty_like``, ``device=q.device``, ``required_device(group)``) stays on the
CPU; one created without a device (``torch.tensor([n])``) lands on "meta", the place it would be wrong on an
NCCL cluster, and the audit, which expects the inputs' device (CPU: ``device_audit(required_device="cpu")``),
raises ``DeviceMismatchError`` naming the op and the tensor before anything is sent. The same run compares the
op's output and gradients with the float64 reference, so the audited path is also the correct one.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed

from seqpar import strategies
from seqpar.collectives import comm
from seqpar.collectives.layout import shard_sequence
from seqpar.kernels.reference import reference_attention, reference_linear_attention


@contextlib.contextmanager
def meta_default_device():
    """Tensors created without a device land on "meta" inside the block (see the module docstring)."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def audited_op(name: str, seed: int = 0) -> dict:
    """Run strategy ``name``'s op forward and backward under the audit; return its errors against the float64
    reference and what the audit saw."""
    strategy = strategies.get(name)
    op = strategy.load_op()
    gen = torch.Generator().manual_seed(seed)
    b, s, h, h_kv, d = 1, 8 * dist.get_world_size(), 4, 2 if strategy.kind == "softmax" else 4, 8
    q, k, v, dout = (torch.randn(shape, generator=gen, dtype=torch.float64)
                     for shape in ((b, s, h, d), (b, s, h_kv, d), (b, s, h_kv, d), (b, s, h, d)))
    log_decay = -torch.rand(h, generator=gen, dtype=torch.float64) if strategy.kind == "linear" else None
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    if strategy.kind == "softmax":
        ref_out, _ = reference_attention(*leaves, causal=True)
        layout, kwargs = "zigzag", {"causal": True}
    else:
        ref_out, _ = reference_linear_attention(*leaves, log_decay=log_decay)
        layout, kwargs = "contiguous", {"log_decay": log_decay}
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
    local = [shard_sequence(t, layout=layout).clone().requires_grad_(True) for t in (q, k, v)]
    local_dout = shard_sequence(dout, layout=layout)
    with meta_default_device(), comm.device_audit(required_device="cpu") as audit:
        out = op(*local, layout=layout, **kwargs)
        out.backward(local_dout)
    errors = {"out": rel_err(out, shard_sequence(ref_out, layout=layout))}
    for grad_name, got, ref in zip(("dq", "dk", "dv"), (t.grad for t in local), ref_grads):
        errors[grad_name] = rel_err(got, shard_sequence(ref, layout=layout))
    return {"errors": errors, "calls": audit.calls}


def world_size_for(name: str) -> int:
    return max(2, strategies.get(name).min_degree)


@pytest.mark.parametrize("name", strategies.names())
def test_every_sp_op_hands_torch_distributed_only_tensors_on_the_required_device(name):
    for rank, got in enumerate(run_distributed(audited_op, world_size_for(name), name)):
        assert max(got["errors"].values()) < 1e-10, (rank, got["errors"])
        assert got["calls"], f"{name}: the audit saw no transfer on rank {rank}"
        assert {device for _, _, device in got["calls"]} == {"cpu"}, got["calls"]
        ops = " ".join(op for op, _, _ in got["calls"])
        assert "agreement check" in ops, ops  # the cross-rank check's metadata is audited too


def sloppy_all_reduce() -> str:
    with meta_default_device(), comm.device_audit(required_device="cpu"):
        try:
            comm.all_reduce(torch.ones(3))  # no device: "meta" here, the CPU on an NCCL cluster
        except comm.DeviceMismatchError as err:
            return str(err)
    return "not caught"


def test_the_audit_catches_a_tensor_created_without_a_device():
    for message in run_distributed(sloppy_all_reduce, 2):
        assert message.startswith("seqpar: all_reduce on rank") and "is on meta" in message, message
        assert "requires cpu" in message, message


def metadata_transfers() -> dict:
    """broadcast_bytes and the consistency check create their own tensors (lengths, digests): under the meta
    default they must still be on the group's required device, and carry the right bytes."""
    payload = b"plan of rank 0" if dist.get_rank() == 0 else None
    with meta_default_device(), comm.device_audit(required_device="cpu") as audit:
        got = comm.broadcast_bytes(payload, src=0)
        comm.check_consistent("same on every rank", what="audit test")
    return {"payload": got, "calls": audit.calls}


def test_broadcast_bytes_and_the_consistency_check_use_the_required_device():
    for got in run_distributed(metadata_transfers, 2):
        assert got["payload"] == b"plan of rank 0"
        assert {device for _, _, device in got["calls"]} == {"cpu"}, got["calls"]
        roles = [role for op, role, _ in got["calls"] if op.startswith("broadcast")]
        assert roles == ["header"], got["calls"]  # a short payload travels with its length: one broadcast
        assert any(op.startswith("agreement check of audit test") for op, _, _ in got["calls"]), got["calls"]


def nccl_like_group() -> dict:
    """A group configured to require another device (as NCCL requires CUDA) rejects CPU tensors, names the op,
    and its buffers are allocated there; clearing the override returns to what gloo requires."""
    world = dist.group.WORLD
    before = comm.required_device(world)
    comm.set_required_device(world, "meta")
    try:
        configured = comm.required_device(world)
        with comm.device_audit():
            try:
                comm.all_gather(torch.ones(2, device="cpu"))
                message = "not caught"
            except comm.DeviceMismatchError as err:
                message = str(err)
    finally:
        comm.set_required_device(world, None)
    return {"before": str(before), "configured": str(configured), "after": str(comm.required_device(world)),
            "message": message}


def test_a_group_can_be_made_nccl_like_for_a_test():
    for got in run_distributed(nccl_like_group, 2):
        assert (got["before"], got["configured"], got["after"]) == ("cpu", "meta", "cpu")
        assert got["message"].startswith("seqpar: all_gather on rank") and "is on cpu" in got["message"]
        assert "requires meta" in got["message"]


def test_outside_an_audit_nothing_is_recorded_or_checked():
    # the default-off path: a wrong-device tensor is not looked at (gloo itself then decides)
    from seqpar.collectives.comm import devices

    devices.audit("all_reduce", None, [("input", torch.ones(1, device="meta"))])  # no group needed, no raise
    assert devices._devices.audits == []


def audited_training_step(strategy: str) -> dict:
    """One parallelize training step (forward, backward, gradient sync) under the audit and the meta default;
    its loss and gradients against the single-process float64 ones."""
    import seqpar
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).double()
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 64, (n,), generator=gen) for n in (24, 9)]
    reference = 0.0
    total_tokens = sum(len(t) - 1 for t in batch)
    for seq in batch:  # global token mean over the batch, one process
        out = model(input_ids=seq[None], labels=seq[None])
        reference = reference + out.loss * (len(seq) - 1) / total_tokens
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sp_model = seqpar.parallelize(model, strategy=strategy)
    with meta_default_device(), comm.device_audit(required_device="cpu") as audit:
        local = sp_model.prepare(batch)
        out = sp_model(**local)
        out.loss.backward()
        sp_model.sync_gradients()
    grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    return {"loss_err": abs(float(out.loss) - float(reference)) / abs(float(reference)), "grad_err": grad_err,
            "devices": {device for _, _, device in audit.calls}}


@pytest.mark.parametrize("strategy", ["ring", "auto"])
def test_a_whole_parallelize_training_step_uses_the_required_device(strategy):
    pytest.importorskip("transformers")
    for got in run_distributed(audited_training_step, 2, strategy):
        assert got["devices"] == {"cpu"}
        assert got["loss_err"] < 1e-6 and got["grad_err"] < 1e-6, got  # float64 model, float32 loss


def broadcast_many_sizes(sizes: list[int]) -> list[tuple[bool, list[str]]]:
    """Broadcast payloads of ``sizes`` bytes (distinct byte patterns) from the LAST rank; per payload, whether
    every byte arrived and the roles of the broadcasts it took."""
    src = dist.get_world_size() - 1
    out = []
    for n in sizes:
        expected = bytes((7 * k + n) % 251 for k in range(n))
        with comm.device_audit(required_device="cpu") as audit:
            got = comm.broadcast_bytes(expected if dist.get_rank() == src else None, src=src)
        out.append((got == expected, [role for op, role, _ in audit.calls if op.startswith("broadcast")]))
    return out


def test_broadcast_bytes_sends_a_long_payload_in_two_messages_and_a_short_one_in_one():
    inline = comm.transport.BROADCAST_INLINE_BYTES - 8
    sizes = [0, 1, inline - 1, inline, inline + 1, 3 * inline + 5]
    for results in run_distributed(broadcast_many_sizes, 3, sizes):
        assert [ok for ok, _ in results] == [True] * len(sizes)
        assert [roles for _, roles in results] == [["header"]] * 4 + [["header", "rest"]] * 2
