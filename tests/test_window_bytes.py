"""What ring, TokenRing and USP send with a sliding window, per rank, against the formulas of their module
docstrings (collectives/ring.py, token_ring.py, usp.py) and the registry's (strategies.py, the mean over ranks),
with the hops saved: at P = 2, 3, 4, 8, zigzag and contiguous, causal windows shorter than a zigzag chunk,
about one shard and longer than the sequence, forward and backward. Which shard pairs meet is brute-forced here
from the token positions ``shard_indices`` gives (independent of the ops' and the registry's rule)."""

import pytest
import torch
import torch.distributed as dist
from tests.harness import run_distributed
from tests.sp_cases import global_inputs, softmax_op

from seqpar import strategies
from seqpar.collectives import count_comm
from seqpar.collectives.layout import shard_indices, shard_sequence
from seqpar.strategies import LayerShape

T, H, H_KV, D, B = 8, 4, 2, 8, 4  # local tokens, heads, K/V heads, head dim (q/k and v), float32 bytes
A = 4  # float32 accumulation / LSE bytes
USP_U = 2  # USP's Ulysses degree in the per-rank checks: inner groups of 2 ranks, a ring of P / 2 across them


def windows(p: int) -> dict[str, int]:
    """Causal windows of W tokens (``window=(W - 1, 0)``): shorter than a zigzag chunk (T / 2), about one shard,
    longer than the sequence (dropped by the ops: the unwindowed schedules)."""
    return {"short": 3, "shard": T, "longer": 2 * p * T}


def measure(cases: list[tuple[str, str, int, dict]]) -> list[tuple[int, int]]:
    """(forward, backward) bytes this rank sends for each (op, layout, W, options) case."""
    p = dist.get_world_size()
    q, k, v, dout, _ = global_inputs(3, batch=1, seq_len=p * T, h=H, h_kv=H_KV, d=D)
    results = []
    for op_name, layout, w, options in cases:
        ql, kl, vl = (shard_sequence(t, layout=layout).float().requires_grad_(True) for t in (q, k, v))
        with count_comm() as fwd:
            out = softmax_op(op_name)(ql, kl, vl, causal=True, layout=layout, window=(w - 1, 0), **options)
        with count_comm() as bwd:
            out.backward(shard_sequence(dout, layout=layout).float())
        results.append((fwd.bytes_sent, bwd.bytes_sent))
    return results


def meets(p: int, local_len: int, layout: str, w: int, q_rank: int, kv_rank: int) -> bool:
    """Whether a query of ``q_rank``'s shard sees a key of ``kv_rank``'s under the causal window W."""
    qs, ks = (shard_indices(p * local_len, p, r, layout=layout).tolist() for r in (q_rank, kv_rank))
    return any(0 <= i - j <= w - 1 for i in qs for j in ks)


def ring_rank_bytes(p: int, local_len: int, layout: str, w: int, r: int, kv_bytes: float) -> tuple[float, float]:
    """ring.py: forward n_out K/V messages, backward n_out again + n_in float32 dK/dV; without a (dropped)
    window P - 1 of each."""
    if w - 1 >= p * local_len - 1:
        n_out = n_in = p - 1
    else:
        n_out = sum(meets(p, local_len, layout, w, j, r) for j in range(p) if j != r)
        n_in = sum(meets(p, local_len, layout, w, r, j) for j in range(p) if j != r)
    return n_out * kv_bytes * B, n_out * kv_bytes * B + n_in * kv_bytes * A


def token_ring_rank_bytes(p: int, layout: str, w: int, r: int) -> tuple[float, float]:
    """token_ring.py: with a window, queries (rows w_qj of the shard) straight to each rank j they meet and the
    partials back; w_qj = 1/2 for zigzag with j > q (only the second chunk sees j's keys), else 1. Without (the
    window dropped): the hop-by-hop table, W_q = P-1-d/2 | P-1-d (d = (r-1) mod P), W_o = P-1-r/2 | P-1-r."""
    def rows(q, j):
        return 0.5 if layout == "zigzag" and j > q else 1.0

    if w - 1 >= p * T - 1:
        d, half = (r - 1) % p, layout == "zigzag"
        w_q = p - 1 - (d / 2 if half else d)
        w_o = p - 1 - (r / 2 if half else r)
    else:
        w_q = sum(rows(r, j) for j in range(p) if j != r and meets(p, T, layout, w, r, j))
        w_o = sum(rows(q, r) for q in range(p) if q != r and meets(p, T, layout, w, q, r))
    forward = w_q * T * H * D * B + w_o * T * H * (D * B + A)  # q; out + lse
    backward = w_q * T * H * (A + 3 * D * B) + w_o * T * H * D * B  # lse, q, dout, out; dq
    return forward, backward


def usp_rank_bytes(p: int, layout: str, w: int, rank: int, u: int) -> tuple[float, float]:
    """usp.py: Ulysses on the inner group (every inner rank receives n_j = 1 K/V head here: H = 4, H_kv = 2,
    u = 2 or 4) + ring on the outer ring of P / u ranks (u T local tokens, m = 1 K/V head) with the window."""
    g = rank // u
    q_or_out = (u - 1) / u * T * H * D * B
    ulysses_fwd = 2 * q_or_out + (u - 1) * T * 2 * D * B  # q, out; k and v to the u - 1 others
    ulysses_bwd = 2 * q_or_out + (u - 1) * T * 2 * D * B  # dout, dq; dk and dv back
    ring_fwd, ring_bwd = ring_rank_bytes(p // u, u * T, layout, w, g, u * T * 1 * 2 * D)
    return ulysses_fwd + ring_fwd, ulysses_bwd + ring_bwd


def cases_for(p: int) -> list[tuple[str, str, int, dict]]:
    cases = [(op, layout, w, {}) for op in ("ring_attention", "token_ring_attention")
             for layout in ("zigzag", "contiguous") for w in windows(p).values()]
    if p >= 4:  # USP needs 1 < u < P; u = 2 for the per-rank check, and the registry's default u at P = 4
        cases += [("usp_attention", layout, w, {"ulysses_degree": USP_U}) for layout in ("zigzag", "contiguous")
                  for w in windows(p).values()]
    return cases


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_window_bytes_equal_the_formulas(p):
    cases = cases_for(p)
    results = run_distributed(measure, p, cases)
    saved = {}
    for i, (op_name, layout, w, _) in enumerate(cases):
        measured = [rank_results[i] for rank_results in results]
        if op_name == "ring_attention":
            expected = [ring_rank_bytes(p, T, layout, w, r, T * H_KV * 2 * D) for r in range(p)]
        elif op_name == "token_ring_attention":
            expected = [token_ring_rank_bytes(p, layout, w, r) for r in range(p)]
        else:
            expected = [usp_rank_bytes(p, layout, w, r, USP_U) for r in range(p)]
        case = (op_name, layout, w)
        assert [tuple(map(float, m)) for m in measured] == [tuple(e) for e in expected], (case, measured, expected)
        total = sum(f + b for f, b in measured)
        saved[case] = total
        if layout == "zigzag":  # the registry's formula: the mean over ranks (usp: at its default u)
            shape = LayerShape(seq_len=p * T, degree=p, heads=H, kv_heads=H_KV, head_dim=D, elem_bytes=B, window=w)
            name = op_name.removesuffix("_attention")
            if name != "usp" or strategies.usp_ulysses_degree(p, H) == USP_U:
                mean = [sum(column) / p for column in zip(*measured)]
                assert strategies.get(name).comm_bytes(shape) == pytest.approx(mean, rel=1e-12), (case, mean)
    # the hops saved: a short window sends less than a window over the whole sequence (the unwindowed bytes),
    # for every op and layout once there are ranks a short window does not reach (P >= 3; P = 4 for USP's ring)
    for op_name, layout, w, _ in cases:
        if w == windows(p)["short"] and (p >= 3 if op_name != "usp_attention" else p // USP_U >= 3):
            longer = saved[(op_name, layout, windows(p)["longer"])]
            assert saved[(op_name, layout, w)] < longer, (op_name, layout, saved)


def test_short_window_hops_at_p8():
    """The hops a window shorter than a chunk leaves at P = 8 (zigzag: only ring neighbours meet), per pass over
    all ranks: ring 14 K/V messages instead of 56; TokenRing 14 query blocks (7 whole shards to rank - 1 and 7
    second halves to rank + 1: 10.5 shard-equivalents) instead of 42; both straight to the neighbour."""
    shape = LayerShape(seq_len=8 * T, degree=8, heads=H, kv_heads=H_KV, head_dim=D, elem_bytes=B, window=3)
    assert strategies.window_messages(shape) == (7.0, 7.0, 2.0)
    full = LayerShape(seq_len=8 * T, degree=8, heads=H, kv_heads=H_KV, head_dim=D, elem_bytes=B)
    ring_w, ring_full = strategies.get("ring").comm_bytes(shape), strategies.get("ring").comm_bytes(full)
    assert ring_w[0] / ring_full[0] == pytest.approx(14 / 56)
    tr_w, tr_full = strategies.get("token_ring").comm_bytes(shape), strategies.get("token_ring").comm_bytes(full)
    assert tr_w[0] / tr_full[0] == pytest.approx(10.5 / 42)


def usp_ring_of_four_errors() -> list[tuple[dict, dict]]:
    from tests.sp_cases import check_against_reference

    base = dict(h=H, h_kv=H_KV, d=D, dtype=torch.float64, op_options={"ulysses_degree": USP_U})
    cases = [dict(batch=1, seq_len=8 * T, causal=True, layout="zigzag", window=(2, 0), **base),
             dict(lens=[8 * T, 16 * T], causal=True, layout="contiguous", window=(T - 1, 0), hint=True, **base)]
    return [(case, check_against_reference("usp_attention", seed=i, **case)) for i, case in enumerate(cases)]


def test_usp_window_on_a_ring_of_four_matches_float64():
    """USP at P = 8 with u = 2: the window's hop rule runs on a ring of 4 (the value tests elsewhere have rings
    of 2 at their default u); out and every gradient equal the float64 reference to 1e-10."""
    for rank_results in run_distributed(usp_ring_of_four_errors, 8):
        for case, err in rank_results:
            assert max(err["out"], err["dq"], err["dk"], err["dv"]) < 1e-10, (case, err)


def measure_packed(lens: list[int], w: int) -> list[tuple[int, int]]:
    """(forward, backward) bytes of ring and TokenRing on one packed zigzag batch of ``lens`` with window W."""
    q, k, v, dout, cu = global_inputs(5, batch=None, seq_len=None, h=H, h_kv=H_KV, d=D, lens=lens)
    results = []
    for op_name in ("ring_attention", "token_ring_attention"):
        (ql, local_cu), (kl, _), (vl, _) = (shard_sequence(t, cu_seqlens=cu) for t in (q, k, v))
        ql, kl, vl = (t.float().requires_grad_(True) for t in (ql, kl, vl))
        with count_comm() as fwd:
            out = softmax_op(op_name)(ql, kl, vl, causal=True, cu_seqlens=local_cu, window=(w - 1, 0))
        with count_comm() as bwd:
            out.backward(shard_sequence(dout, cu_seqlens=cu)[0].float())
        results.append((fwd.bytes_sent, bwd.bytes_sent))
    return results


def test_packed_window_bytes_follow_the_shortest_sequence():
    """A packed call sends a whole shard (every sequence's tokens) to each rank some sequence's window needs; the
    shortest sequence, whose chunks a window spans most of, decides: at P = 4 a 6-token window reaches 2 chunks
    back in a 32-token sequence (chunks of 4) but 1 in a 128-token one (chunks of 16). The registry's bytes with
    ``shortest_seq_len`` equal the measured mean over ranks; with the long sequence's reach they would be less."""
    p, lens, w = 4, [128, 32], 6
    results = run_distributed(measure_packed, p, lens, w)
    for i, name in enumerate(("ring", "token_ring")):
        mean = [sum(r[i][j] for r in results) / p for j in (0, 1)]
        shape = LayerShape(seq_len=sum(lens), degree=p, heads=H, kv_heads=H_KV, head_dim=D, elem_bytes=B, window=w,
                           shortest_seq_len=min(lens))
        assert strategies.get(name).comm_bytes(shape) == pytest.approx(mean, rel=1e-12), name
        longest = LayerShape(**{**shape.__dict__, "shortest_seq_len": max(lens)})
        assert strategies.get(name).comm_bytes(longest)[0] < mean[0], name
