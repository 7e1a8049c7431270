"""The Triton gated delta rule (seqpar.kernels.triton_delta_rule) against the float64 recurrence, on the CPU under
the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before triton imports).

Reached through the normal dispatch, ``chunk_gated_delta_rule(backend="triton")``. Shapes are tiny (chunk 16,
H = 2) so each case runs in a few programs: S = 17 leaves a one-token last chunk, S = 64 four full chunks; one
case has Dk = 20 (a masked key tile) and Dv = 24 (a masked value tile). Float32 tolerances are the contract's
(1e-5 outputs and final state, 1e-4 gradients); measured errors are ~2e-7 (the interpreter's dots are numpy
float32). bf16 is compared with the reference on the same bf16-rounded inputs, within 2e-2.
"""

import importlib.util

import pytest
import torch
from tests.checks import rel_err

from seqpar.kernels.delta_rule import chunk_gated_delta_rule, delta_rule_transition
from seqpar.kernels.reference import reference_gated_delta_rule

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
NAMES = ("q", "k", "v", "beta", "log_decay", "initial_state")


def _inputs(gate, b, s, h, dk, dv, *, with_state, seed, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q = rand(b, s, h, dk)
    k = torch.nn.functional.normalize(rand(b, s, h, dk), dim=-1)  # l2-normalised keys, as the models use
    v = rand(b, s, h, dv)
    beta = torch.sigmoid(rand(b, s, h))
    gate_shape = {"none": None, "head": (b, s, h), "key": (b, s, h, dk)}[gate]
    g = None if gate_shape is None else -decay_scale * torch.nn.functional.softplus(rand(*gate_shape))
    h0 = rand(b, h, dk, dv) if with_state else None
    return {"q": q, "k": k, "v": v, "beta": beta, "log_decay": g, "initial_state": h0}


def _run(fn, inputs, dtype, d_out, d_final):
    """(o, final, {name: grad}) of sum(o * d_out) + sum(final * d_final), inputs cast to ``dtype``."""
    leaves = {n: x.to(dtype).detach().requires_grad_(True) for n, x in inputs.items() if x is not None}
    args = {n: leaves.get(n) for n in NAMES}
    o, final = fn(**args)
    loss = (o.double() * d_out).sum() + (final.double() * d_final).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, final, dict(zip(leaves, grads))


def _reference(q, k, v, beta, log_decay, initial_state):
    return reference_gated_delta_rule(q, k, v, beta, log_decay, initial_state=initial_state)


def _triton(q, k, v, beta, log_decay, initial_state):
    return chunk_gated_delta_rule(q, k, v, beta, log_decay=log_decay, initial_state=initial_state,
                                  output_final_state=True, chunk_size=16, backend="triton")


def _check(gate, b, s, dk, dv, with_state, dtype, *, decay_scale=1.0, seed=0):
    h = 2
    inputs = _inputs(gate, b, s, h, dk, dv, with_state=with_state, seed=seed, decay_scale=decay_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    d_out = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64)
    d_final = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    # the reference sees the same rounded inputs as the kernel (matters for bf16 only)
    rounded = {n: (x.to(dtype).double() if x is not None else None) for n, x in inputs.items()}
    ref_o, ref_final, ref_grads = _run(_reference, rounded, torch.float64, d_out, d_final)
    o, final, grads = _run(_triton, inputs, dtype, d_out, d_final)
    tol_out, tol_grad = TOL[dtype]
    assert o.dtype == dtype and final.dtype == torch.float32
    assert rel_err(o, ref_o) < tol_out, rel_err(o, ref_o)
    assert rel_err(final, ref_final) < tol_out, rel_err(final, ref_final)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].to(dtype).dtype, name
        assert rel_err(grad, ref_grads[name]) < tol_grad, (name, rel_err(grad, ref_grads[name]))


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zero-state"])
@pytest.mark.parametrize("b, s", [(2, 17), (1, 64)], ids=["S17", "S64"])
@pytest.mark.parametrize("gate", ["head", "key"], ids=["gdn", "kda"])
def test_triton_delta_rule_matches_recurrence(gate, b, s, with_state):
    """Output, final state and the gradients of q, k, v, beta, the gate and the initial state (GDN, KDA)."""
    _check(gate, b, s, 16, 16, with_state, torch.float32)


def test_triton_delta_rule_no_gate_masked_tiles():
    """DeltaNet (no gate), Dk = 20 and Dv = 24: partial key and value tiles, S = 40 (two chunks and a half)."""
    _check("none", 1, 40, 20, 24, True, torch.float32)


def test_triton_delta_rule_strong_decay():
    """Per-key log decays down to ~ -60 per token: exp(-c) would overflow float32; the kernels only ever take
    exp of c_t - c_i <= 0, so the result stays finite and exact."""
    _check("key", 1, 17, 16, 16, True, torch.float32, decay_scale=30.0, seed=3)
    _check("head", 1, 17, 16, 16, False, torch.float32, decay_scale=30.0, seed=4)


def test_triton_delta_rule_bf16():
    _check("head", 1, 17, 16, 16, True, torch.bfloat16, seed=5)


def test_triton_delta_rule_output_only():
    """Without ``output_final_state`` (no final-state gradient enters the backward state pass)."""
    x = _inputs("key", 1, 17, 2, 16, 16, with_state=True, seed=11)
    d_out = torch.randn(1, 17, 2, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    leaves = {n: t.float().requires_grad_(True) for n, t in x.items()}
    o, final = chunk_gated_delta_rule(**leaves, chunk_size=16, backend="triton")
    assert final is None
    grads = torch.autograd.grad((o.double() * d_out).sum(), list(leaves.values()))
    ref_leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    ref_o, _ = _reference(**ref_leaves)
    ref_grads = torch.autograd.grad((ref_o * d_out).sum(), list(ref_leaves.values()))
    assert rel_err(o, ref_o) < 1e-5
    for name, grad, ref in zip(leaves, grads, ref_grads):
        assert rel_err(grad, ref) < 1e-4, (name, rel_err(grad, ref))


def test_triton_transition_matches_recurrence():
    """delta_rule_transition(backend="triton") runs the same kernels with widened values: for a random entering
    state, o0 + w^T S_in and a S_in + m equal the recurrence started from S_in."""
    b, s, h, dk, dv = 1, 17, 2, 16, 16
    x = _inputs("key", b, s, h, dk, dv, with_state=True, seed=7)
    o0, w, a, m = delta_rule_transition(*(x[n].float() for n in ("q", "k", "v", "beta")),
                                        log_decay=x["log_decay"].float(), chunk_size=16, backend="triton")
    s_in = x["initial_state"]
    ref_o, ref_final = reference_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"],
                                                  initial_state=s_in)
    got_o = o0.double() + torch.einsum("bshk,bhkv->bshv", w.double(), s_in)
    got_final = a.double() @ s_in + m.double()
    assert rel_err(got_o, ref_o) < 1e-5 and rel_err(got_final, ref_final) < 1e-5


def test_backend_dispatch(monkeypatch):
    """"triton" runs the Triton kernels on CPU under the interpreter; "auto" on CPU stays torch; an unknown
    name, or "triton" for float64, raises a ValueError naming ``backend``."""
    from seqpar.kernels import triton_delta_rule

    calls = []
    apply = triton_delta_rule._ChunkGatedDeltaRule.apply
    monkeypatch.setattr(triton_delta_rule._ChunkGatedDeltaRule, "apply",
                        lambda *args: calls.append(1) or apply(*args))
    x = _inputs("head", 1, 17, 2, 16, 16, with_state=False, seed=9)
    q, k, v, beta, g = (x[n].float() for n in ("q", "k", "v", "beta", "log_decay"))
    ref, _ = reference_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"])
    for backend, expected_calls in (("triton", 1), ("auto", 0), ("torch", 0)):
        calls.clear()
        o, _ = chunk_gated_delta_rule(q, k, v, beta, log_decay=g, chunk_size=16, backend=backend)
        assert len(calls) == expected_calls, backend
        assert rel_err(o, ref) < 1e-5, backend
    with pytest.raises(ValueError, match="backend"):
        chunk_gated_delta_rule(q, k, v, beta, backend="flash")
    with pytest.raises(ValueError, match="backend.*triton.*float64"):
        chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], backend="triton")
