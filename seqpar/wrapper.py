"""``parallelize(model)``: run an unmodified model with sequence parallelism.

    sp_model = seqpar.parallelize(model, strategy="ring")
    local = sp_model.prepare(batch)          # GLOBAL batch in (same on every rank), this rank's shard out
    out = sp_model(**local)                  # out.loss: the GLOBAL token-mean loss, equal on every rank
    out.loss.backward()
    sp_model.sync_gradients()                # every rank now holds the single-device gradients
    optimizer.step()

``prepare`` (``seqpar.runtime``: packing and the step's plan and groups) shifts labels over the whole sequence
BEFORE sharding (no label is lost at a shard edge), pads each
sequence to the multiple the layout needs (padding carries label -100 and is never attended by real tokens),
builds global ``position_ids`` for the local tokens and packs variable-length batches with ``cu_seqlens``.
The wrapper computes the causal-LM loss itself from the local logits: sum over local labelled tokens, divided by
the number of labelled tokens of the whole batch (one all-reduce of two numbers).

With ``strategy="auto"`` rank 0 plans each step with ``seqpar.solver.plan_step`` (groups of different sizes and
strategies, each sequence to one group), broadcasts the plan, and every rank runs its group's sequences with its
group's pair of strategies (softmax layers, linear layers); gradients are then summed over the whole world.
``SPOutput.plan`` is the plan the step ran. Options travel as one ``SPConfig``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar import integrations, strategies
from seqpar.collectives import comm
from seqpar.runtime import IGNORE_INDEX, SPConfig, SPContext, StepRunner, StepShard, current_context, probe, sp_context
from seqpar.runtime.packing import pack_padded

__all__ = ["SPConfig", "SPModel", "SPOutput", "parallelize"]


@dataclass
class SPOutput:
    """What one forward of the wrapped model returns.

    Attributes:
        loss: the global token-mean loss (same value on every rank, gradient of this rank's share).
        logits: this rank's local logits (None when its group got no sequence this step).
        num_tokens: labelled tokens in the whole batch.
        plan: the ``seqpar.solver.Plan`` this step ran (every rank's copy equal), or None for a fixed strategy.
        group_ranks: this rank's SP group in the step, as ranks of the parent group.
        softmax_strategy / linear_strategy: what that group ran for softmax / linear attention layers (None for
            a kind the step did not give it).
    """

    loss: torch.Tensor
    logits: torch.Tensor | None
    num_tokens: int
    plan: Any = None
    group_ranks: tuple[int, ...] = ()
    softmax_strategy: str | None = None
    linear_strategy: str | None = None


class SPModel(torch.nn.Module):
    """The wrapped model; create it with ``seqpar.parallelize``. Model-facing only: ``prepare`` (through the
    runtime's ``StepRunner``), ``forward`` with the causal-LM loss, ``sync_gradients``."""

    def __init__(self, model: torch.nn.Module, *, config: SPConfig, layout: str, has_linear: bool,
                 heads: int | None = None, kv_heads: int | None = None) -> None:
        super().__init__()
        self.module = model
        self.config = config
        self.layout = layout
        self.runner = StepRunner(config, layout=layout, has_linear=has_linear, heads=heads, kv_heads=kv_heads)
        self.group, self.rank, self.world_size = self.runner.group, self.runner.rank, self.runner.world_size

    def prepare(self, batch: dict[str, torch.Tensor] | Sequence[torch.Tensor], *, plan: Any = None) -> dict[str, Any]:
        """Turn a GLOBAL batch (identical on every rank) into this rank's inputs for ``forward``.

        Args:
            batch: ``{"input_ids": (B, S), "labels": (B, S) optional, "attention_mask": all ones, optional}``,
                or ``{"input_ids": (T,) or (1, T), "cu_seqlens": int32 (N+1,)}`` for a packed batch, or a list of
                1-D token tensors of different lengths. Without labels the inputs are their own labels.
            plan: run this ``seqpar.solver.Plan`` instead of the configured strategy or the planner's plan
                (every rank passes the same; rank 0's is used).

        Returns:
            ``{"input_ids", "position_ids", "labels", "seqpar_step"}``: pass them all to the model call.

        Raises:
            ValueError: malformed batch (names the key), a padding attention_mask, an empty batch, a plan that
                does not fit the group or names unregistered strategies (``plan: ...``).
        """
        return self.runner.prepare(batch, plan=plan)

    # -- forward / loss / gradients ------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                seqpar_step: StepShard, **kwargs: Any) -> SPOutput:
        ctx = SPContext(
            group=seqpar_step.group, softmax_strategy=seqpar_step.softmax_strategy,
            linear_strategy=seqpar_step.linear_strategy, layout=self.layout, cu_seqlens=seqpar_step.cu_seqlens,
            backend=self.config.backend, max_seqlen=seqpar_step.max_seqlen,
        )
        logits = None
        with _agreement_checks(self.config.check_consistency):
            if input_ids.numel():
                with sp_context(ctx), integrations.SDPAInterceptor():
                    logits = _logits(self.module(**_model_kwargs(self.module, input_ids, position_ids, kwargs)))
                if ctx.calls == 0:
                    raise RuntimeError(
                        "model: the forward ran without any attention call reaching seqpar, so it computed "
                        "attention over local tokens only; register an adapter for the model's attention module"
                    )
                local_sum = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            else:  # this rank's group got no sequence this step; stay in the graph so backward works
                local_sum = sum(p.sum() * 0.0 for p in self.module.parameters())
            local_count = int((labels != IGNORE_INDEX).sum())
            totals = torch.tensor([local_sum.detach().item(), float(local_count)], dtype=torch.float64)
            comm.all_reduce(totals, group=self.group)
        count = max(int(totals[1].item()), 1)
        loss = local_sum / count + (totals[0].item() - local_sum.detach().item()) / count
        return SPOutput(loss=loss, logits=logits, num_tokens=int(totals[1].item()), plan=seqpar_step.plan,
                        group_ranks=seqpar_step.group_ranks, softmax_strategy=seqpar_step.softmax_strategy,
                        linear_strategy=seqpar_step.linear_strategy)

    def sync_gradients(self) -> None:
        """Sum every parameter gradient over the group (one all-reduce per dtype): each rank's backward gave its
        share of the global loss's gradient, so the sum is the single-device gradient."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            comm.all_reduce(flat, group=self.group)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n


@contextlib.contextmanager
def _agreement_checks(enabled: bool | None) -> Iterator[None]:
    """Cross-rank argument checks forced on or off for the block (None: the process default), scoped."""
    if enabled is None:
        yield
        return
    with comm.agreement_checks(enabled):
        yield


def _model_kwargs(model: torch.nn.Module, input_ids, position_ids, extra: dict) -> dict:
    kwargs = {"input_ids": input_ids, **extra}
    params = _forward_parameters(model)
    if "position_ids" in params or "kwargs" in params:
        kwargs["position_ids"] = position_ids
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError("model: the wrapped model must return logits (a tensor, or an output with .logits)")
    return logits


def parallelize(
    model: torch.nn.Module,
    *,
    config: SPConfig | None = None,
    group: dist.ProcessGroup | None = None,
    strategy: str | None = None,
    linear_strategy: str | None = None,
    layout: str | None = None,
    backend: str | None = None,
    cost_model: Any = None,
    check_consistency: bool | None = None,
    verify_model: bool | None = None,
) -> SPModel:
    """Wrap ``model`` so that its attention runs sequence-parallel over ``group``.

    Options come as ``config`` (an ``SPConfig``; its docstring describes each field) and/or as keyword
    arguments of the same names, which override the config's fields (None: not given). Defaults: the world,
    ``strategy="ring"``, ``linear_strategy="zeco"``, ``layout="auto"``, ``backend="auto"``, no consistency
    checks, ``verify_model=True``.

    Args:
        model: a transformers model, a module calling ``F.scaled_dot_product_attention``, or one whose attention
            modules have adapters (``seqpar.register_adapter``).
        config: every option at once; the keyword options below override its fields.
        group, strategy, linear_strategy, layout, backend, cost_model, check_consistency, verify_model: the
            ``SPConfig`` fields of these names.

    Returns:
        An ``SPModel``: ``prepare(batch)`` -> this rank's inputs, ``forward(**inputs)`` -> ``SPOutput`` (loss,
        local logits, the executed plan), ``sync_gradients()``.

    With ``verify_model`` (the default) on more than one rank, the model is run once on a short random batch
    unsharded and through the SP path (cost: one forward of each on ``seqpar.runtime.probe.PROBE_MIN_TOKENS``
    tokens, in eval mode, without autograd, the RNG state untouched) to find sequence-mixing modules that
    seqpar does not route.

    Raises:
        ValueError: naming the option: a strategy that is not registered (``strategy:``, ``linear_strategy:``),
            a bad layout, a strategy the group size or head count rules out; naming the module: attention
            seqpar cannot reach, unsupported attention features (sliding window, softcap, dropout), a module
            that mixes tokens along the sequence without seqpar routing it (``model: ...``). Raised on every
            rank; all but the last before any communication.
    """
    overrides = dict(group=group, strategy=strategy, linear_strategy=linear_strategy, layout=layout,
                     backend=backend, cost_model=cost_model, check_consistency=check_consistency,
                     verify_model=verify_model)
    if config is not None and not isinstance(config, SPConfig):
        raise ValueError(f"config: expected a seqpar.SPConfig, got {type(config).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    config = replace(config if config is not None else SPConfig(), **given).validate()
    _, _, size = comm.group_info(config.group)
    if config.strategy == "auto" and size & (size - 1):
        raise ValueError(
            f"strategy: 'auto' plans power-of-two groups and needs a power-of-two world size, got {size}"
        )

    integrations.register_builtin_adapters()
    linear_modules = _install_adapters(model)
    layout = config.layout
    if layout == "auto":
        layout = "contiguous" if linear_modules else "zigzag"
    elif layout == "zigzag" and linear_modules:
        raise ValueError(
            f"layout: {linear_modules[0]} is linear attention, which needs layout='contiguous' (or 'auto')"
        )

    reference_attention = None
    heads = kv_heads = None
    if integrations.is_hf_model(model):
        if not integrations.register_hf():
            raise ValueError("model: looks like a transformers model but transformers does not import")
        integrations.check_hf_config(model)
        reference_attention = model.config._attn_implementation
        if reference_attention in (None, integrations.HF_ATTENTION_NAME):  # wrapped before: compare with eager
            reference_attention = "eager"
        model.set_attn_implementation(integrations.HF_ATTENTION_NAME)
        text = model.config.get_text_config()
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
    else:
        _check_reachable(model)
    if config.strategy != "auto" and heads is not None:
        reason = strategies.get(config.strategy, "softmax").invalid_reason(size, heads, kv_heads)
        if reason is not None:
            usable = [n for n in strategies.names("softmax") if strategies.get(n).valid(size, heads, kv_heads)]
            raise ValueError(f"strategy: {config.strategy!r} cannot run on {size} ranks here: {reason}; use one of "
                             f"{usable}")
    if config.strategy == "auto" and config.cost_model is None:
        config = replace(config, cost_model=default_cost_model(model, size))
    sp_model = SPModel(model, config=config, layout=layout, has_linear=bool(linear_modules), heads=heads,
                       kv_heads=kv_heads)
    if config.verify_model and size > 1:
        _verify(sp_model, reference_attention)
    return sp_model


def _verify(sp_model: SPModel, reference_attention: str | None) -> None:
    """``seqpar.runtime.verify_model`` on the wrapped model: the SP path on the whole group (with ``"auto"``,
    the first registered softmax strategy valid here; which one does not matter: all compute the same) against
    the model with its own attention."""
    model, runner = sp_model.module, sp_model.runner
    softmax = sp_model.config.strategy
    if softmax == "auto":
        heads = runner.heads or 1
        softmax = next((n for n in strategies.names("softmax")
                        if strategies.get(n).valid(runner.world_size, heads, runner.kv_heads or heads)), None)

    def sharded(ids: torch.Tensor) -> None:
        sp_model(**pack_padded(list(ids), list(ids), layout=sp_model.layout, step=runner.fixed_step(softmax)))

    def unsharded(ids: torch.Tensor) -> None:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        with _attention_implementation(model, reference_attention):
            model(**_model_kwargs(model, ids, positions, {}))

    probe.verify_model(model, group=sp_model.group, layout=sp_model.layout, sharded_forward=sharded,
                       unsharded_forward=unsharded)


@contextlib.contextmanager
def _attention_implementation(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """A transformers model's attention implementation switched to ``name`` for the block (None: unchanged)."""
    if name is None:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(integrations.HF_ATTENTION_NAME)


def _install_adapters(model: torch.nn.Module) -> list[str]:
    """Route modules with adapters through them (inside SP forwards only); return the linear-attention ones."""
    linear = []
    for name, module in model.named_modules():
        fn = integrations.adapter_for(module)
        if fn is None or getattr(module, "_seqpar_original_forward", None) is not None:
            continue
        original = module.forward

        def routed(*args, __fn=fn, __module=module, __original=original, **kwargs):
            if current_context() is None:
                return __original(*args, **kwargs)
            return __fn(__module, *args, **kwargs)

        module._seqpar_original_forward = original
        module.forward = routed
        if integrations.is_linear_adapter(module):
            linear.append(name)
    return linear


def _check_reachable(model: torch.nn.Module) -> None:
    """Static check for non-transformers models: some module must call SDPA or have an adapter, and no module
    that looks like attention may be left out."""
    reachable = False
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            raise ValueError(
                f"model: {name or type(model).__name__} is torch.nn.MultiheadAttention, whose fused path seqpar cannot "
                "shard; call F.scaled_dot_product_attention in your module, or register an adapter"
            )
        ok = integrations.calls_sdpa(module) or integrations.adapter_for(module) is not None
        reachable = reachable or ok
        if "attention" in type(module).__name__.lower() and not ok and not _has_reachable_child(module):
            raise ValueError(
                f"model: attention module {name or '<root>'} ({type(module).__name__}) neither calls "
                "F.scaled_dot_product_attention nor has an adapter; register one with seqpar.register_adapter"
            )
    if not reachable:
        raise ValueError(
            f"model: seqpar found no attention to parallelize in {type(model).__name__} (no module calls "
            "F.scaled_dot_product_attention and none has an adapter)"
        )


def _has_reachable_child(module: torch.nn.Module) -> bool:
    return any(
        integrations.calls_sdpa(m) or integrations.adapter_for(m) is not None
        for _, m in module.named_modules() if m is not module
    )


def default_cost_model(model: torch.nn.Module, world_size: int) -> Any:
    """A cost model for ``strategy='auto'`` from the model's config and a generic cluster of ``world_size`` ranks."""
    from seqpar.solver import Cluster, CostModel, ModelSpec

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("cost_model: strategy='auto' on a model without a transformers config needs cost_model=")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kinds = tuple(
        "linear" if t == "linear_attention" else "softmax"
        for t in (getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    )
    spec = ModelSpec(
        num_layers=text.num_hidden_layers, hidden=text.hidden_size, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", heads) or heads, head_dim=head_dim,
        ffn_hidden=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size,
        layer_kinds=kinds,
    )
    if torch.cuda.is_available():  # a generic GPU node; calibrate for real numbers
        cluster = Cluster(world_size=world_size, gpus_per_node=min(world_size, 8), peak_tflops=300.0,
                          mem_bytes=80 * 2**30, intra_node_gbps=200.0, inter_node_gbps=25.0)
    else:  # CPU ranks over gloo: ~10 GFLOP/s per rank, millisecond-scale latency
        cluster = Cluster(world_size=world_size, gpus_per_node=world_size, peak_tflops=0.01, mem_bytes=8 * 2**30,
                          intra_node_gbps=5.0, inter_node_gbps=5.0, latency_s=0.005)
    return CostModel(cluster, spec)

