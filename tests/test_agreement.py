"""Cross-rank agreement, on by default: every SP op call raises ValueError on EVERY rank, naming the ranks and
what differs, when the ranks of its group disagree on what must match (issue 14, item 6). Before the check was
on by default each of these mismatches gave a silently wrong result, or aborted the process (sizes).

Also: a matching call passes the check (one fixed-size metadata all-gather) and still equals the float64
reference; per-token inputs, which differ between ranks by design, are not compared; the scoped and
process-wide switches."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from tests.harness import run_distributed
from tests.sp_cases import check_against_reference
from tests.test_lasp2 import GRAD_TOL, OUT_TOL, make_inputs, reference, run_case

from seqpar import collectives
from seqpar.collectives import comm, count_comm
from seqpar.collectives.comm import agreement
from seqpar.collectives.lasp2 import lasp2_linear_attention
from seqpar.collectives.zeco import zeco_linear_attention

SOFTMAX_OPS = ["ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention"]
LINEAR_OPS = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}  # test_lasp2's names
WORLD_SIZES = [2, 3]


@contextlib.contextmanager
def metadata_gathers():
    """Record the agreement check's all-gathers (bytes per rank of each) while the block runs."""
    sizes = []
    original = agreement.gather_uncounted

    def counting(tensor, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return original(tensor, **kwargs)

    agreement.gather_uncounted = counting
    try:
        yield sizes
    finally:
        agreement.gather_uncounted = original


def outcome(call) -> dict:
    """Run ``call`` on this rank: the ValueError message (None when it returned), the bytes the op counted
    before raising, and the agreement check's metadata all-gathers."""
    with metadata_gathers() as gathers, count_comm() as stats:
        try:
            call()
            message = None
        except ValueError as err:
            message = str(err)
    return {"message": message, "op_bytes": stats.bytes_sent, "gathers": gathers}


def assert_every_rank_names(results: list[dict], op: str, world_size: int, *names: str) -> None:
    """Every rank raised, blaming the last rank (the one that differs), naming each of ``names`` and the
    values on each set of ranks; nothing of the op itself was sent."""
    for rank, res in enumerate(results):
        message = res["message"]
        assert message is not None, (rank, "no error: the mismatch went through silently")
        assert message.startswith(f"{op}: ranks [{world_size - 1}] of the group"), (rank, message)
        for name in names:
            assert f"{name}: " in message, (rank, name, message)
        assert f"on ranks [{world_size - 1}]" in message, (rank, message)
        assert res["op_bytes"] == 0, (rank, res["op_bytes"])
        # the fixed-size digest record first, then the readable fingerprints (for contents hashed where they
        # live, their values' lengths are gathered in between)
        gathers = res["gathers"]
        expected = 3 if any(name.endswith(" values") for name in names) else 2
        assert len(gathers) == expected and gathers[0] == 32, (rank, gathers)


# ----------------------------------------------------------------------------------------------------
# Softmax ops: dtype (same byte count), causal, reshaped same-numel, cu_seqlens, different local size
# ----------------------------------------------------------------------------------------------------

SOFTMAX_ROWS = {  # row -> the field the message must name
    "fp16 vs bf16": "dtype",
    "causal flag": "causal",
    "reshaped same-numel": "q shape",
    "cu_seqlens": "cu_seqlens",
    # with the max_seqlen hint (the runtime's packed path) the boundaries are hashed where they live, not read
    "cu_seqlens, hinted": "cu_seqlens values",
    "local size": "q shape",
}


def softmax_mismatches(op_name: str) -> dict:
    """Each row of SOFTMAX_ROWS on every rank; the last rank is the odd one out."""
    op = getattr(collectives, op_name)
    odd = dist.get_rank() == dist.get_world_size() - 1
    gen = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, 8, 2, 16, generator=gen)
    packed = q[0]

    def causal_self_attention(x, **options):
        return op(x, x, x, causal=True, **options)

    calls = {
        "fp16 vs bf16": lambda: causal_self_attention(q.to(torch.bfloat16 if odd else torch.float16)),
        "causal flag": lambda: op(q, q, q, causal=not odd),
        "reshaped same-numel": lambda: causal_self_attention(q.reshape(2, 4, 2, 16) if odd else q),
        "cu_seqlens": lambda: causal_self_attention(packed, cu_seqlens=torch.tensor(
            [0, 2, 8] if odd else [0, 4, 8], dtype=torch.int32)),
        "cu_seqlens, hinted": lambda: causal_self_attention(packed, max_seqlen=4, cu_seqlens=torch.tensor(
            [0, 2, 6, 8] if odd else [0, 4, 6, 8], dtype=torch.int32)),
        "local size": lambda: causal_self_attention(q[:, :4] if odd else q),
    }
    return {row: outcome(call) for row, call in calls.items()}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op_name", SOFTMAX_OPS)
def test_softmax_mismatches_raise_on_every_rank_naming_what_differs(op_name, world_size):
    per_rank = run_distributed(softmax_mismatches, world_size, op_name, timeout=120)
    for row, name in SOFTMAX_ROWS.items():
        assert_every_rank_names([res[row] for res in per_rank], op_name, world_size, name)
    fp16 = per_rank[0]["fp16 vs bf16"]["message"]
    assert "torch.float16 on ranks" in fp16 and f"torch.bfloat16 on ranks [{world_size - 1}]" in fp16, fp16
    assert f"[0, 2, 8] on ranks [{world_size - 1}]" in per_rank[0]["cu_seqlens"]["message"]
    assert f"[0, 2, 6, 8] on ranks [{world_size - 1}]" in per_rank[0]["cu_seqlens, hinted"]["message"]


def softmax_matching(op_name: str) -> dict:
    """A matching call under the default setting: one 32-byte metadata gather, then the float64 reference."""
    h = 6 if dist.get_world_size() == 3 else 4  # Ulysses splits heads
    with metadata_gathers() as gathers:
        errors = check_against_reference(op_name, seq_len=4 * dist.get_world_size(), h=h, h_kv=2, d=16)
    return {"gathers": gathers, "errors": {n: errors[n] for n in ("out", "dq", "dk", "dv")}}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op_name", SOFTMAX_OPS)
def test_softmax_matching_call_passes_the_check_and_equals_the_reference(op_name, world_size):
    for rank, res in enumerate(run_distributed(softmax_matching, world_size, op_name, timeout=120)):
        assert res["gathers"] == [32], (rank, res["gathers"])  # checked, once, without the second gather
        assert res["errors"]["out"] < 1e-5 and max(res["errors"][n] for n in ("dq", "dk", "dv")) < 1e-4, res


# ----------------------------------------------------------------------------------------------------
# Linear ops: dtype, reshaped, per-head log_decay and initial_state values, options
# ----------------------------------------------------------------------------------------------------

LINEAR_ROWS = {
    "fp16 vs bf16": "dtype",
    "reshaped same-numel": "q shape",
    # different local lengths are no mismatch for linear SP: ranks may hold unequal shards (test_linear_uneven)
    "per-head log_decay": "log_decay",
    "initial_state": "initial_state",
    "output_final_state": "output_final_state",
}


def linear_mismatches(op_name: str) -> dict:
    op = LINEAR_OPS[op_name]
    odd = dist.get_rank() == dist.get_world_size() - 1
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, v = torch.randn(1, 8, 2, 8, generator=gen), torch.randn(1, 8, 2, 4, generator=gen)
    decay = torch.tensor([-0.1, -0.2])
    state = torch.ones(1, 2, 8, 4)

    def cast(dtype):
        return op(q.to(dtype), q.to(dtype), v.to(dtype))

    calls = {
        "fp16 vs bf16": lambda: cast(torch.bfloat16 if odd else torch.float16),
        "reshaped same-numel": lambda: op(q.reshape(2, 4, 2, 8), q.reshape(2, 4, 2, 8), v.reshape(2, 4, 2, 4))
        if odd else op(q, q, v),
        "per-head log_decay": lambda: op(q, q, v, log_decay=decay * (2 if odd else 1)),
        "initial_state": lambda: op(q, q, v, initial_state=state + (1e-3 if odd else 0)),
        "output_final_state": lambda: op(q, q, v, output_final_state=not odd),
    }
    if op_name == "zeco":
        calls["num_pieces"] = lambda: op(q, q, v, num_pieces=2 if odd else 4)
    return {row: outcome(call) for row, call in calls.items()}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op_name", sorted(LINEAR_OPS))
def test_linear_mismatches_raise_on_every_rank_naming_what_differs(op_name, world_size):
    per_rank = run_distributed(linear_mismatches, world_size, op_name, timeout=120)
    rows = dict(LINEAR_ROWS, **({"num_pieces": "num_pieces"} if op_name == "zeco" else {}))
    assert set(per_rank[0]) == set(rows)
    for row, name in rows.items():
        assert_every_rank_names([res[row] for res in per_rank], LINEAR_OPS[op_name].__name__, world_size, name)


def linear_matching(op_name: str) -> list:
    """Matching calls with per-head and per-token decay and an initial state: the per-token log_decay values
    differ between ranks (each holds its slice) and must not be compared; results equal the float64 recurrence."""
    p = dist.get_world_size()
    results = []
    for i, kind in enumerate(("head", "token")):
        x = make_inputs(200 + i, p, 8, kind, True, 4)
        ref = reference(x, True)
        with metadata_gathers() as gathers:
            res = run_case(op_name, x, ref, True)
        results.append((kind, gathers, res["errors"]))
    return results


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op_name", sorted(LINEAR_OPS))
def test_linear_matching_call_passes_the_check_and_equals_the_reference(op_name, world_size):
    for rank, results in enumerate(run_distributed(linear_matching, world_size, op_name, timeout=120)):
        for kind, gathers, errors in results:
            assert gathers == [32], (rank, kind, gathers)
            for name, err in errors.items():
                assert err < (OUT_TOL if name in ("o", "final") else GRAD_TOL), (rank, kind, name, err)


# ----------------------------------------------------------------------------------------------------
# Switches: the scoped context manager, the legacy debug switch, the environment
# ----------------------------------------------------------------------------------------------------


def scoped_switches() -> dict:
    odd = dist.get_rank() == dist.get_world_size() - 1
    q = torch.randn(1, 8, 2, 16)

    def mismatched():
        return outcome(lambda: collectives.ring_attention(q, q, q, causal=not odd))

    res = {"default": mismatched()}
    with comm.agreement_checks(False):
        res["off"] = mismatched()
        with comm.agreement_checks(True):
            res["nested on"] = mismatched()
        res["off again"] = mismatched()
        comm.set_consistency_checks(True)  # the process-wide debug level does not override an explicit scope
        try:
            res["off under debug"] = mismatched()
        finally:
            comm.set_consistency_checks(False)
    res["restored"] = mismatched()
    comm.set_consistency_checks(True)
    try:  # debug level: the readable fingerprints are gathered on every call, even when they agree
        res["debug, matching"] = outcome(lambda: collectives.ring_attention(q, q, q, causal=True))
    finally:
        comm.set_consistency_checks(False)
    return res


def test_agreement_checks_scope_nests_and_restores():
    for rank, res in enumerate(run_distributed(scoped_switches, 2, timeout=60)):
        for on in ("default", "nested on", "restored"):
            assert res[on]["message"] is not None and "causal: " in res[on]["message"], (rank, on)
        for off in ("off", "off again", "off under debug"):
            assert res[off]["message"] is None and res[off]["gathers"] == [], (rank, off)
            assert res[off]["op_bytes"] > 0  # the op ran (on mismatched flags: what the check prevents)
        assert res["debug, matching"]["message"] is None and len(res["debug, matching"]["gathers"]) == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, True), ({"SEQPAR_CHECK_AGREEMENT": "0"}, False), ({"SEQPAR_CHECK_AGREEMENT": "1"}, True),
     ({"SEQPAR_CHECK_AGREEMENT": "0", "SEQPAR_DEBUG": "1"}, True)],
)
def test_environment_sets_the_process_default(monkeypatch, env, expected):
    monkeypatch.delenv("SEQPAR_CHECK_AGREEMENT", raising=False)
    monkeypatch.delenv("SEQPAR_DEBUG", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert agreement._AgreementSettings().enabled() is expected


def test_tensor_digest_sees_every_byte_and_the_dtype_bits():
    x = torch.linspace(-1, 1, 64)
    y = x.clone()
    y[37] = torch.nextafter(y[37], torch.tensor(2.0))  # one ulp
    assert agreement.tensor_digest(x) == agreement.tensor_digest(x.clone())
    assert agreement.tensor_digest(x) != agreement.tensor_digest(y)
    assert agreement.tensor_digest(x.half()) != agreement.tensor_digest(x.bfloat16())


def debug_on_one_rank() -> dict:
    """The debug level set on rank 0 only: every rank still takes the same collectives (no hang, no error)."""
    q = torch.randn(1, 8, 2, 16, generator=torch.Generator().manual_seed(0))
    comm.set_consistency_checks(dist.get_rank() == 0)
    try:
        return outcome(lambda: collectives.ring_attention(q, q, q, causal=True))
    finally:
        comm.set_consistency_checks(False)


def test_debug_level_on_one_rank_takes_every_rank_through_the_full_comparison():
    for rank, res in enumerate(run_distributed(debug_on_one_rank, 3, timeout=60)):
        assert res["message"] is None and res["gathers"][0] == 32 and len(res["gathers"]) == 2, (rank, res)
