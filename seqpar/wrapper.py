"""``parallelize(model)``: run an unmodified model with sequence parallelism.

    sp_model = seqpar.parallelize(model, strategy="ring")
    local = sp_model.prepare(batch)          # GLOBAL batch in (same on every rank), this rank's shard out
    out = sp_model(**local)                  # out.loss: the GLOBAL token-mean loss, equal on every rank
    out.loss.backward()
    sp_model.sync_gradients()                # every rank now holds the single-device gradients
    optimizer.step()

    # micro-batches under a per-rank token budget; each loss is normalised by the whole step's token count
    for mb in sp_model.prepare(batch, max_tokens_per_rank=4096):
        sp_model(**mb).loss.backward()
    sp_model.sync_gradients()

With FSDP2 (``fully_shard``) or ``DistributedDataParallel`` the wrapper's own reduction gives the single-device
gradients and ``sync_gradients`` is a no-op; with a ``DeviceMesh`` of ``("dp", "sp")`` each replica feeds its own
batch (``parallelize``'s docstring has the details).

``prepare`` (``seqpar.runtime``: packing and the step's plan and groups) shifts labels over the whole sequence
BEFORE sharding (no label is lost at a shard edge), pads each
sequence to the multiple the layout needs (padding carries label -100 and is never attended by real tokens),
builds global ``position_ids`` for the local tokens and packs variable-length batches with ``cu_seqlens``.
The wrapper computes the causal-LM loss itself from the local logits: sum over local labelled tokens, divided by
the number of labelled tokens of the whole batch (one all-reduce of two numbers, on the device: no host sync).

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
from torch.nn.parallel import DistributedDataParallel

from seqpar import integrations, strategies
from seqpar.collectives import comm
from seqpar.collectives.groups import subgroup
from seqpar.runtime import (
    IGNORE_INDEX,
    SPConfig,
    SPContext,
    StepRunner,
    StepShard,
    bind_to_backward,
    current_context,
    probe,
    sp_context,
)
from seqpar.runtime.packing import pack_padded

__all__ = ["SPConfig", "SPModel", "SPOutput", "parallelize"]


@dataclass
class SPOutput:
    """What one forward of the wrapped model returns.

    Attributes:
        loss: the global token-mean loss (same value on every rank, gradient of this rank's share).
        logits: this rank's local logits (of a placeholder sequence of padding when its group got no sequence
            this step or this micro-batch; see ``seqpar.runtime.packing.pack_sequences``).
        token_count: labelled tokens of this forward over all ranks and replicas (a 0-dim float64 tensor on the
            model's device; reading ``num_tokens`` instead syncs with the device).
        plan: the ``seqpar.solver.Plan`` this step ran (every rank's copy equal), or None for a fixed strategy.
        group_ranks: this rank's SP group in the step, as ranks of the parent group.
        softmax_strategy / linear_strategy: what that group ran for softmax / linear attention layers (None for
            a kind the step did not give it).
    """

    loss: torch.Tensor
    logits: torch.Tensor | None
    token_count: torch.Tensor
    plan: Any = None
    group_ranks: tuple[int, ...] = ()
    softmax_strategy: str | None = None
    linear_strategy: str | None = None

    @property
    def num_tokens(self) -> int:
        """``token_count`` as an int (a host sync: read it for logging, not in the step's hot path)."""
        return int(self.token_count.item())


class SPModel(torch.nn.Module):
    """The wrapped model; create it with ``seqpar.parallelize``. Model-facing only: ``prepare`` (through the
    runtime's ``StepRunner``), ``forward`` with the causal-LM loss, ``sync_gradients``."""

    def __init__(self, model: torch.nn.Module, *, config: SPConfig, layout: str, has_linear: bool,
                 heads: int | None = None, kv_heads: int | None = None,
                 original_attention: str | None = None) -> None:
        super().__init__()
        self.module = model
        self.original_attention = original_attention  # a transformers model's implementation before parallelize
        self.config = config
        self.layout = layout
        self.runner = StepRunner(config, layout=layout, has_linear=has_linear, heads=heads, kv_heads=kv_heads)
        self.group, self.rank, self.world_size = self.runner.group, self.runner.rank, self.runner.world_size
        # the loss and the gradients are summed over every rank of every replica
        self.reduce_group = self.group if config.dp_group is None else subgroup(
            None, sorted(int(r) for r in config.mesh.mesh.flatten().tolist()))
        self._grad_sync = _GradientSync(self, config.grad_bucket_bytes)
        if config.overlap_grad_sync:
            self._grad_sync.install_hooks()

    @property
    def inner_model(self) -> torch.nn.Module:
        """The user's model without a ``DistributedDataParallel`` wrapper (FSDP2 wraps in place: itself)."""
        return _unwrap_ddp(self.module)

    def prepare(self, batch: dict[str, torch.Tensor] | Sequence[torch.Tensor], *, plan: Any = None,
                max_tokens_per_rank: int | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Turn a GLOBAL batch (identical on every rank of the replica) into this rank's inputs for ``forward``.

        Args:
            batch: ``{"input_ids": (B, S), "labels": (B, S) optional, "attention_mask": (B, S) optional}``
                (a padding mask with left or right padding: each row's unpadded tokens become one sequence of
                a packed batch, with positions from 0 and labels shifted inside it; masked positions are
                neither attended nor labelled),
                or ``{"input_ids": (T,) or (1, T), "cu_seqlens": int32 (N+1,)}`` for a packed batch, or a list of
                1-D token tensors of different lengths. Without labels the inputs are their own labels.
            plan: run this ``seqpar.solver.Plan`` instead of the configured strategy or the planner's plan
                (every rank passes the same; rank 0's is used).
            max_tokens_per_rank: split the step into micro-batches: sequences, in order, are cut greedily so
                that no rank holds more than this many tokens (after padding to the layout's multiple) in one
                micro-batch. Every micro-batch's loss is divided by the labelled-token count of the WHOLE step
                (all replicas), so the micro-batches' losses sum to the step's loss and their accumulated
                backwards give the step's gradient. Every rank gets the same number of micro-batches (a rank
                with fewer tokens gets placeholder ones of padding that still join the collectives).

        Returns:
            ``{"input_ids", "position_ids", "labels", "seqpar_step"}``: pass them all to the model call; with
            ``max_tokens_per_rank``, or when the step's plan runs a group's sequences as several packed calls
            (``Group.micro_batches``: one call would not fit in memory), a list of such dicts, one per
            micro-batch, to run in order.

        Raises:
            ValueError: malformed batch (names the key), an attention_mask with padding between tokens or an
                empty row, an empty batch, a plan that does not fit the group or names unregistered strategies
                (``plan: ...``), a sequence that puts more than ``max_tokens_per_rank`` tokens on a rank even
                alone (``max_tokens_per_rank: ...``).
        """
        return self.runner.prepare(batch, plan=plan, max_tokens_per_rank=max_tokens_per_rank)

    def plan_ahead(self, seq_lens: Sequence[int], *, time_limit_s: float | None = None) -> None:
        """With ``strategy="auto"``: start planning a coming step whose sequences have ``seq_lens`` now, in the
        background on rank 0 (the solve is off the critical path); the next ``prepare`` of a batch with exactly
        these lengths uses that plan. Call it on every rank (ranks other than 0 do nothing) as soon as the data
        loader knows the next batch, after this step's ``prepare``. A no-op for a fixed strategy.

        ``time_limit_s``: the solve's budget in seconds; None (default) scales it with the step it overlaps: 5% of
        the last step's time on the CPU (the solve shares the training cores), 50% beside an accelerator, within
        [0.01, 5] s; on the CPU, while recent plans gained under 1% over the fastest static plan, only the static
        plans are scored (a few ms of CPU; ``seqpar.runtime.steps.StepRunner.plan_ahead_options``). A step nothing
        was planned ahead for is planned inside ``prepare``, stalling every rank, with 5% of the last step's time
        within [0.01, 1] s (1 s for the first step; ``StepRunner.inline_budget``).

        Raises:
            ValueError: ``time_limit_s`` not None or a positive number.
        """
        self.runner.plan_ahead(seq_lens, time_limit_s=time_limit_s)

    # -- forward / loss / gradients ------------------------------------------------------------------

    # torch.compile(sp_model) compiles the wrapped model's forward, not this frame: the step's set-up (the SP
    # context the routed calls read at run time, the gradient-sync hooks) and the loss with its one all-reduce
    # run eagerly around it (``_start_step`` / ``_finish_step``, which Dynamo skips whole), so the compiled
    # graph holds no step state and needs no recompilation when the step changes
    @torch.compiler.disable(recursive=False)
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                seqpar_step: StepShard, **kwargs: Any) -> SPOutput:
        ctx, model_kwargs = self._start_step(seqpar_step, input_ids, position_ids, kwargs)
        with _agreement_checks(self.config.check_consistency):
            output = None
            if input_ids.numel():
                # transformers models reach seqpar through their attention interface (and modules that call
                # SDPA themselves are routed one by one): no mode over the whole forward, which torch.compile
                # would trace into for every op
                intercept = contextlib.nullcontext() if self.original_attention else integrations.SDPAInterceptor()
                with sp_context(ctx), intercept:
                    output = self.module(**model_kwargs)
            return self._finish_step(ctx, output, labels, seqpar_step)

    @torch.compiler.disable
    def _start_step(self, seqpar_step: StepShard, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    kwargs: dict[str, Any]) -> tuple[SPContext, dict[str, Any]]:
        ctx = SPContext(
            group=seqpar_step.group, softmax_strategy=seqpar_step.softmax_strategy,
            linear_strategy=seqpar_step.linear_strategy, layout=self.layout, cu_seqlens=seqpar_step.cu_seqlens,
            backend=self.config.backend, max_seqlen=seqpar_step.max_seqlen,
        )
        _refuse_ddp_around(self)
        _sum_gradients_in_fsdp(self, self.reduce_group)  # FSDP2 applied after parallelize (to the SPModel too)
        self._grad_sync.arm(last_micro_batch=seqpar_step.micro_batch[0] == seqpar_step.micro_batch[1] - 1)
        return ctx, _model_kwargs(self.inner_model, input_ids, position_ids, kwargs)

    @torch.compiler.disable
    def _finish_step(self, ctx: SPContext, output: Any, labels: torch.Tensor, seqpar_step: StepShard) -> SPOutput:
        """The loss of the forward's ``output`` (None: the input was empty)."""
        logits = None
        if output is not None:
            logits = _logits(output)
            if ctx.calls == 0:
                raise RuntimeError(
                    "model: the forward ran without any attention call reaching seqpar, so it computed "
                    "attention over local tokens only; register an adapter for the model's attention module"
                )
            bind_to_backward(ctx, logits)  # activation checkpointing recomputes blocks inside this backward
            loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            local_sum = F.cross_entropy(
                logits.to(loss_dtype).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
        else:  # an empty input passed by hand; stay in the graph so backward works
            local_sum = sum(p.sum() * 0.0 for p in self.module.parameters())
        # the sum and the count travel in one all-reduce that stays on the device (no host sync)
        local_count = (labels != IGNORE_INDEX).sum()
        totals = torch.stack([local_sum.detach().to(torch.float64), local_count.to(torch.float64)])
        comm.all_reduce(totals, group=self.reduce_group)
        normalizer = totals[1] if seqpar_step.loss_normalizer is None else seqpar_step.loss_normalizer
        normalizer = normalizer.to(totals).clamp(min=1)
        # value: the global sum / count; gradient: this rank's share only (gradients are summed over ranks)
        loss = local_sum / normalizer.to(local_sum.dtype) + ((totals[0] - local_sum.detach()) / normalizer).to(
            local_sum.dtype)
        return SPOutput(loss=loss, logits=logits, token_count=totals[1], plan=seqpar_step.plan,
                        group_ranks=seqpar_step.group_ranks, softmax_strategy=seqpar_step.softmax_strategy,
                        linear_strategy=seqpar_step.linear_strategy)

    def sync_gradients(self) -> None:
        """Sum every parameter gradient over all ranks (every replica): each rank's backward gave its share of
        the global loss's gradient, so the sum is the single-device gradient.

        Reduces in buckets of at most ``SPConfig.grad_bucket_bytes`` (one flat copy of a bucket at a time; a
        gradient larger than a bucket is reduced in place), so the extra memory is one bucket, never a copy of
        all gradients. With ``SPConfig.overlap_grad_sync`` the buckets were started from backward hooks and this
        only waits for them (and reduces any bucket no hook started). A no-op when the model is wrapped in
        FSDP2 or ``DistributedDataParallel``: their own reduction already produced the summed gradients.
        """
        if _reduced_by_wrapper(self):
            return
        self._grad_sync.finish()

    def unwrap(self) -> torch.nn.Module:
        """Undo ``parallelize`` and return the model it was given (a ``DistributedDataParallel`` wrapper
        included): a transformers model gets its attention implementation back, modules routed through
        adapters or the SDPA interceptor get their own ``forward`` back, and the gradient-sync hooks are removed.

        Not needed to evaluate or generate: outside an SP step the wrapped model already runs as the original
        (its attention falls back to the original implementation). Left in place: FSDP2's gradient divide
        factor of 1 and DDP's summing comm hook (DDP allows no unregistering); use a fresh wrapper to train
        without seqpar. The ``SPModel`` must not be used afterwards.
        """
        model = self.inner_model
        self._grad_sync.remove_hooks()
        for module in model.modules():
            original = module.__dict__.pop("_seqpar_original_forward", None)
            if original is None:
                continue
            if getattr(original, "__func__", None) is type(module).forward and original.__self__ is module:
                del module.forward  # the class's forward again, as before parallelize
            else:
                module.forward = original
        if self.original_attention is not None:
            model.set_attn_implementation(self.original_attention)
            integrations.forget_original_attention(model)
        return self.module


class _GradientSync:
    """Bucketed gradient all-reduce over ``SPModel.reduce_group``, optionally started from backward hooks.

    Buckets hold consecutive parameters in reverse registration order (roughly the order backward produces
    their gradients), of one dtype and device, up to ``bucket_bytes``. A bucket is reduced through one flat
    buffer of its size, and one bucket is in flight at a time (starting the next waits for the previous, which
    under backward hooks has usually finished behind the backward's compute), so the extra memory is one bucket.
    """

    _MAX_IN_FLIGHT = 1

    def __init__(self, sp_model: SPModel, bucket_bytes: int) -> None:
        self.sp_model = sp_model
        self.bucket_bytes = bucket_bytes
        self.buckets: list[list[torch.nn.Parameter]] | None = None
        self.ready: list[int] = []
        self.started: list[bool] = []
        self.in_flight: list[tuple[int, Any, torch.Tensor]] = []
        self.armed = False
        self.hook_handles: list[Any] = []

    def _layout(self) -> list[list[torch.nn.Parameter]]:
        if self.buckets is None:
            buckets: list[list[torch.nn.Parameter]] = []
            size = 0
            for p in reversed([p for p in self.sp_model.module.parameters() if p.requires_grad]):
                nbytes = p.numel() * p.element_size()
                last = buckets[-1][-1] if buckets else None
                if last is None or size + nbytes > self.bucket_bytes or (p.dtype, p.device) != (last.dtype,
                                                                                                 last.device):
                    buckets.append([])
                    size = 0
                buckets[-1].append(p)
                size += nbytes
            self.buckets = buckets
            self._reset()
        return self.buckets

    def _reset(self) -> None:
        self.ready = [0] * len(self.buckets)
        self.started = [False] * len(self.buckets)
        self.in_flight = []

    def install_hooks(self) -> None:
        index = {p: (b, len(bucket)) for b, bucket in enumerate(self._layout()) for p in bucket}
        for p, (b, size) in index.items():
            self.hook_handles.append(
                p.register_post_accumulate_grad_hook(lambda _, b=b, size=size: self._on_grad_ready(b, size)))

    def remove_hooks(self) -> None:
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []

    def arm(self, *, last_micro_batch: bool) -> None:
        """Hooks start reductions only in the backward of a step's last micro-batch (earlier ones accumulate)."""
        self.armed = last_micro_batch and torch.is_grad_enabled() and not _reduced_by_wrapper(self.sp_model)

    def _on_grad_ready(self, bucket: int, size: int) -> None:
        if not self.armed or self.started[bucket]:
            return
        self.ready[bucket] += 1
        if self.ready[bucket] == size:
            self._start(bucket)

    def _start(self, bucket: int) -> None:
        while len(self.in_flight) >= self._MAX_IN_FLIGHT:
            self._wait_oldest()
        params = self.buckets[bucket]
        for p in params:
            if p.grad is None:  # every rank must reduce the same buffers: a missing gradient is a zero one
                p.grad = torch.zeros_like(p)
        group = self.sp_model.reduce_group
        if len(params) == 1 and params[0].grad.is_contiguous():
            flat = params[0].grad  # a lone (large) gradient is reduced in place: no copy
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.started[bucket] = True
        self.in_flight.append((bucket, comm.all_reduce_async(flat, group=group), flat))

    def _wait_oldest(self) -> None:
        bucket, pending, flat = self.in_flight.pop(0)
        pending.wait()
        params = self.buckets[bucket]
        if flat is not params[0].grad:
            for p, part in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(part.view_as(p.grad))

    def finish(self) -> None:
        for bucket in range(len(self._layout())):
            if not self.started[bucket]:
                self._start(bucket)
        while self.in_flight:
            self._wait_oldest()
        self._reset()
        self.armed = False


def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reduced_by_wrapper(sp_model: SPModel) -> bool:
    """DDP around the user's model, or FSDP2 on any of its modules or on the SPModel itself, reduces the gradients."""
    return isinstance(sp_model.module, DistributedDataParallel) or bool(_fsdp_modules(sp_model))


def _refuse_ddp_around(sp_model: SPModel) -> None:
    """DDP wrapped around the SPModel would average the ranks' gradient shares, whose SUM is the gradient."""
    active = DistributedDataParallel._get_active_ddp_module()  # set while a DDP forward runs its module
    if active is not None and active.module is sp_model:
        raise ValueError(
            "model: DistributedDataParallel wraps the SPModel, so it would average the ranks' gradient shares "
            "(seqpar's gradient is their sum); wrap the model before parallelize instead: "
            "seqpar.parallelize(DistributedDataParallel(model), ...)"
        )


def _sum_gradients_in_fsdp(model: torch.nn.Module, reduce_group: dist.ProcessGroup) -> None:
    """Make FSDP2 SUM gradients over its ranks instead of averaging them (each rank's backward produced its
    share of the global token-mean loss, so the sum is the single-device gradient). Idempotent and cheap."""
    for module in _fsdp_modules(model):
        if getattr(module, "_seqpar_sums_gradients", False):
            continue
        state = module._get_fsdp_state()
        for param_group in state._fsdp_param_groups:
            fsdp_size = param_group.mesh_info.mesh.size()
            if fsdp_size != dist.get_world_size(reduce_group):
                raise ValueError(
                    f"model: FSDP shards {type(module).__name__} over {fsdp_size} ranks, but seqpar's loss spans "
                    f"{dist.get_world_size(reduce_group)} (every rank of every replica); apply fully_shard over "
                    "all of those ranks (the default mesh, or the whole dp x sp mesh flattened)"
                )
        module.set_gradient_divide_factor(1.0)
        # a factor of 1 in float32/bf16 otherwise becomes ReduceOp.PREMUL_SUM(1.0), which gloo refuses; a plain SUM
        # (then a division by 1) runs on every backend
        module.set_force_sum_reduction_for_comms(True)
        module._seqpar_sums_gradients = True


def _sum_allreduce_hook(group, bucket):  # no annotations: DDP compares them with dist.GradBucket, and this
    # module's postponed annotations are strings
    """DDP comm hook: SUM the bucket (a ``dist.GradBucket``) over ``group`` (DDP's default divides by the world
    size); returns a future of the summed buffer."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


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
    mesh: Any = None,
    strategy: str | None = None,
    linear_strategy: str | None = None,
    layout: str | None = None,
    backend: str | None = None,
    cost_model: Any = None,
    check_consistency: bool | None = None,
    verify_model: bool | None = None,
    grad_bucket_bytes: int | None = None,
    overlap_grad_sync: bool | None = None,
) -> SPModel:
    """Wrap ``model`` so that its attention runs sequence-parallel over ``group``.

    Options come as ``config`` (an ``SPConfig``; its docstring describes each field) and/or as keyword
    arguments of the same names, which override the config's fields (None: not given). Defaults: the world,
    ``strategy="ring"``, ``linear_strategy="zeco"``, ``layout="auto"``, ``backend="auto"``, no consistency
    checks, ``verify_model=True``, 25 MiB gradient buckets, no overlapped gradient sync.

    Args:
        model: a transformers model, a module calling ``F.scaled_dot_product_attention``, or one whose attention
            modules have adapters (``seqpar.register_adapter``); optionally already wrapped in FSDP2
            (``fully_shard``) or ``DistributedDataParallel`` (see below).
        config: every option at once; the keyword options below override its fields.
        group, mesh, strategy, linear_strategy, layout, backend, cost_model, check_consistency, verify_model,
            grad_bucket_bytes, overlap_grad_sync: the ``SPConfig`` fields of these names. ``mesh`` (a
            ``DeviceMesh`` with dimensions ``("dp", "sp")``) runs one SP group per data-parallel replica, each on
            its own batch; ``strategy="auto"`` then plans inside each replica's ``sp`` ranks.

    Gradients. The loss every rank returns has the global token-mean's value, but its gradient is only this
    rank's share (its local tokens' loss terms over the global count), so the single-device gradient is the SUM
    of the ranks' gradients over every rank of every replica. Three ways to get it:

    * no wrapper: call ``sp_model.sync_gradients()`` after ``backward`` (bucketed all-reduce; with
      ``overlap_grad_sync`` started from backward hooks).
    * FSDP2: apply ``fully_shard`` (per layer, then the root) over all the ranks, before or after
      ``parallelize`` (both work; after, the root may be the model or the ``SPModel``). seqpar sets each FSDP
      module's gradient divide factor to 1 (``FSDPModule.set_gradient_divide_factor(1.0)``, at ``parallelize``
      and again at the first forward after a later ``fully_shard``), so FSDP's reduce-scatter sums instead of
      averaging: after ``loss.backward()`` the sharded gradients ARE the single-device gradients, no extra call.
    * DDP: wrap with ``DistributedDataParallel`` over all the ranks BEFORE ``parallelize`` (DDP applied to the
      ``SPModel`` would average: its first forward raises ``ValueError``). seqpar registers a comm hook that
      sums instead of averaging (DDP allows one hook, registered before the first backward; do not register
      your own).

    ``sync_gradients()`` is a no-op under FSDP2 and DDP, so a training loop may always call it. Ranks whose
    group has no sequence in a step (``"auto"``, micro-batches) run a placeholder sequence of padding, so every
    rank runs the model's forward and backward and FSDP's all-gathers and DDP's reductions stay matched.

    Activation checkpointing (``model.gradient_checkpointing_enable()``, reentrant or not, or
    ``torch.utils.checkpoint`` on your blocks) works: the recomputed forward runs inside the original forward's
    SP context and repeats its communication.

    Returns:
        An ``SPModel``: ``prepare(batch)`` -> this rank's inputs, ``forward(**inputs)`` -> ``SPOutput`` (loss,
        local logits, the executed plan), ``sync_gradients()``.

    With ``verify_model`` (the default) on more than one rank, the model is run once on a short random batch
    unsharded and through the SP path (cost: one forward of each on ``seqpar.runtime.probe.PROBE_MIN_TOKENS``
    tokens, in eval mode, without autograd, the RNG state untouched) to find sequence-mixing modules that
    seqpar does not route.

    Raises:
        ValueError: naming the option: a strategy that is not registered (``strategy:``, ``linear_strategy:``),
            a bad layout, a strategy the group size or head count rules out; naming the module or the model's
            config field: attention seqpar cannot reach (a Mamba-style model), attention dropout
            (``attn_pdrop``, ``attention_dropout``, ...), ALiBi biases, a module that mixes tokens along the
            sequence without seqpar routing it (``model: ...``). Raised on every rank: the local checks' verdicts
            are shared through the store before any collective (a rank whose checks passed raises
            ``model: parallelize failed on rank R ...`` quoting the failed rank's error); the probe's last.

    Sliding windows (per layer), softcap and attention sinks are not refused: each layer's attention call
    passes them on to the SP op. Outside an SP step the model runs as the original (its attention falls back to
    the implementation it had), so it evaluates and generates; ``SPModel.unwrap()`` undoes ``parallelize``.
    """
    overrides = dict(group=group, mesh=mesh, strategy=strategy, linear_strategy=linear_strategy, layout=layout,
                     backend=backend, cost_model=cost_model, check_consistency=check_consistency,
                     verify_model=verify_model, grad_bucket_bytes=grad_bucket_bytes,
                     overlap_grad_sync=overlap_grad_sync)
    if config is not None and not isinstance(config, SPConfig):
        raise ValueError(f"config: expected a seqpar.SPConfig, got {type(config).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    config = replace(config if config is not None else SPConfig(), **given).validate()
    try:
        setup = _check_and_route(model, config)
    except Exception as err:
        _raise_if_any_rank_failed(err, config.sp_group)
        raise
    _raise_if_any_rank_failed(None, config.sp_group)
    sp_model = SPModel(setup.wrapper, config=setup.config, layout=setup.layout, has_linear=setup.has_linear,
                       heads=setup.heads, kv_heads=setup.kv_heads, original_attention=setup.original_attention)
    wrapper, model = setup.wrapper, _unwrap_ddp(setup.wrapper)
    _sum_gradients_in_fsdp(model, sp_model.reduce_group)
    if isinstance(wrapper, DistributedDataParallel):
        ddp_size = dist.get_world_size(wrapper.process_group)
        if ddp_size != dist.get_world_size(sp_model.reduce_group):
            raise ValueError(
                f"model: DistributedDataParallel spans {ddp_size} ranks, but seqpar's loss spans "
                f"{dist.get_world_size(sp_model.reduce_group)} (every rank of every replica); wrap over all of them"
            )
        wrapper.register_comm_hook(wrapper.process_group, _sum_allreduce_hook)
    if setup.config.verify_model and setup.size > 1:
        _verify(sp_model, setup.reference_attention)
    return sp_model


@dataclass
class _Setup:
    """What ``parallelize`` decided before any communication."""

    wrapper: torch.nn.Module
    config: SPConfig
    size: int
    layout: str
    has_linear: bool
    heads: int | None
    kv_heads: int | None
    reference_attention: str | None
    original_attention: str | None


# How many verdict exchanges each process group has had: the store keys of one exchange are unique to it.
_VERDICT_EXCHANGES: dict[str, int] = {}


def _raise_if_any_rank_failed(error: BaseException | None, group: dist.ProcessGroup | None) -> None:
    """Every rank's verdict on its local checks, through the process group's key-value store, before the first
    collective of ``parallelize``: a rank whose checks failed (a model built differently on one rank, a cost
    model that does not fit) posts its error and re-raises it at once; every other rank waits (bounded by
    ``SEQPAR_COMM_TIMEOUT_S``) for all verdicts and raises a ValueError quoting the failure, instead of waiting
    for that rank in the model probe's collectives until the communication timeout. The store, not a collective:
    a failing rank never waits, and nothing is sent through the group (``count_comm`` sees nothing)."""
    group, rank, size = comm.group_info(group)
    if size == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    name = group.group_name
    _VERDICT_EXCHANGES[name] = exchange = _VERDICT_EXCHANGES.get(name, 0) + 1
    keys = [f"seqpar/parallelize/{name}/{exchange}/{r}" for r in range(size)]
    store.set(keys[rank], b"ok" if error is None else f"failed:{type(error).__name__}: {error}".encode())
    if error is not None:
        return
    store.wait(keys, comm.default_timeout())
    verdicts = [store.get(key) for key in keys]
    failed = [r for r, verdict in enumerate(verdicts) if verdict != b"ok"]
    if failed:
        text = verdicts[failed[0]][len(b"failed:"):].decode(errors="replace")
        raise ValueError(f"model: parallelize failed on rank {failed[0]} of the group (ranks {failed} failed): "
                         f"{text}")


def _check_and_route(model: torch.nn.Module, config: SPConfig) -> _Setup:
    """Every local check of ``parallelize`` (no communication), then the routing of the model's attention."""
    _, _, size = comm.group_info(config.sp_group)
    wrapper, model = model, _unwrap_ddp(model)

    integrations.register_builtin_adapters()
    linear_modules = _install_adapters(model)
    layout = config.layout
    if layout == "auto":
        layout = "contiguous" if linear_modules else "zigzag"
    elif layout == "zigzag" and linear_modules:
        raise ValueError(
            f"layout: {linear_modules[0]} is linear attention, which needs layout='contiguous' (or 'auto')"
        )

    reference_attention = original_attention = None
    heads = kv_heads = None
    if integrations.is_hf_model(model):
        if not integrations.register_hf():
            raise ValueError("model: looks like a transformers model but transformers does not import")
        integrations.check_hf_config(model)
        reference_attention = model.config._attn_implementation
        if reference_attention in (None, integrations.HF_ATTENTION_NAME):  # wrapped before: what it had then
            reference_attention = integrations.original_attention_name(model.config)
        original_attention = reference_attention
        integrations.remember_original_attention(model, original_attention)
        model.set_attn_implementation(integrations.HF_ATTENTION_NAME)
        _route_sdpa_modules(model)  # a module calling SDPA itself (not through the attention interface)
        text = model.config.get_text_config()
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
    else:
        _check_reachable(model)
        _route_sdpa_modules(model)
    if config.strategy != "auto" and heads is not None:
        reason = strategies.get(config.strategy, "softmax").invalid_reason(size, heads, kv_heads)
        if reason is not None:
            usable = [n for n in strategies.names("softmax") if strategies.get(n).valid(size, heads, kv_heads)]
            raise ValueError(f"strategy: {config.strategy!r} cannot run on {size} ranks here: {reason}; use one of "
                             f"{usable}")
    if config.strategy == "auto" and config.cost_model is None:
        config = replace(config, cost_model=default_cost_model(model, size))
    planned_size = getattr(getattr(config.cost_model, "cluster", None), "world_size", size)
    if config.strategy == "auto" and planned_size != size:
        raise ValueError(
            f"cost_model: its cluster has world_size={planned_size}, but the plan runs on the {size} ranks that "
            "share each sequence (the mesh's 'sp' dimension, or the group); build its Cluster with that size"
        )
    return _Setup(wrapper=wrapper, config=config, size=size, layout=layout, has_linear=bool(linear_modules),
                  heads=heads, kv_heads=kv_heads, reference_attention=reference_attention,
                  original_attention=original_attention)


def _verify(sp_model: SPModel, reference_attention: str | None) -> None:
    """``seqpar.runtime.verify_model`` on the wrapped model: the SP path on the whole group (with ``"auto"``,
    the first registered softmax strategy valid here; which one does not matter: all compute the same) against
    the model with its own attention."""
    model, runner = sp_model.inner_model, sp_model.runner
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
            sp_model.module(**_model_kwargs(model, ids, positions, {}))

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
        if fn is None:
            continue
        if integrations.is_linear_adapter(module):
            linear.append(name)
        if getattr(module, "_seqpar_original_forward", None) is not None:  # parallelized before: routed already
            continue
        original = module.forward

        def routed(*args, __fn=fn, __module=module, __original=original, **kwargs):
            if current_context() is None:
                return __original(*args, **kwargs)
            return __fn(__module, *args, **kwargs)

        module._seqpar_original_forward = original
        module.forward = routed
    return linear


def _route_sdpa_modules(model: torch.nn.Module) -> None:
    """Give modules that call ``F.scaled_dot_product_attention`` their own SDPA interceptor whenever an SP
    context is current. ``SPModel.forward`` intercepts SDPA for its whole forward; this also covers a block that
    activation checkpointing recomputes during backward, after that forward has returned."""
    for module in model.modules():
        if not integrations.calls_sdpa(module) or getattr(module, "_seqpar_original_forward", None) is not None:
            continue
        original = module.forward

        def routed(*args, __original=original, **kwargs):
            intercepting = any(isinstance(m, integrations.SDPAInterceptor)
                               for m in torch.overrides._get_current_function_mode_stack())
            if current_context() is None or intercepting:
                return __original(*args, **kwargs)
            with integrations.SDPAInterceptor():
                return __original(*args, **kwargs)

        module._seqpar_original_forward = original
        module.forward = routed


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
    """A cost model for ``strategy='auto'`` from the model's config and a generic cluster of ``world_size`` ranks.

    Its ``ModelSpec`` lists the config's ``layer_types`` (``"linear_attention"`` -> ``"linear"``), each layer's
    sliding window (``integrations.hf_layer_windows``: a windowed layer is planned with its windowed cost) and, as
    ``delta_rule_layers``, the modules that run on a delta-rule adapter (Qwen3-Next Gated DeltaNet, Kimi Linear
    KDA: ``integrations_delta``), so the planner charges those layers the delta-rule ops' bytes and compute,
    sized with the layers' own heads and D_k, D_v (``integrations_delta.delta_rule_dims``).
    """
    from seqpar.integrations_delta import delta_rule_dims
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
    integrations.register_builtin_adapters()  # also when called before any parallelize
    delta_dims = [dims for dims in map(delta_rule_dims, model.modules()) if dims is not None]
    delta_rule_layers = len(delta_dims)
    heads_dk_dv = delta_dims[0] if delta_dims else (None, None, None)  # the layers' own H, D_k, D_v
    spec = ModelSpec(
        num_layers=text.num_hidden_layers, hidden=text.hidden_size, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", heads) or heads, head_dim=head_dim,
        ffn_hidden=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size,
        layer_kinds=kinds, layer_windows=integrations.hf_layer_windows(model),
        # a config that does not list its delta-rule layers as linear ones: charge as many as it lists
        delta_rule_layers=min(delta_rule_layers, kinds.count("linear")),
        delta_rule_heads=heads_dk_dv[0], delta_rule_key_dim=heads_dk_dv[1], delta_rule_value_dim=heads_dk_dv[2],
    )
    if torch.cuda.is_available():  # a generic GPU node; calibrate for real numbers
        cluster = Cluster(world_size=world_size, gpus_per_node=min(world_size, 8), peak_tflops=300.0,
                          mem_bytes=80 * 2**30, intra_node_gbps=200.0, inter_node_gbps=25.0)
    else:  # CPU ranks over gloo: ~10 GFLOP/s per rank, millisecond-scale latency
        cluster = Cluster(world_size=world_size, gpus_per_node=world_size, peak_tflops=0.01, mem_bytes=8 * 2**30,
                          intra_node_gbps=5.0, inter_node_gbps=5.0, latency_s=0.005,
                          cores_per_node=cpu_cores_per_node(world_size))
    return CostModel(cluster, spec)


def cpu_cores_per_node(world_size: int) -> int | None:
    """``Cluster.cores_per_node`` of CPU ranks on this host: how many of them compute at once (the cores this
    process may run on, over the threads each rank uses), or None when every rank of the host
    (``LOCAL_WORLD_SIZE``, else ``world_size``) has cores of its own."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slots = max(1, cores // max(1, torch.get_num_threads()))
    ranks = min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    return slots if slots < ranks else None

