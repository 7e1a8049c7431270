"""The chunked gated delta rule kernel (seqpar.kernels.delta_rule) against the float64 token-by-token recurrence:
outputs, final state and every gradient, for every decay kind, chunk sizes that do and do not divide S, with and
without an initial state; the shard transition (o0, w, A, B) reproduces the run from any entering state;
transformers' own chunked function agrees with the reference (so the convention is theirs); bad input raises."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels.delta_rule import chunk_gated_delta_rule, delta_rule_transition
from seqpar.kernels.reference import reference_gated_delta_rule
from tests.checks import rel_err, value_errors

B, H, DK = 2, 2, 6


def make_problem(seed: int, s: int, kind: str, dv: int, dtype=torch.float64) -> dict:
    """A random problem: l2-normalised keys (as the models use), beta in (0, 1), decays <= 0."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": rand(B, s, H, DK),
        "k": torch.nn.functional.normalize(rand(B, s, H, DK), dim=-1),
        "v": rand(B, s, H, dv),
        "beta": torch.sigmoid(rand(B, s, H)),
        "log_decay": None,
        "initial_state": rand(B, H, DK, dv),
    }
    if kind == "head":
        x["log_decay"] = -torch.nn.functional.softplus(rand(B, s, H))
    elif kind == "key":
        x["log_decay"] = -torch.nn.functional.softplus(rand(B, s, H, DK))
    return {n: None if t is None else t.to(dtype) for n, t in x.items()}


def _loss_and_grads(fn, x: dict, weights: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    leaves = {n: None if t is None else t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o, final = fn(leaves)
    loss = (o.double() * weights["o"]).sum() + (final.double() * weights["final"]).sum()
    loss.backward()
    return o.detach(), final.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


@pytest.mark.parametrize("kind", ["none", "head", "key"])
@pytest.mark.parametrize("s, chunk_size, with_init, dv", [(23, 8, True, 5), (16, 4, False, 6), (9, 64, True, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_recurrence(kind, s, chunk_size, with_init, dv, dtype):
    x = make_problem(1, s, kind, dv, dtype)
    if not with_init:
        x["initial_state"] = None
    gen = torch.Generator().manual_seed(2)
    weights = {"o": torch.randn(B, s, H, dv, generator=gen, dtype=torch.float64),
               "final": torch.randn(B, H, DK, dv, generator=gen, dtype=torch.float64)}

    def chunked(t):
        return chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["beta"], log_decay=t["log_decay"],
                                      initial_state=t["initial_state"], output_final_state=True,
                                      chunk_size=chunk_size)

    def reference(t):
        return reference_gated_delta_rule(t["q"], t["k"], t["v"], t["beta"], t["log_decay"],
                                          initial_state=t["initial_state"])

    o, final, grads = _loss_and_grads(chunked, x, weights)
    x64 = {n: None if t is None else t.double() for n, t in x.items()}
    ro, rfinal, rgrads = _loss_and_grads(reference, x64, weights)
    out_tol, grad_tol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4)
    assert o.dtype == dtype
    assert rel_err(o, ro) < out_tol
    assert rel_err(final, rfinal) < out_tol
    assert set(grads) == set(rgrads)
    for name in grads:
        assert rel_err(grads[name], rgrads[name]) < grad_tol, name


@pytest.mark.parametrize("kind", ["head", "key"])
def test_transition_reproduces_any_entering_state(kind):
    x = make_problem(3, 13, kind, 4)
    o0, w, a, m = delta_rule_transition(x["q"], x["k"], x["v"], x["beta"], log_decay=x["log_decay"], chunk_size=4)
    ro, rfinal = reference_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"],
                                            initial_state=x["initial_state"])
    assert rel_err(o0 + torch.einsum("bshk,bhkv->bshv", w, x["initial_state"]), ro) < 1e-12
    assert rel_err(a @ x["initial_state"] + m, rfinal) < 1e-12
    zero_o, zero_final = reference_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"])
    assert rel_err(o0, zero_o) < 1e-12 and rel_err(m, zero_final) < 1e-12


def test_transformers_convention_matches():
    """transformers' torch_chunk_gated_delta_rule (Qwen3-Next) is the same recurrence: l2norm and the scale are
    applied inside it, so feed the reference normalised queries and keys."""
    modeling = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x = make_problem(4, 20, "head", 5)
    q = torch.nn.functional.normalize(x["q"], dim=-1, eps=1e-6)
    ref, ref_final = reference_gated_delta_rule(q, x["k"], x["v"], x["beta"], x["log_decay"],
                                                initial_state=x["initial_state"])
    got, got_final = modeling.torch_chunk_gated_delta_rule(
        x["q"].float(), x["k"].float(), x["v"].float(), g=x["log_decay"].float(), beta=x["beta"].float(),
        chunk_size=8, initial_state=x["initial_state"].float(), output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    assert rel_err(got, ref) < 1e-5 and rel_err(got_final, ref_final) < 1e-5
    mine, mine_final = chunk_gated_delta_rule(q, x["k"], x["v"], x["beta"], log_decay=x["log_decay"],
                                              initial_state=x["initial_state"], output_final_state=True)
    assert rel_err(mine, ref) < 1e-12 and rel_err(mine_final, ref_final) < 1e-12


def test_bad_input_names_the_argument():
    x = make_problem(5, 8, "head", 4)
    q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["log_decay"]
    messages = value_errors({
        "k": lambda: chunk_gated_delta_rule(q, k[:, :, :1], v, beta),
        "v": lambda: chunk_gated_delta_rule(q, k, v[:, :4], beta),
        "beta": lambda: chunk_gated_delta_rule(q, k, v, beta[..., None]),
        "log_decay": lambda: chunk_gated_delta_rule(q, k, v, beta, log_decay=-g),
        "initial_state": lambda: chunk_gated_delta_rule(q, k, v, beta, initial_state=x["initial_state"][0]),
        "chunk_size": lambda: chunk_gated_delta_rule(q, k, v, beta, chunk_size=0),
    })
    for name, message in messages.items():
        assert message is not None and name in message, (name, message)
