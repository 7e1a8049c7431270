"""The bad-input matrix: wrong calls across the public API. Each must raise ValueError/TypeError whose message
starts with the name of the argument at fault, on EVERY rank, before any communication (nothing sent), and
no rank may take more than 10 s."""

import time

import torch
import torch.distributed as dist
from tests.harness import run_distributed

import seqpar
from seqpar.collectives import count_comm
from seqpar.collectives.scan import all_scan
from seqpar.launch import train as train_mod

q4 = lambda *shape: torch.randn(*shape)  # noqa: E731


def train_args(argv):
    return train_mod.validate_args(train_mod.build_parser().parse_args(argv))


def _cases():
    """(name, expected argument prefix, call). Built inside the rank so tensors are local."""
    p = dist.get_world_size()
    q, k = q4(1, 8, 4, 16), q4(1, 8, 2, 16)
    lin = q4(1, 4, 2, 8)
    packed, packed_k = q4(8, 4, 16), q4(8, 2, 16)
    cu_bad = torch.tensor([0, 4, 6], dtype=torch.int32)
    cases = [
        # layouts
        ("shard-length", "seq_len", lambda: seqpar.shard_sequence(q4(1, 2 * p + 1, 2))),
        ("shard-layout", "layout", lambda: seqpar.shard_sequence(q4(1, 8, 2), layout="striped")),
        ("shard-dim", "dim", lambda: seqpar.shard_sequence(q4(1, 8, 2), dim=3)),
        ("shard-cu-dtype", "cu_seqlens", lambda: seqpar.shard_sequence(q4(8, 2), cu_seqlens=torch.tensor([0, 8]))),
        ("pad-world", "world_size", lambda: seqpar.pad_for_layout(q4(1, 8, 2), world_size=0)),
        ("unshard-cu", "cu_seqlens",
         lambda: seqpar.unshard_sequence(q4(4, 2), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))),
    ]
    for op_name in ("ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention"):
        op = getattr(seqpar, op_name)
        cases += [
            (f"{op_name}-k-shape", "k", lambda op=op: op(q, q4(1, 6, 2, 16), q4(1, 6, 2, 16))),
            (f"{op_name}-dtype", "k, v", lambda op=op: op(q, k.double(), k.double())),
            (f"{op_name}-gqa", "k", lambda op=op: op(q, q4(1, 8, 3, 16), q4(1, 8, 3, 16))),
            (f"{op_name}-cu", "cu_seqlens", lambda op=op: op(packed, packed_k, packed_k, cu_seqlens=cu_bad)),
            (f"{op_name}-odd", "q", lambda op=op: op(q[:, :7], k[:, :7], k[:, :7])),
            (f"{op_name}-backend", "backend", lambda op=op: op(q, k, k, backend="cuda-magic")),
        ]
    for op_name in ("lasp2_linear_attention", "zeco_linear_attention"):
        op = getattr(seqpar, op_name)
        cases += [
            (f"{op_name}-decay-sign", "log_decay",
             lambda op=op: op(lin, lin, lin, log_decay=torch.tensor([0.5, -0.1]))),
            (f"{op_name}-decay-shape", "log_decay", lambda op=op: op(lin, lin, lin, log_decay=torch.zeros(3))),
            (f"{op_name}-state", "initial_state",
             lambda op=op: op(lin, lin, lin, initial_state=torch.zeros(1, 2, 8, 9))),
            (f"{op_name}-layout", "layout", lambda op=op: op(lin, lin, lin, layout="zigzag")),
            (f"{op_name}-v", "v", lambda op=op: op(lin, lin, q4(1, 5, 2, 8))),
        ]
    cases += [
        ("all_scan-decay", "local_log_decay", lambda: all_scan(torch.zeros(1, 2, 4, 4), torch.ones(1, 2))),
        ("all_scan-pieces", "num_pieces", lambda: all_scan(torch.zeros(1, 2, 4, 4), None, num_pieces=0)),
        # the wrapper
        ("parallelize-strategy", "strategy", lambda: seqpar.parallelize(torch.nn.Linear(2, 2), strategy="spiral")),
        ("parallelize-linear", "linear_strategy",
         lambda: seqpar.parallelize(torch.nn.Linear(2, 2), linear_strategy="x")),
        ("parallelize-layout", "layout", lambda: seqpar.parallelize(torch.nn.Linear(2, 2), layout="diagonal")),
        ("parallelize-unreachable", "model", lambda: seqpar.parallelize(torch.nn.Linear(2, 2))),
        # the solver
        ("solver-empty", "seq_lens", lambda: seqpar.plan_step([], _cost_model())),
        ("solver-negative", "seq_lens", lambda: seqpar.plan_step([100, -5], _cost_model())),
        ("solver-too-long", "seq_lens", lambda: seqpar.plan_step([10**12], _cost_model())),
        # seqpar-train options
        ("train-strategy", "--strategy", lambda: train_args(["--strategy", "x"])),
        ("train-steps", "--steps", lambda: train_args(["--steps", "0"])),
    ]
    return cases


def _cost_model():
    from seqpar.solver import Cluster, CostModel, ModelSpec

    return CostModel(Cluster(world_size=8, gpus_per_node=8, peak_tflops=300.0, mem_bytes=80e9, intra_node_gbps=200.0,
                             inter_node_gbps=25.0),
                     ModelSpec(num_layers=2, hidden=256, num_heads=4, num_kv_heads=2, head_dim=64, ffn_hidden=512,
                               vocab=1000))


def run_bad_calls():
    # one-time imports (the wrapper, transformers for the built-in adapters) are not what the 10 s bound is
    # about: a loaded machine spends longer than that importing transformers in the first parallelize call
    from seqpar import integrations, wrapper  # noqa: F401

    integrations.register_builtin_adapters()
    results = {}
    for name, argument, call in _cases():
        start = time.monotonic()
        with count_comm() as stats:
            try:
                call()
                outcome = ("no error", "")
            except (ValueError, TypeError) as err:
                outcome = (type(err).__name__, str(err))
        results[name] = (argument, *outcome, stats.calls, time.monotonic() - start)
    return results


def test_bad_input_matrix_raises_naming_the_argument_on_every_rank_before_any_communication():
    per_rank = run_distributed(run_bad_calls, 3, timeout=60)
    assert len(per_rank[0]) >= 25
    for rank, results in enumerate(per_rank):
        for name, (argument, kind, message, calls, seconds) in results.items():
            assert kind in ("ValueError", "TypeError"), (rank, name, kind)
            assert message.startswith(argument), (rank, name, message)
            assert calls == {}, (rank, name, calls)  # nothing was sent
            assert seconds < 10, (rank, name, seconds)
