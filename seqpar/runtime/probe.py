"""Refusing models that mix tokens along the sequence in modules seqpar does not route.

seqpar shards the sequence and routes attention (softmax and linear) through its SP ops; everything else runs
on each rank's local tokens. That is right for per-token modules (projections, norms, MLPs, MoE) and silently
wrong for any other module that mixes tokens: a delta-rule or SSM layer, a causal convolution, a cumsum. Such a
model trains, with a wrong loss and wrong gradients.

``verify_model`` finds them generically: it runs the model once unsharded on a short random batch and once
through the SP path, with a forward hook on every module, and looks for the first module (in the order modules
finish) whose inputs agree with the unsharded run at this rank's token positions but whose output does not.
The sequence dimension of a tensor is the one whose size is S in the unsharded run and S_local in the sharded
one; tensors without one (per-batch values, scalars) are not compared. All ranks agree on the verdict.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch

from seqpar.collectives import comm
from seqpar.collectives.layout import layout_multiple, shard_indices

__all__ = ["PROBE_MIN_TOKENS", "verify_model"]

# The probe batch has at least this many tokens (rounded up to the layout's multiple): enough that a local
# shard has tokens after a short convolution's window, few enough to cost little.
PROBE_MIN_TOKENS = 32
# Largest per-token relative difference that still counts as rounding, by the model's parameter dtype. Measured
# on the tiny Llama / MiniMax / GPT at 4 ranks: rounding reaches 5e-7 (float32) and 1e-2 (bfloat16); the
# Gated DeltaNet of a tiny Qwen3-Next differs by 1.4 (O(1): real mixing on a local shard).
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
_LOW_PRECISION_TOLERANCE = 5e-2  # bfloat16, float16
_AMPLIFICATION = 10.0


def verify_model(
    model: torch.nn.Module,
    *,
    group: Any,
    layout: str,
    sharded_forward: Callable[[torch.Tensor], None],
    unsharded_forward: Callable[[torch.Tensor], None],
) -> None:
    """Raise on every rank if a module of ``model`` mixes tokens along the sequence without seqpar routing it.

    Runs ``sharded_forward(ids)`` (the SP path: it shards the (1, S) batch ``ids`` over ``group`` with
    ``layout`` and calls the model) and ``unsharded_forward(ids)`` (the original model on the whole batch), in
    eval mode, without autograd and with the RNG state forked (the caller's RNG streams are not advanced),
    then one all-gather of the verdict over ``group``. Cost: one SP and one unsharded forward of a batch of
    ``PROBE_MIN_TOKENS`` tokens (rounded up to the layout's multiple), and memory for every module's inputs and
    outputs on this rank's shard of it.

    Raises:
        ValueError: ``model: <qualified name> (<class>) mixes tokens along the sequence ...`` on every rank.
    """
    group, rank, size = comm.group_info(group)
    multiple = layout_multiple(layout, size)
    seq_len = multiple * math.ceil(PROBE_MIN_TOKENS / multiple)
    params = [p for p in model.parameters() if p.is_floating_point()]
    device = params[0].device if params else torch.device("cpu")
    dtype = max((p.dtype for p in params), key=lambda d: torch.finfo(d).eps, default=torch.float32)  # coarsest
    tolerance = _TOLERANCE.get(dtype, _LOW_PRECISION_TOLERANCE)
    ids = torch.randint(0, _vocab_size(model), (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    index = shard_indices(seq_len, size, rank, layout=layout).to(device)

    names = [name for name, _ in model.named_modules()]
    position = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    sharded: dict[tuple[int, int], tuple[dict, dict]] = {}
    finish_order: dict[tuple[int, int], int] = {}
    first: tuple[int, int, float] | None = None  # (finish position, module index, output error) of the culprit

    def count_call(module: torch.nn.Module, calls: dict[int, int]) -> tuple[int, int]:
        """(module index, how many times it has finished in this run): the same key in both runs."""
        i = position[id(module)]
        calls[i] = calls.get(i, 0) + 1
        return i, calls[i]

    sharded_calls: dict[int, int] = {}

    def on_sharded(module, args, kwargs, output):
        key = count_call(module, sharded_calls)
        finish_order[key] = len(finish_order)
        sharded[key] = (_leaves((args, kwargs), clone=True), _leaves(output, clone=True))

    unsharded_calls: dict[int, int] = {}

    def on_unsharded(module, args, kwargs, output):
        nonlocal first
        key = count_call(module, unsharded_calls)
        if key not in sharded:
            return
        local_inputs, local_outputs = sharded.pop(key)
        full_outputs = _leaves(output)
        # computed in a coarser dtype than the parameters' (FSDP2's MixedPrecisionPolicy, autocast): its rounding
        module_tolerance = max([tolerance] + [_TOLERANCE.get(t.dtype, _LOW_PRECISION_TOLERANCE)
                                              for t in full_outputs.values() if t.is_floating_point()])
        inputs = max(_errors(local_inputs, _leaves((args, kwargs)), index, seq_len), default=0.0)
        if inputs > module_tolerance:
            return
        worst = max(_errors(local_outputs, full_outputs, index, seq_len), default=0.0)
        # Rounding in low precision comes close to the tolerance; a module that merely passes on (or slightly
        # amplifies) a difference it was given is not the culprit, one that creates a 10x larger one is.
        culprit = worst > max(module_tolerance, _AMPLIFICATION * inputs)
        if culprit and (first is None or finish_order[key] < first[0]):
            first = (finish_order[key], key[0], worst)

    with _probing(model, device):
        for hook, forward in ((on_sharded, sharded_forward), (on_unsharded, unsharded_forward)):
            handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
            try:
                forward(ids)
            finally:
                for h in handles:
                    h.remove()
    sharded.clear()

    # on the model's device, where the group's backend (NCCL for CUDA) needs it; the verdicts come back to the
    # host once, at parallelize time
    mine = torch.tensor(first if first is not None else (-1.0, -1.0, 0.0), dtype=torch.float64, device=device)
    verdicts = [v for v in comm.all_gather(mine, group=group).tolist() if v[0] >= 0]
    if not verdicts:
        return
    _, module_index, error = min(verdicts)
    name = names[int(module_index)]
    module = model.get_submodule(name)
    raise ValueError(
        f"model: {_describe(model, name, module)} mixes tokens along the sequence, and seqpar does not route it: "
        f"sharded, each rank would run it on its own tokens only and the model would train silently wrong (its "
        f"output differed from the unsharded model's by {error:.2g} relative while its inputs agreed). Register "
        "an adapter for it (seqpar.register_adapter) that runs its sequence mixing through "
        "seqpar.runtime.softmax_attention / linear_attention, or pass SPConfig(verify_model=False) if you "
        "know better"
    )


@contextlib.contextmanager
def _probing(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no autograd, forked RNG; every module's train/eval flag restored afterwards, and FSDP2 modules
    resharded: FSDP's root keeps its unsharded parameters after a forward that no backward follows, and an
    optimizer built from ``model.parameters()`` afterwards would hold those instead of the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _vocab_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "vocab_size", None):
            return int(text.vocab_size)
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else 2


def _leaves(value: Any, *, clone: bool = False, path: str = "") -> dict[str, torch.Tensor]:
    """The tensors inside nested tuples / lists / dicts (model outputs are dicts), keyed by their path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        found[path] = value.detach().clone() if clone else value.detach()
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            found.update(_leaves(item, clone=clone, path=f"{path}/{i}"))
    elif isinstance(value, dict):
        for key, item in value.items():
            found.update(_leaves(item, clone=clone, path=f"{path}/{key}"))
    return found


def _errors(local: dict[str, torch.Tensor], full: dict[str, torch.Tensor], index: torch.Tensor,
            seq_len: int) -> list[float]:
    """Per matching leaf, how far this rank's sharded tensor is from the unsharded one at this rank's positions:
    the largest per-token difference over the RMS token norm (0 or inf for integer tensors). Leaves without a
    sequence dimension (or present in one run only) are left out."""
    errors = []
    for path, a in local.items():
        b = full.get(path)
        if b is None or a.dim() != b.dim() or a.dtype != b.dtype or a.dim() == 0:
            continue
        differ = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
        if len(differ) != 1 or b.shape[differ[0]] != seq_len or a.shape[differ[0]] != index.numel():
            continue
        d = differ[0]
        b = b.index_select(d, index.to(b.device))
        if not a.is_floating_point():
            errors.append(0.0 if torch.equal(a, b) else math.inf)
            continue
        a = a.movedim(d, 0).reshape(index.numel(), -1).double().nan_to_num()
        b = b.movedim(d, 0).reshape(index.numel(), -1).double().nan_to_num()
        scale = b.norm(dim=1).pow(2).mean().sqrt().item()
        diff = (a - b).norm(dim=1).max().item()
        errors.append(diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return errors


def _describe(model: torch.nn.Module, name: str, module: torch.nn.Module) -> str:
    """``name (Class)``; for a torch.nn building block, also the nearest enclosing module of the model's own."""
    text = f"{name or '<root>'} ({type(module).__name__})"
    if not type(module).__module__.startswith("torch."):
        return text
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner_name = ".".join(parts[:cut])
        owner = model.get_submodule(owner_name)
        if not type(owner).__module__.startswith("torch."):
            return f"{text} in {owner_name or '<root>'} ({type(owner).__name__})"
    return text
