"""``parallelize(model)``: run an unmodified model with sequence parallelism.

    sp_model = seqpar.parallelize(model, strategy="ring")
    local = sp_model.prepare(batch)          # GLOBAL batch in (same on every rank), this rank's shard out
    out = sp_model(**local)                  # out.loss: the GLOBAL token-mean loss, equal on every rank
    out.loss.backward()
    sp_model.sync_gradients()                # every rank now holds the single-device gradients
    optimizer.step()

``prepare`` shifts labels over the whole sequence BEFORE sharding (no label is lost at a shard edge), pads each
sequence to the multiple the layout needs (padding carries label -100 and is never attended by real tokens),
builds global ``position_ids`` for the local tokens and packs variable-length batches with ``cu_seqlens``.
The wrapper computes the causal-LM loss itself from the local logits: sum over local labelled tokens, divided by
the number of labelled tokens of the whole batch (one all-reduce of two numbers).

With ``strategy="auto"`` rank 0 plans each step with ``seqpar.solver.plan_step`` (groups of different sizes and
strategies, each sequence to one group), broadcasts the plan, and every rank runs its group's sequences with its
group's strategy; gradients are then summed over the whole world.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar import integrations, runtime
from seqpar.collectives import comm
from seqpar.collectives.layout import layout_multiple, shard_indices

__all__ = ["SPModel", "SPOutput", "parallelize"]

STRATEGIES = ("ring", "token_ring", "ulysses", "allgather_kv", "auto")
IGNORE_INDEX = -100


@dataclass
class SPOutput:
    """``loss``: global token-mean loss (same value on every rank, gradient of this rank's share);
    ``logits``: this rank's local logits; ``num_tokens``: labelled tokens in the whole batch."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    num_tokens: int


@dataclass
class StepShard:
    """What ``prepare`` decided for this rank; passed back to ``forward`` as ``seqpar_step``."""

    group: Any
    strategy: str
    cu_seqlens: torch.Tensor | None
    plan_json: str | None = None


class SPModel(torch.nn.Module):
    """The wrapped model; create it with ``seqpar.parallelize``."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        group: dist.ProcessGroup | None,
        strategy: str,
        linear_strategy: str,
        layout: str,
        backend: str,
        cost_model: Any,
    ) -> None:
        super().__init__()
        self.module = model
        self.group, self.rank, self.world_size = comm.group_info(group)
        self.strategy = strategy
        self.linear_strategy = linear_strategy
        self.layout = layout
        self.backend = backend
        self.cost_model = cost_model
        self._aligned_groups: dict[tuple[int, ...], Any] = {}
        if strategy == "auto":
            self._create_aligned_groups()

    # -- process groups ----------------------------------------------------------------------------

    def _create_aligned_groups(self) -> None:
        """Create (once, in the same order on every rank) a group for every power-of-two aligned rank range."""
        p = self.world_size
        if p & (p - 1):
            raise ValueError(f"strategy: 'auto' plans power-of-two groups and needs a power-of-two world size, got {p}")
        members = [dist.get_global_rank(self.group, r) if self.group is not dist.group.WORLD else r for r in range(p)]
        size = 1
        while size <= p:
            for start in range(0, p, size):
                ranks = tuple(members[start:start + size])
                self._aligned_groups[tuple(range(start, start + size))] = (
                    self.group if size == p else dist.new_group(list(ranks))
                )
            size *= 2

    # -- prepare -------------------------------------------------------------------------------------

    def prepare(self, batch: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[str, Any]:
        """Turn a GLOBAL batch (identical on every rank) into this rank's inputs for ``forward``.

        Args:
            batch: ``{"input_ids": (B, S), "labels": (B, S) optional, "attention_mask": all ones, optional}``,
                or ``{"input_ids": (T,) or (1, T), "cu_seqlens": int32 (N+1,)}`` for a packed batch, or a list of
                1-D token tensors of different lengths. Without labels the inputs are their own labels.

        Returns:
            ``{"input_ids", "position_ids", "labels", "seqpar_step"}``: pass them all to the model call.

        Raises:
            ValueError: malformed batch (names the key), a padding attention_mask, an empty batch.
        """
        sequences, labels, padded_batch = _split_batch(batch)
        if self.strategy == "auto":
            return self._prepare_auto(sequences, labels)
        if padded_batch:
            return self._prepare_padded(sequences, labels)
        return self._prepare_packed(sequences, labels, list(range(len(sequences))), self.group, self.strategy)

    def _prepare_padded(self, sequences: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, Any]:
        ids = torch.stack(sequences)
        shifted = torch.stack([_shift(lab) for lab in labels])
        multiple = layout_multiple(self.layout, self.world_size)
        pad = (-ids.shape[1]) % multiple
        if pad:
            ids = F.pad(ids, (0, pad))
            shifted = F.pad(shifted, (0, pad), value=IGNORE_INDEX)
        index = shard_indices(ids.shape[1], self.world_size, self.rank, layout=self.layout).to(ids.device)
        positions = index[None].expand(ids.shape[0], -1)
        step = StepShard(self.group, self.strategy, None)
        return {"input_ids": ids[:, index], "position_ids": positions.contiguous(), "labels": shifted[:, index],
                "seqpar_step": step}

    def _prepare_packed(
        self, sequences: list[torch.Tensor], labels: list[torch.Tensor], chosen: list[int], group: Any, strategy: str,
        plan_json: str | None = None,
    ) -> dict[str, Any]:
        _, rank, size = comm.group_info(group)
        multiple = layout_multiple(self.layout, size)
        ids, labs, pos, bounds = [], [], [], [0]
        for i in chosen:
            seq, lab = sequences[i], _shift(labels[i])
            pad = (-seq.numel()) % multiple
            ids.append(F.pad(seq, (0, pad)))
            labs.append(F.pad(lab, (0, pad), value=IGNORE_INDEX))
            pos.append(torch.arange(seq.numel() + pad))
            bounds.append(bounds[-1] + seq.numel() + pad)
        device = sequences[0].device
        if not ids:  # this rank's group got no sequence this step: it only joins the loss and gradient sums
            empty = torch.zeros(1, 0, dtype=torch.long, device=device)
            step = StepShard(group, strategy, None, plan_json)
            return {"input_ids": empty, "position_ids": empty, "labels": empty, "seqpar_step": step}
        cu = torch.tensor(bounds, dtype=torch.int32)
        index = shard_indices(bounds[-1], size, rank, layout=self.layout, cu_seqlens=cu).to(device)
        local_cu = (cu // size).to(device=device, dtype=torch.int32)
        step = StepShard(group, strategy, local_cu, plan_json)
        return {"input_ids": torch.cat(ids)[index][None], "position_ids": torch.cat(pos).to(device)[index][None],
                "labels": torch.cat(labs)[index][None], "seqpar_step": step}

    def _prepare_auto(self, sequences: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, Any]:
        from seqpar.solver import Plan, plan_step

        lengths = [int(s.numel()) for s in sequences]
        plan_json = None
        if self.rank == 0:
            plan_json = plan_step(lengths, self.cost_model).to_json()
        # Time-limited solves can differ between ranks: every rank uses rank 0's plan.
        plan_json = comm.broadcast_bytes(
            plan_json.encode() if plan_json is not None else None, src=0, group=self.group
        ).decode()
        plan = Plan.from_json(plan_json)
        for g in plan.groups:
            if self.rank in g.ranks:
                key = tuple(g.ranks)
                if key not in self._aligned_groups:
                    raise ValueError(f"plan: group {key} is not an aligned power-of-two range of ranks")
                return self._prepare_packed(
                    sequences, labels, list(g.seq_indices), self._aligned_groups[key], g.strategy, plan_json
                )
        raise ValueError(f"plan: rank {self.rank} is in no group of the plan")

    # -- forward / loss / gradients ------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                seqpar_step: StepShard, **kwargs: Any) -> SPOutput:
        ctx = runtime.SPContext(
            group=seqpar_step.group, strategy=seqpar_step.strategy, linear_strategy=self.linear_strategy,
            layout=self.layout, cu_seqlens=seqpar_step.cu_seqlens, backend=self.backend,
        )
        logits = None
        if input_ids.numel():
            with runtime.sp_context(ctx), integrations.SDPAInterceptor():
                logits = _logits(self.module(**_model_kwargs(self.module, input_ids, position_ids, kwargs)))
            if ctx.calls == 0:
                raise RuntimeError(
                    "model: the forward ran without any attention call reaching seqpar, so it computed attention "
                    "over local tokens only; register an adapter for the model's attention module"
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
        return SPOutput(loss=loss, logits=logits, num_tokens=int(totals[1].item()))

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


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: position t predicts token t+1 of the SAME sequence; the last position predicts nothing."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def _split_batch(batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """(sequences, labels, is_padded_batch) from any accepted batch form."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("batch: empty list of sequences")
        for i, seq in enumerate(batch):
            if not isinstance(seq, torch.Tensor) or seq.dim() != 1 or seq.numel() == 0:
                raise ValueError(f"batch: item {i} must be a non-empty 1-D tensor of token ids")
        return list(batch), list(batch), False
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("batch: pass a dict with 'input_ids' (and optional 'labels', 'cu_seqlens') or a list of 1-D tensors")
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    if labels.shape != ids.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must equal input_ids' {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask != 0).all()):
        raise ValueError(
            "attention_mask: padding masks are not supported; pass a list of unpadded sequences (or cu_seqlens) "
            "and seqpar packs them"
        )
    if batch.get("cu_seqlens") is not None:
        from seqpar.collectives.layout import validate_cu_seqlens

        flat_ids, flat_labels = ids.reshape(-1), labels.reshape(-1)
        bounds = validate_cu_seqlens(batch["cu_seqlens"], flat_ids.numel())
        pairs = [(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(bounds, bounds[1:])]
        return [p[0] for p in pairs], [p[1] for p in pairs], False
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"input_ids: expected a non-empty (B, S) tensor, got shape {tuple(ids.shape)}")
    return list(ids), list(labels), True


def parallelize(
    model: torch.nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    strategy: str = "ring",
    linear_strategy: str = "zeco",
    layout: str = "auto",
    backend: str = "auto",
    cost_model: Any = None,
    check_consistency: bool = False,
) -> SPModel:
    """Wrap ``model`` so that its attention runs sequence-parallel over ``group``.

    Args:
        model: a transformers model, a module calling ``F.scaled_dot_product_attention``, or one whose attention
            modules have adapters (``seqpar.register_adapter``).
        group: the ranks that share each sequence (default: the world).
        strategy: softmax attention: ``"ring"``, ``"token_ring"``, ``"ulysses"``, ``"allgather_kv"``, or ``"auto"``
            (per-step heterogeneous plan from the solver; needs a power-of-two world).
        linear_strategy: linear attention: ``"zeco"`` or ``"lasp2"``.
        layout: ``"zigzag"``, ``"contiguous"`` or ``"auto"`` (zigzag, or contiguous when the model has
            linear-attention layers, whose state flows left to right).
        backend: kernel backend for the attention blocks.
        cost_model: a ``seqpar.solver.CostModel`` for ``strategy="auto"`` (default: one built from the model's
            config for a cluster of this world size).
        check_consistency: before every SP op, check that all ranks of its group pass the same shapes, dtypes
            and options, and raise on every rank naming the ones that differ (one small all-gather per call;
            also on with ``SEQPAR_DEBUG=1``).

    Raises:
        ValueError: unknown strategy/layout, attention seqpar cannot reach (names the module), unsupported
            attention features (sliding window, softcap, dropout), Ulysses with a head count the group does not
            divide.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if linear_strategy not in runtime.LINEAR_STRATEGIES:
        raise ValueError(
            f"linear_strategy: unknown strategy {linear_strategy!r}; choose one of {sorted(runtime.LINEAR_STRATEGIES)}"
        )
    if layout not in ("auto", "zigzag", "contiguous"):
        raise ValueError(f"layout: unknown layout {layout!r}; use 'auto', 'zigzag' or 'contiguous'")
    _, _, size = comm.group_info(group)
    if check_consistency:
        comm.set_consistency_checks(True)

    integrations.register_builtin_adapters()
    linear_modules = _install_adapters(model)
    if layout == "auto":
        layout = "contiguous" if linear_modules else "zigzag"
    elif layout == "zigzag" and linear_modules:
        raise ValueError(
            f"layout: {linear_modules[0]} is linear attention, which needs layout='contiguous' (or 'auto')"
        )

    if integrations.is_hf_model(model):
        if not integrations.register_hf():
            raise ValueError("model: looks like a transformers model but transformers does not import")
        integrations.check_hf_config(model)
        model.set_attn_implementation(integrations.HF_ATTENTION_NAME)
        heads = getattr(model.config.get_text_config(), "num_attention_heads", None)
    else:
        _check_reachable(model)
        heads = None
    if strategy == "ulysses" and heads is not None and heads % size:
        raise ValueError(
            f"strategy: Ulysses splits the {heads} attention heads over {size} ranks, which needs heads % ranks == 0; "
            "use 'ring' or 'token_ring'"
        )
    if strategy == "auto" and cost_model is None:
        cost_model = default_cost_model(model, size)
    return SPModel(model, group=group, strategy=strategy, linear_strategy=linear_strategy, layout=layout,
                   backend=backend, cost_model=cost_model)


def _install_adapters(model: torch.nn.Module) -> list[str]:
    """Route modules with adapters through them (inside SP forwards only); return the linear-attention ones."""
    linear = []
    for name, module in model.named_modules():
        fn = integrations.adapter_for(module)
        if fn is None or getattr(module, "_seqpar_original_forward", None) is not None:
            continue
        original = module.forward

        def routed(*args, __fn=fn, __module=module, __original=original, **kwargs):
            if runtime.current_context() is None:
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

