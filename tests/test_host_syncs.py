"""Host syncs in one training step of parallelize (prepare, forward, backward, sync_gradients) on 2 real gloo
ranks: every read of a tensor's value into Python (``item``, ``tolist``, ``bool``, ``int``, ``float``, ``index``,
``numpy``) is counted by the call site that made it. The wrapper and the runtime make none in the forward (the
loss sum and count are all-reduced on the device), the backward or ``sync_gradients``; each remaining site is
listed below with why it reads the host, so a new one fails this test."""

import sys

import pytest
import torch
from tests.harness import run_distributed
from tests.test_parallelize import tiny_llama

import seqpar

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")

# (file, function) of every host read left in a step, and why it is there
JUSTIFIED = {
    # prepare: the packed layout's boundaries are a CPU tensor built from Python ints; validating them reads
    # them back (no device involved)
    ("varlen.py", "validate_cu_seqlens"): "prepare / ring's argument check: cu_seqlens to a Python list",
    # the reference varlen attention kernels (seqpar.kernels.attention, CPU/Triton fallbacks) slice each packed
    # sequence with Python ints and test for equal lengths to batch them
    ("attention.py", "_as_batch"): "kernel: equal-length test of cu_seqlens to run packed sequences as a batch",
    ("attention.py", "_pairs"): "kernel: per-sequence slice bounds from cu_seqlens",
    # the cross-rank agreement check (on by default, issue 14) must decide on the host whether to raise before the
    # op's first transfer: it reads its gathered 32-byte record, once per SP op call (SEQPAR_CHECK_AGREEMENT=0
    # or parallelize(check_consistency=False) removes it)
    ("agreement.py", "_compare"): "agreement check: the gathered record, once per SP op call",
    # transformers' masking_utils looks for packed sequences in position_ids (its own dynamic control flow)
    ("masking_utils.py", "find_packed_sequence_indices"): "transformers: packed-sequence detection",
}
OURS = ("seqpar/wrapper.py", "seqpar/runtime/")


def _reader(name, original, log):
    def read(self, *args, **kwargs):
        frame = sys._getframe(1)
        # seqpar's SDPA interceptor (a TorchFunctionMode) re-dispatches every tensor method its forward sees:
        # the read was counted at its real call site already
        if not (frame.f_code.co_name == "__torch_function__" and frame.f_code.co_filename.endswith("integrations.py")):
            log.append((frame.f_code.co_filename, frame.f_code.co_name, name))
        return original(self, *args, **kwargs)
    return read


def host_reads_in_one_step(form):
    """{phase: [(file, function, read)]} for one step after a warm-up step."""
    sp_model = seqpar.parallelize(tiny_llama(), strategy="ring", verify_model=False)
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, 96, (n,), generator=gen) for n in (64, 32)]
    batch = {"input_ids": torch.stack([sequences[0]] * 2)} if form == "padded" else sequences
    out = sp_model(**sp_model.prepare(batch))  # warm-up: first-use work (group creation, caches) is not per step
    out.loss.backward()
    sp_model.sync_gradients()

    log, phases = [], {}
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    for name, original in originals.items():
        setattr(torch.Tensor, name, _reader(name, original, log))
    try:
        for phase in ("prepare", "forward", "backward", "sync_gradients"):
            start = len(log)
            if phase == "prepare":
                local = sp_model.prepare(batch)
            elif phase == "forward":
                out = sp_model(**local)
            elif phase == "backward":
                out.loss.backward()
            else:
                sp_model.sync_gradients()
            phases[phase] = log[start:]
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return phases


@pytest.mark.parametrize("form", ["packed", "padded"])
def test_host_syncs_in_one_training_step(form):
    phases = run_distributed(host_reads_in_one_step, 2, form)[0]
    counts = {phase: len(reads) for phase, reads in phases.items()}
    print(form, counts)
    for phase, reads in phases.items():
        ours = [r for r in reads if any(part in r[0].replace("\\", "/") for part in OURS)]
        assert not ours, (phase, ours)
        unexplained = {(f.rsplit("/", 1)[-1], fn) for f, fn, _ in reads} - set(JUSTIFIED)
        assert not unexplained, (phase, unexplained)
        assert not any(read == "item" for *_, read in reads), (phase, reads)
    assert counts["sync_gradients"] == 0, counts
    # the backward's reads are the kernels' (recomputing the varlen slices), the forward's also transformers'
    assert {fn for _, fn, _ in phases["backward"]} <= {"_as_batch", "_pairs"}, phases["backward"]
