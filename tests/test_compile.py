"""torch.compile(sp_model): the routed attention calls are custom ops (seqpar.custom_ops), so Dynamo traces the
whole model into ONE graph with no break, and the compiled step gives the loss and every gradient of the eager SP
step and of one float64 process.

The tests compile with ``backend="aot_eager"``: Dynamo's capture and AOTAutograd's forward / backward split (fake
shapes, the ops' registered autograd) are what seqpar affects; Inductor's code generation is not, and would make
each test minutes long on a CPU (``bench/compile.py`` measures Inductor).
"""

import dataclasses
import gc

import pytest
import torch
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import TinyGPT, reference_loss_and_grads

import seqpar

transformers = pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")


def llama_6_heads():
    """A tiny Llama whose 6 query / 3 KV heads split over 2 and 3 ranks (Ulysses needs H % P == 0), float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=1024)
    return LlamaForCausalLM(config).double()


def gpt_6_heads():
    """The plain PyTorch GPT of test_parallelize (reaches seqpar through SDPA), 6 heads, float64."""
    return TinyGPT(dim=48, heads=6).double()


MODELS = {"llama": llama_6_heads, "gpt": gpt_6_heads}


class GraphRecorder:
    """A torch.compile backend that keeps the FX graphs Dynamo hands it, then compiles them with aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def count(self, op) -> int:
        return sum(node.target is op for gm in self.graphs for node in gm.graph.nodes)


def _step(model, sp_call, local):
    out = sp_call(**local)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def compiled_matches_eager_and_reference(model_name, lengths):
    """On every rank: the same packed batch through the eager SP model and torch.compile(sp_model), with ring
    and then Ulysses (the step's strategy changed, the compiled model reused); both against one float64
    process. Returns the errors, graph counts and graph breaks."""
    from torch._dynamo.utils import counters

    from seqpar import custom_ops

    torch._dynamo.reset()
    counters.clear()
    model = MODELS[model_name]()
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 96, (n,), generator=gen) for n in lengths]
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    sp_model = seqpar.parallelize(model, strategy="ring", verify_model=False)
    recorder = GraphRecorder()
    compiled = torch.compile(sp_model, backend=recorder)
    local = sp_model.prepare(sequences)
    result = {"loss_vs_reference": 0.0, "grad_vs_reference": 0.0, "loss_vs_eager": 0.0, "grad_vs_eager": 0.0,
              "kept_after_backward": 0}
    for strategy in ("ring", "ulysses"):
        step = dict(local, seqpar_step=dataclasses.replace(local["seqpar_step"], softmax_strategy=strategy))
        eager_loss, eager_grads = _step(model, sp_model, step)
        loss, grads = _step(model, compiled, step)
        for name in ref_grads:
            grads[name], eager_grads[name] = summed_over_ranks(grads[name]), summed_over_ranks(eager_grads[name])
        result["kept_after_backward"] += custom_ops.kept_graphs()
        result["loss_vs_reference"] = max(result["loss_vs_reference"], abs(loss.item() - ref_loss) / abs(ref_loss))
        result["loss_vs_eager"] = max(result["loss_vs_eager"], abs(loss.item() - eager_loss.item()) / abs(ref_loss))
        result["grad_vs_reference"] = max(result["grad_vs_reference"],
                                          *(rel_err(grads[n], ref_grads[n]) for n in ref_grads))
        result["grad_vs_eager"] = max(result["grad_vs_eager"], *(rel_err(grads[n], eager_grads[n]) for n in ref_grads))
    # a compiled forward whose backward never runs frees the graph it kept for that backward
    out = compiled(**local)
    kept_before_drop = custom_ops.kept_graphs()
    del out
    gc.collect()
    result.update(
        kept_before_drop=kept_before_drop, kept_after_drop=custom_ops.kept_graphs(),
        graphs=len(recorder.graphs), graph_breaks=sum(counters["graph_break"].values()),
        break_reasons=list(counters["graph_break"])[:3],
        sp_nodes=recorder.count(torch.ops.seqpar.softmax_attention.default),
        layers=2,
    )
    return result


def summed_over_ranks(grad):
    """This rank's share summed over the world (what ``sync_gradients`` does), for one gradient."""
    grad = grad.clone()
    torch.distributed.all_reduce(grad)
    return grad


@pytest.mark.parametrize("model_name, world_size", [("llama", 2), ("gpt", 3)])
def test_compiled_model_equals_eager_and_one_process_without_graph_breaks(model_name, world_size):
    """transformers' attention interface (Llama) and SDPA (a plain PyTorch GPT, the interceptor's mode traced)
    under torch.compile; W = 3 on the GPT, whose capture costs a fraction of the Llama's."""
    for r in run_distributed(compiled_matches_eager_and_reference, world_size, model_name, [70, 33], timeout=900):
        # one graph for the whole model, the SP attention inside it as one node per layer, nothing breaking it
        assert r["graph_breaks"] == 0, r["break_reasons"]
        assert r["graphs"] == 1 and r["sp_nodes"] == r["layers"], r
        assert r["loss_vs_reference"] < 1e-10 and r["grad_vs_reference"] < 1e-10, r
        assert r["loss_vs_eager"] < 1e-12 and r["grad_vs_eager"] < 1e-12, r
        assert r["kept_after_backward"] == 0, r
        assert r["kept_before_drop"] == r["layers"] and r["kept_after_drop"] == 0, r


def ops_compiled_match_eager():
    """Each routed call under torch.compile (aot_eager) against the same call eager, inside one SP context on
    random float64 shards: softmax attention with a window, softcap and sinks (ring), linear attention with a
    per-head decay and the gated delta rule (LASP-2), the sharded causal conv1d. Returns, per call, the largest
    relative error of the output and every input's gradient, the graph breaks and the op nodes traced."""
    from torch._dynamo.utils import counters

    from seqpar import runtime

    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own shard
    shared = torch.Generator().manual_seed(5)  # whole-held inputs (sinks, a per-head decay): equal on every rank

    def rand(*shape, scale=1.0, generator=gen):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_(True)

    b, s, h, d = 1, 12, 4, 8
    calls = {
        "softmax": (lambda q, k, v, sinks: runtime.softmax_attention(
            q, k, v, causal=True, scale=0.3, window=(5, 0), softcap=2.0, sinks=sinks),
            (rand(b, s, h, d), rand(b, s, 2, d), rand(b, s, 2, 6), rand(h, generator=shared)),
            torch.ops.seqpar.softmax_attention),
        "linear": (lambda q, k, v, g: runtime.linear_attention(q, k, v, log_decay=-g.abs(), scale=0.5),
                   (rand(b, s, h, d), rand(b, s, h, d), rand(b, s, h, 6), rand(h, generator=shared)),
                   torch.ops.seqpar.linear_attention),
        "delta_rule": (lambda q, k, v, beta, g: runtime.delta_rule_attention(
            q, torch.nn.functional.normalize(k, dim=-1), v, beta=beta.sigmoid(), log_decay=-g.abs(), scale=0.5),
            (rand(b, s, h, d), rand(b, s, h, d), rand(b, s, h, 6), rand(b, s, h), rand(b, s, h, scale=0.1)),
            torch.ops.seqpar.delta_rule_attention),
        "conv1d": (lambda x, w, bias: runtime.causal_conv1d(x, w, bias),
                   (rand(b, s, 6), rand(6, 4, generator=shared), rand(6, generator=shared)),
                   torch.ops.seqpar.causal_conv1d),
    }
    ctx = runtime.SPContext(group=torch.distributed.group.WORLD, softmax_strategy="ring", linear_strategy="lasp2",
                            layout="contiguous", cu_seqlens=None)
    results = {}
    for name, (fn, inputs, op) in calls.items():
        torch._dynamo.reset()
        counters.clear()
        recorder = GraphRecorder()
        runs = []
        with runtime.sp_context(ctx):
            for call in (fn, torch.compile(fn, backend=recorder, fullgraph=True)):
                out = call(*inputs)
                grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
                runs.append((out.detach(), grads))
        (eager_out, eager_grads), (out, grads) = runs
        errors = [rel_err(out, eager_out)] + [rel_err(g, e) for g, e in zip(grads, eager_grads)]
        results[name] = {"err": max(errors), "graph_breaks": sum(counters["graph_break"].values()),
                         "op_nodes": recorder.count(op.default)}
    return results


def test_each_routed_call_compiles_to_one_node_with_the_eager_values():
    for per_rank in run_distributed(ops_compiled_match_eager, 2, timeout=900):
        for name, r in per_rank.items():
            assert r["graph_breaks"] == 0 and r["op_nodes"] == 1, (name, r)
            assert r["err"] < 1e-12, (name, r)
