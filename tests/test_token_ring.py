"""TokenRing attention on real gloo ranks: equal to ring attention, against the float64 reference, exact bytes
per direction and per peer, the overlap order, skipped blocks, saved activations and bad input."""

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.sp_cases import check_against_reference, global_inputs, matrix_configs

import seqpar.collectives as collectives
from seqpar.collectives import count_comm, ring_attention
from seqpar.collectives.layout import shard_sequence
from seqpar.collectives.token_ring import token_ring_attention
from seqpar.tracing import trace_events

# sp_cases looks ops up by name in seqpar.collectives; make sure it finds this one (rank processes import this
# module when they unpickle the rank functions, so it happens there too).
collectives.token_ring_attention = token_ring_attention

OP = "token_ring_attention"


def _shard(t, layout, cu):
    return shard_sequence(t, layout=layout) if cu is None else shard_sequence(t, layout=layout, cu_seqlens=cu)[0]


# ----------------------------------------------------------------------------------------------------
# Equal to ring attention (P = 2, 3, 4), forward and backward, float32
# ----------------------------------------------------------------------------------------------------

RING_CASES = [
    dict(batch=2, seq=3, h=4, h_kv=2, causal=True, layout="zigzag"),
    dict(batch=2, seq=3, h=4, h_kv=2, causal=True, layout="contiguous"),
    dict(batch=1, seq=2, h=4, h_kv=4, causal=False, layout="zigzag"),
    dict(batch=1, seq=2, h=4, h_kv=1, causal=False, layout="contiguous"),
    dict(lens=(1, 3, 2), h=4, h_kv=2, causal=True, layout="zigzag"),
    dict(lens=(2, 1, 3), h=2, h_kv=1, causal=True, layout="contiguous"),
]


def against_ring(cases):
    p = dist.get_world_size()
    errors = []
    for i, case in enumerate(cases):
        layout, causal = case["layout"], case["causal"]
        mult = 2 * p if layout == "zigzag" else p
        lens = None if "lens" not in case else [mult * m for m in case["lens"]]
        q, k, v, dout, cu = global_inputs(
            10 + i, batch=case.get("batch", 1), seq_len=2 * p * case.get("seq", 1), h=case["h"], h_kv=case["h_kv"],
            d=32, lens=lens,
        )
        local_cu = None if cu is None else shard_sequence(q, layout=layout, cu_seqlens=cu)[1]
        results = []
        for op in (ring_attention, token_ring_attention):
            leaves = [_shard(t, layout, cu).float().requires_grad_(True) for t in (q, k, v)]
            out = op(*leaves, causal=causal, layout=layout, cu_seqlens=local_cu)
            out.backward(_shard(dout, layout, cu).float())
            results.append([out.detach()] + [t.grad for t in leaves])
        errors.append(max(rel_err(a, b) for a, b in zip(results[1], results[0])))
    return errors


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_forward_and_backward_equal_ring_attention_without_hanging(world_size):
    for rank, errors in enumerate(run_distributed(against_ring, world_size, RING_CASES, timeout=60)):
        for case, err in zip(RING_CASES, errors):
            assert err < 1e-6, (rank, case, err)


# ----------------------------------------------------------------------------------------------------
# Against the float64 reference: the matrix ring attention is tested with
# ----------------------------------------------------------------------------------------------------


def reference_matrix(seed):
    cases = matrix_configs(OP, dist.get_world_size())
    return [(case, check_against_reference(OP, seed=seed + i, **case)) for i, case in enumerate(cases)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_matches_float64_reference(world_size):
    for rank, cases in enumerate(run_distributed(reference_matrix, world_size, world_size)):
        for case, err in cases:
            bf16 = case.get("dtype") == torch.bfloat16
            out_tol, grad_tol = (2e-2, 2e-2) if bf16 else (1e-5, 1e-4)
            assert err["dtype_ok"] and err.get("finite", True), (rank, case, err)
            assert err["out"] < out_tol, (rank, case, err)
            assert max(err["dq"], err["dk"], err["dv"]) < grad_tol, (rank, case, err)


# ----------------------------------------------------------------------------------------------------
# Bytes: per direction and per peer, exactly the module docstring's formulas
# ----------------------------------------------------------------------------------------------------


def measure(configs):
    """For each config: what this rank sent in forward and backward, in total, per peer, and message by message."""
    p = dist.get_world_size()
    results = []
    for cfg in configs:
        layout, causal, dtype = cfg["layout"], cfg["causal"], cfg["dtype"]
        q, k, v, dout, _ = global_inputs(1, batch=2, seq_len=2 * p * 3, h=cfg["h"], h_kv=cfg["h_kv"], d=cfg["d"])
        ql, kl, vl = (shard_sequence(t, layout=layout).to(dtype).requires_grad_(True) for t in (q, k, v))
        res = {"tokens": ql.shape[0] * ql.shape[1]}
        with count_comm() as fwd, trace_events() as fwd_events:
            out = token_ring_attention(ql, kl, vl, causal=causal, layout=layout)
        with count_comm() as bwd, trace_events() as bwd_events:
            out.backward(shard_sequence(dout, layout=layout).to(dtype))
        for name, stats, events in (("fwd", fwd, fwd_events), ("bwd", bwd, bwd_events)):
            res[name] = stats.bytes_sent
            res[name + "_peer"] = dict(stats.bytes_by_peer)
            res[name + "_direction"] = dict(stats.bytes_by_direction)
            res[name + "_messages"] = [(e["peer"], e["bytes"]) for e in events if e["kind"] == "comm"]
        with count_comm() as ring:
            ring_attention(ql.detach(), kl.detach(), vl.detach(), causal=causal, layout=layout)
        res["ring_fwd"] = ring.bytes_sent
        results.append(res)
    return results


def weights(layout, causal, p, r):
    """(W_q, W_o, per-owner partial weight) written out from the block rules, independently of the module:
    queries go to d = r - 1 from every owner but d; partials come from rank r for every owner o != r."""
    d = (r - 1) % p

    def w(q_owner, kv_rank):  # how much of q_owner's shard the block on kv_rank reads
        if not causal:
            return 1.0
        if layout == "zigzag":
            return 1.0 if kv_rank < q_owner else 0.5
        return 1.0 if kv_rank < q_owner else 0.0

    w_q = sum(w(o, d) for o in range(p) if o != d)
    per_owner = {o: w(o, r) for o in range(p) if o != r}
    return w_q, sum(per_owner.values()), per_owner


BYTE_CONFIGS = [
    dict(layout="zigzag", causal=True, h=4, h_kv=2, d=32, dtype=torch.float32),
    dict(layout="contiguous", causal=True, h=4, h_kv=2, d=32, dtype=torch.float32),
    dict(layout="zigzag", causal=False, h=8, h_kv=2, d=32, dtype=torch.float32),
    dict(layout="zigzag", causal=False, h=2, h_kv=2, d=32, dtype=torch.float32),
    dict(layout="zigzag", causal=True, h=4, h_kv=4, d=64, dtype=torch.bfloat16),
    dict(layout="contiguous", causal=False, h=2, h_kv=1, d=32, dtype=torch.float64),
]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_bytes_per_direction_and_peer_equal_the_formulas(world_size):
    p = world_size
    per_rank = run_distributed(measure, p, BYTE_CONFIGS)
    for ci, cfg in enumerate(BYTE_CONFIGS):
        h, h_kv, d = cfg["h"], cfg["h_kv"], cfg["d"]
        b = torch.empty(0, dtype=cfg["dtype"]).element_size()
        a = 8 if cfg["dtype"] == torch.float64 else 4
        q_dir_total = 0
        for r, res in enumerate(r_res[ci] for r_res in per_rank):
            t = res["tokens"]
            w_q, w_o, per_owner = weights(cfg["layout"], cfg["causal"], p, r)
            units = {  # bytes of one whole message, (query direction, partial direction)
                "fwd": (t * h * d * b, t * h * (d * b + a)),
                "bwd": (t * h * (3 * d * b + a), t * h * d * b),
            }
            for phase, (unit_q, unit_o) in units.items():
                assert res[phase] == w_q * unit_q + w_o * unit_o, (phase, r, cfg, res[phase])
                by_direction = {k: v for k, v in (("prev", w_q * unit_q), ("next", w_o * unit_o)) if v}
                assert res[phase + "_direction"] == by_direction, (phase, r, cfg)
                # direction by message: the two streams' message sizes never coincide
                q_sizes, o_sizes = {unit_q, unit_q // 2}, {unit_o, unit_o // 2}
                assert not q_sizes & o_sizes
                messages = res[phase + "_messages"]
                assert all(n in q_sizes | o_sizes for _, n in messages), messages
                q_msgs = [(peer, n) for peer, n in messages if n in q_sizes]
                assert all(peer == (r - 1) % p for peer, _ in q_msgs), q_msgs  # queries always to rank - 1
                assert sum(n for _, n in q_msgs) == w_q * unit_q, (phase, r, cfg)
                assert sum(n for _, n in messages if n in o_sizes) == w_o * unit_o, (phase, r, cfg)
                # per peer: partials go straight to their owner, only where the block was computed
                peers = {o: w * unit_o for o, w in per_owner.items() if w}
                if w_q:
                    peers[(r - 1) % p] = peers.get((r - 1) % p, 0) + w_q * unit_q
                assert res[phase + "_peer"] == peers, (phase, r, cfg)
            if not cfg["causal"]:  # per direction TokenRing's queries are g/2 x ring's K,V (g = H / H_kv)
                assert w_q * t * h * d * b * 2 * h_kv == h * res["ring_fwd"]
            q_dir_total += w_q * t * h * d * b
        if cfg["layout"] == "zigzag" and cfg["causal"]:  # a quarter of the query traffic is saved on average
            assert q_dir_total == 0.75 * (p - 1) * p * t * h * d * b


# ----------------------------------------------------------------------------------------------------
# Schedule: transfers start before the kernel they overlap; masked blocks are not computed
# ----------------------------------------------------------------------------------------------------


def event_order(layout):
    p = dist.get_world_size()
    h, d = 2, 32
    q, k, v, dout, _ = global_inputs(0, batch=1, seq_len=2 * p * 2, h=h, h_kv=h, d=d)
    ql, kl, vl = (shard_sequence(t, layout=layout).float().requires_grad_(True) for t in (q, k, v))
    with trace_events() as fwd:
        out = token_ring_attention(ql, kl, vl, causal=True, layout=layout)
    with trace_events() as bwd:
        out.backward(shard_sequence(dout, layout=layout).float())
    t = ql.shape[1]
    keep = lambda events: [  # noqa: E731
        (e["kind"], e.get("peer"), e.get("bytes")) for e in events if e["kind"] in ("comm", "kernel")
    ]
    query_bytes = {"fwd": t * h * d * 4, "bwd": t * h * (3 * d * 4 + 4)}  # one whole query message, float32
    return keep(fwd), keep(bwd), query_bytes


def _sends_before_each_kernel(events, unit_q):
    """For each kernel: (query messages, partial messages) issued before it."""
    counts, nq, no = [], 0, 0
    for kind, _, n in events:
        if kind == "kernel":
            counts.append((nq, no))
        elif n in (unit_q, unit_q // 2):
            nq += 1
        else:
            no += 1
    return counts


def test_each_step_starts_its_transfers_before_its_kernel():
    p = 4
    for fwd, bwd, query_bytes in run_distributed(event_order, p, "zigzag"):
        for phase, events in (("fwd", fwd), ("bwd", bwd)):
            counts = _sends_before_each_kernel(events, query_bytes[phase])
            assert len(counts) == p  # zigzag: every block has work
            for step, (nq, no) in enumerate(counts):
                assert nq >= min(step + 1, p - 1)  # the queries of step + 1 are in flight during kernel `step`
                assert no >= max(step - 1, 0)  # and so is the partial of step - 1


def test_contiguous_causal_skips_masked_blocks_and_sends_nothing_for_them():
    p = 4
    for r, (fwd, bwd, _) in enumerate(run_distributed(event_order, p, "contiguous")):
        # rank r's K/V are seen by the queries of ranks r .. P-1 only
        assert sum(1 for kind, *_ in fwd if kind == "kernel") == p - r
        assert sum(1 for kind, *_ in bwd if kind == "kernel") == p - r
        assert sum(1 for kind, *_ in fwd if kind == "comm") == (p - 1 - (r - 1) % p) + (p - 1 - r)


# ----------------------------------------------------------------------------------------------------
# Saved activations, bad input
# ----------------------------------------------------------------------------------------------------


def saved_bytes():
    q, k, v, _, _ = global_inputs(4, batch=1, seq_len=2 * dist.get_world_size() * 4, h=4, h_kv=2, d=32)
    ql, kl, vl = (shard_sequence(t).float().requires_grad_(True) for t in (q, k, v))
    saved = []
    pack = lambda x: saved.append(x.numel() * x.element_size()) or x  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        token_ring_attention(ql, kl, vl, causal=True)
    t = ql.shape[1]
    local = 2 * t * 4 * 32 * 4 + 2 * t * 2 * 32 * 4 + 4 * t * 4  # q, out; k, v; float32 lse
    return sum(saved), local


def test_saves_only_local_activations_for_backward():
    for saved, local in run_distributed(saved_bytes, 3):
        assert saved == local


def bad_calls():
    op = token_ring_attention
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 2, 16)
    packed = torch.randn(8, 4, 16)
    packed_k = torch.randn(8, 2, 16)
    cases = {
        "k-shape": lambda: op(q, torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)),
        "k-dtype": lambda: op(q, k.double(), k.double()),
        "k-heads": lambda: op(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)),
        "v-shape": lambda: op(q, k, torch.randn(1, 8, 1, 16)),  # a head dim of its own is allowed (MLA); heads not
        "q-odd-zigzag": lambda: op(q[:, :7], k[:, :7], k[:, :7]),
        "layout-unknown": lambda: op(q, k, k, layout="striped"),
        "cu_seqlens-total": lambda: op(
            packed, packed_k, packed_k, cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32)
        ),
        "cu_seqlens-dtype": lambda: op(packed, packed_k, packed_k, cu_seqlens=torch.tensor([0, 4, 8])),
        "q-packed-without-cu_seqlens": lambda: op(packed, packed_k, packed_k),
        "backend-unknown": lambda: op(q, k, k, backend="nonesuch"),
        "group-not-member": lambda: (
            op(q, k, k, group=dist.new_group([0]))
            if dist.get_rank() != 0
            else (_ for _ in ()).throw(ValueError("group: skip on rank 0"))
        ),
    }
    messages = {}
    with count_comm() as stats:
        for name, call in cases.items():
            try:
                call()
                messages[name] = None
            except ValueError as err:
                messages[name] = str(err)
    return messages, stats.bytes_sent


def test_bad_input_is_a_value_error_on_every_rank_before_any_communication():
    for messages, sent in run_distributed(bad_calls, 2, timeout=30):
        assert sent == 0
        for name, message in messages.items():
            assert message is not None, name
            arg = name.split("-")[0]
            assert message.startswith(arg + ":") or message.startswith(arg[0] + ", "), (name, message)
