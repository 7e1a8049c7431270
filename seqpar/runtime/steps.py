"""Per-step execution: the plan every rank runs, the process groups it needs, and this rank's share of the batch.

With a fixed strategy every step runs on the whole group. With ``strategy="auto"`` (or a plan passed to
``prepare``) rank 0 plans, the plan is broadcast (time-limited solves can differ between ranks: everyone runs
rank 0's), and each rank runs its plan group's sequences with that group's ``(softmax_strategy,
linear_strategy)`` pair; when the plan gives a group several packed calls (micro-batches, because one call of
all its sequences would not fit in memory), ``prepare`` returns the list of micro-batches, as with
``max_tokens_per_rank``. A plan group's process group is created the first time a plan uses it and cached per
parent group (``seqpar.collectives.groups.subgroup``), so later steps and other plans reuse it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.distributed as dist

from seqpar import strategies
from seqpar.collectives import comm
from seqpar.collectives.groups import subgroup
from seqpar.collectives.layout import layout_multiple
from seqpar.runtime.config import SPConfig
from seqpar.runtime.packing import (
    IGNORE_INDEX,
    StepShard,
    pack_padded,
    pack_sequences,
    shift_labels,
    split_batch,
)

__all__ = ["StepRunner", "check_plan"]

# The planner's budget when it plans a step ahead: a share of the step it overlaps (measured: the time between
# the last two prepares; before that, the running plan's predicted makespan), at least PLAN_AHEAD_MIN_S and at
# most PREFETCH_TIME_LIMIT_S. On the CPU the solve takes cores the training ranks use (4 ranks on 2 cores: a
# 0.2 s solve per 0.4 s step cost auto 10-35% of its tokens/s), so it gets a small share; beside an accelerator
# the host's cores are mostly idle and the plan only has to be ready when the next step starts.
PREFETCH_TIME_LIMIT_S = 5.0
PLAN_AHEAD_MIN_S = 0.01
PLAN_AHEAD_SHARE = {"cpu": 0.05}
PLAN_AHEAD_SHARE_ACCELERATOR = 0.5
# On the CPU the solve's cores are training's: a solve costs about half its CPU time in step time (4 ranks on 2
# cores), while on batches where one static plan is as good as any (the short and long-tail mixes: plans
# predicted under 1% faster) a search buys nothing. So once PLAN_GAIN_FIRST plans have run and none of the last
# PLAN_GAIN_WINDOW gained PLAN_GAIN_WORTH over the fastest static plan (``Plan.static_makespan_s``), a plan made
# ahead on the CPU only scores the static plans (``plan_step(solver="static")``: ~3.3 ms of CPU for the 8 shapes
# of 4 ranks), within PLAN_AHEAD_CHEAP_S of its own CPU time (``clock="cpu"``: the 10 ms wall budget before this
# used 9-25 ms of the ranks' CPU, or, starved by them, scored one static plan of eight),
# except every PLAN_PROBE_EVERY-th, which gets the full share to notice batches where planning pays again (one
# that gains puts the next PLAN_GAIN_WINDOW back on the full share).
PLAN_GAIN_WORTH = 0.01
PLAN_GAIN_FIRST = 2
PLAN_GAIN_WINDOW = 8
PLAN_PROBE_EVERY = 8
PLAN_AHEAD_CHEAP_S = 0.008
# How long a step waits for the plan made ahead before it plans inline (a stopped worker must not hang rank 0):
# ten times the solve's budget, at least this.
PLAN_WAIT_MIN_S = 60.0
# The budget of a plan asked for before any step ran (nothing to scale): plan_step's own default.
PLAN_AHEAD_FIRST_S = 1.0
# A plan made inside the step (nothing planned ahead) stalls every rank while rank 0 solves: from the second
# step on its budget is this share of the last step, within [PLAN_AHEAD_MIN_S, PLAN_AHEAD_FIRST_S] (a 1 s solve
# in every 0.25 s step of the short mix halved auto's tokens/s on the CPU, bench/train_auto.py).
PLAN_INLINE_SHARE = 0.05
# A broadcast payload starting with this carries rank 0's planning error instead of a plan (JSON never starts so).
_FAILED = b"\x00error:"


class StepRunner:
    """Turns each step's GLOBAL batch into this rank's inputs, with the plan and group it runs.

    Args:
        config: the validated options (group, strategy, linear_strategy, cost_model, ...).
        layout: the resolved token layout (``zigzag`` or ``contiguous``).
        has_linear: whether the model has linear-attention layers (a fixed strategy's step then names
            ``config.linear_strategy``; otherwise None).
        heads / kv_heads: the model's attention head counts when known, to check plan strategies against.
    """

    def __init__(self, config: SPConfig, *, layout: str, has_linear: bool, heads: int | None = None,
                 kv_heads: int | None = None) -> None:
        self.config = config
        self.group, self.rank, self.world_size = comm.group_info(config.sp_group)
        self.dp_group = config.dp_group
        self.layout = layout
        self.has_linear = has_linear
        self.heads, self.kv_heads = heads, kv_heads
        self._prefetcher = None  # rank 0's PlanPrefetcher, started by the first plan_ahead
        self._ahead: tuple[int, ...] | None = None  # the lengths it is planning for
        self._ahead_key = 0
        # what the planning budget scales with: when the last step started, how long the one before took, the
        # running plan's predicted makespan, and the device the steps compute on
        self._step_started: float | None = None
        self._step_seconds: float | None = None
        self._predicted_s: float | None = None
        self._device_type = "cpu"
        self._gains: deque[float] = deque(maxlen=PLAN_GAIN_WINDOW)  # recent plans' gains over static plans
        # rank 0, for tests and logs: steps whose plan came from plan_ahead, the last plan_ahead's budget, and how
        # long the last step waited for its prefetched plan (0 when it was ready: planning off the critical path)
        self.plans_from_ahead = 0
        self.last_plan_budget_s: float | None = None
        self.last_plan_wait_s = 0.0

    def plan_ahead(self, seq_lens: Sequence[int], *, time_limit_s: float | None = None) -> None:
        """Start planning a coming step whose sequences have ``seq_lens`` (``strategy="auto"`` only; rank 0 plans
        in the background while the current step trains, the others do nothing). The next ``prepare`` whose
        batch has exactly these lengths uses that plan; any other batch is planned inline as usual.

        ``time_limit_s``: the solve's budget; None (default) scales it with the step it overlaps
        (``plan_ahead_options``), so the plan is ready when the next step starts and, on the CPU, the solve takes
        little from the cores training uses (and, while planning gains nothing over static plans, only the static
        plans are scored).

        Raises:
            ValueError: ``time_limit_s`` not None or a positive number.
        """
        if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                         or time_limit_s <= 0):
            raise ValueError(f"time_limit_s: expected None or a positive number of seconds, got {time_limit_s!r}")
        if self.config.strategy != "auto" or self.rank != 0:
            return
        from seqpar.solver import PlanPrefetcher
        from seqpar.solver.prefetch import WorkerExited

        if self._prefetcher is None:
            # a child process (PlanPrefetcher's docstring: a solver thread would hold the GIL this rank's training
            # thread needs between operators)
            self._prefetcher = PlanPrefetcher(self.config.cost_model)
        if self._ahead is not None:  # superseded before it was used: drop it
            self._prefetcher.discard(self._ahead_key)
        self._ahead_key += 1
        self._ahead = tuple(int(n) for n in seq_lens)
        options = self.plan_ahead_options() if time_limit_s is None else {"time_limit_s": float(time_limit_s)}
        self.last_plan_budget_s = options["time_limit_s"]
        try:
            self._prefetcher.submit(self._ahead_key, list(self._ahead), cost_model=self.config.cost_model, **options)
        except WorkerExited:  # the worker died since the last step (killed?): start another
            self._prefetcher.close()
            self._prefetcher = PlanPrefetcher(self.config.cost_model)
            self._prefetcher.submit(self._ahead_key, list(self._ahead), cost_model=self.config.cost_model, **options)

    def plan_ahead_options(self) -> dict[str, Any]:
        """``plan_step``'s options for the next plan made ahead: ``time_limit_s`` (``plan_ahead_budget``), and,
        when that is the cheap budget (on the CPU, recent plans gained nothing over the static plans),
        ``solver="static"`` (only those are scored) with ``clock="cpu"`` (CPU seconds: a worker starved by the
        ranks still scores them all)."""
        options: dict[str, Any] = {"time_limit_s": self.plan_ahead_budget()}
        if self._cheap_plan_due():
            options.update(solver="static", clock="cpu")
        return options

    def _cheap_plan_due(self) -> bool:
        """Whether the plan being asked for gets ``PLAN_AHEAD_CHEAP_S``: a step has run, planning pays little and
        it is not a probe (every ``PLAN_PROBE_EVERY``-th)."""
        return ((self._step_seconds is not None or self._predicted_s is not None) and self.planning_pays_little()
                and self._ahead_key % PLAN_PROBE_EVERY != 0)

    def plan_ahead_budget(self) -> float:
        """The budget of a plan made a step ahead: a share of the step it overlaps (``PLAN_AHEAD_SHARE`` of the
        device type, else ``PLAN_AHEAD_SHARE_ACCELERATOR``) of the last step's measured time (between the last two
        ``prepare`` calls; before a second one, the running plan's predicted makespan), within
        ``[PLAN_AHEAD_MIN_S, PREFETCH_TIME_LIMIT_S]``; ``PLAN_AHEAD_FIRST_S`` before any step. On the CPU,
        ``PLAN_AHEAD_CHEAP_S`` while recent plans gained under ``PLAN_GAIN_WORTH`` over the fastest static plan
        (the constants' comment: the solve's CPU is training's there; CPU seconds, ``plan_ahead_options``), but for
        every ``PLAN_PROBE_EVERY``-th."""
        step_s = self._step_seconds if self._step_seconds is not None else self._predicted_s
        if step_s is None:
            return PLAN_AHEAD_FIRST_S
        if self._cheap_plan_due():
            return PLAN_AHEAD_CHEAP_S
        share = PLAN_AHEAD_SHARE.get(self._device_type, PLAN_AHEAD_SHARE_ACCELERATOR)
        return min(max(share * step_s, PLAN_AHEAD_MIN_S), PREFETCH_TIME_LIMIT_S)

    def planning_pays_little(self) -> bool:
        """On the CPU (``PLAN_AHEAD_SHARE``'s devices), whether ``PLAN_GAIN_FIRST`` plans have run and none of
        the last ``PLAN_GAIN_WINDOW`` was predicted ``PLAN_GAIN_WORTH`` faster than the fastest static plan of its
        step."""
        return (self._device_type in PLAN_AHEAD_SHARE and len(self._gains) >= PLAN_GAIN_FIRST
                and max(self._gains) < PLAN_GAIN_WORTH)

    def inline_budget(self) -> float:
        """The budget of a plan made inside the step (none was planned ahead for its lengths):
        ``PLAN_INLINE_SHARE`` of the last step's measured time within ``[PLAN_AHEAD_MIN_S, PLAN_AHEAD_FIRST_S]``;
        ``PLAN_AHEAD_FIRST_S`` before two steps have run."""
        if self._step_seconds is None:
            return PLAN_AHEAD_FIRST_S
        return min(max(PLAN_INLINE_SHARE * self._step_seconds, PLAN_AHEAD_MIN_S), PLAN_AHEAD_FIRST_S)

    def _planned_ahead(self, seq_lens: Sequence[int]) -> Any:
        """Rank 0: the prefetched plan for these lengths (waiting for it), or None when none was asked for them."""
        if self._ahead is None or self._ahead != tuple(int(n) for n in seq_lens):
            return None
        from seqpar.solver.prefetch import WorkerExited

        self._ahead = None
        waited = time.perf_counter()
        try:
            plan = self._prefetcher.get(self._ahead_key, timeout=max(PLAN_WAIT_MIN_S, 10 * self.last_plan_budget_s))
        except (WorkerExited, TimeoutError) as err:  # plan this step inline; the next plan_ahead starts a worker
            warnings.warn(f"seqpar: the plan made ahead for this step is lost ({err}); planning it inline",
                          RuntimeWarning, stacklevel=2)
            self._prefetcher.close()
            self._prefetcher = None
            return None
        finally:
            self.last_plan_wait_s = time.perf_counter() - waited
        self.plans_from_ahead += 1
        return plan

    def _mark_step(self, device: torch.device) -> None:
        """A step starts (``prepare``): the time since the last one is the last step's duration."""
        now = time.perf_counter()
        if self._step_started is not None:
            self._step_seconds = now - self._step_started
        self._step_started = now
        self._device_type = device.type

    def fixed_step(self, softmax_strategy: str | None = None) -> StepShard:
        """A step on the whole group with the configured strategies (or ``softmax_strategy``)."""
        linear = self.config.linear_strategy if self.has_linear else None
        return StepShard(self.group, tuple(range(self.world_size)), softmax_strategy or self.config.strategy,
                         linear, None)

    def prepare(self, batch: Any, *, plan: Any = None,
                max_tokens_per_rank: int | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """This rank's inputs for a GLOBAL batch (identical on every rank of the replica); see ``SPModel.prepare``."""
        if max_tokens_per_rank is not None and (
                isinstance(max_tokens_per_rank, bool) or not isinstance(max_tokens_per_rank, int)
                or max_tokens_per_rank < 1):
            raise ValueError(f"max_tokens_per_rank: expected a positive int or None, got {max_tokens_per_rank!r}")
        sequences, labels, padded_batch = split_batch(batch)
        device = sequences[0].device
        self._mark_step(device)
        if plan is None and self.config.strategy != "auto":
            step = self.fixed_step()
            groups = [(step.group_ranks, list(range(len(sequences))))]
        else:
            plan = self.agree_on_plan([int(s.numel()) for s in sequences], plan)
            self._predicted_s = plan.makespan_s
            if plan.static_makespan_s is not None and plan.makespan_s > 0:
                self._gains.append(plan.static_makespan_s / plan.makespan_s - 1.0)
            mine = next(g for g in plan.groups if self.rank in g.ranks)  # check_plan: exactly one
            step = StepShard(self.group_for(mine.ranks), tuple(mine.ranks), mine.softmax_strategy,
                             mine.linear_strategy, None, plan)
            groups = [(tuple(g.ranks), list(g.seq_indices)) for g in plan.groups]
            padded_batch = False
        # a plan may run a group's sequences as several packed calls (its micro-batches: the packed call of
        # all of them would not fit in memory); without one, a group runs one call
        planned_calls = ({tuple(g.ranks): g.calls() for g in plan.groups} if plan is not None
                         and plan.num_micro_batches > 1 else None)
        if max_tokens_per_rank is None and planned_calls is None:
            chosen = next(indices for ranks, indices in groups if self.rank in ranks)
            return self._pack(sequences, labels, chosen, step, padded_batch, device)

        if max_tokens_per_rank is None:
            splits = planned_calls
        else:
            splits = {ranks: [mb for call in (planned_calls[ranks] if planned_calls else [indices])
                              for mb in self._split(sequences, call, len(ranks), max_tokens_per_rank)]
                      for ranks, indices in groups}
        count = max(len(s) for s in splits.values())
        normalizer = torch.stack([(shift_labels(lab) != IGNORE_INDEX).sum() for lab in labels]).sum()
        normalizer = normalizer.to(torch.float64)
        if self.dp_group is not None:  # replicas split differently: all run the most micro-batches of any
            # one small all-gather; the micro-batch count must reach the host (it sizes the returned list): the
            # only host sync of prepare, once per step
            gathered = comm.all_gather(torch.stack([normalizer, normalizer.new_tensor(count)]), group=self.dp_group)
            normalizer, count = gathered[:, 0].sum(), int(gathered[:, 1].max().item())
        mine = next(s for ranks, s in splits.items() if self.rank in ranks)
        return [
            self._pack(sequences, labels, mine[k] if k < len(mine) else [],
                       replace(step, loss_normalizer=normalizer, micro_batch=(k, count)), padded_batch, device)
            for k in range(count)
        ]

    def _pack(self, sequences, labels, chosen: Sequence[int], step: StepShard, padded_batch: bool,
              device: torch.device) -> dict[str, Any]:
        if padded_batch and chosen:
            return pack_padded([sequences[i] for i in chosen], [labels[i] for i in chosen], layout=self.layout,
                               step=step)
        return pack_sequences(sequences, labels, chosen, layout=self.layout, step=step, device=device)

    def _split(self, sequences: Sequence[torch.Tensor], indices: Sequence[int], group_size: int,
               max_tokens_per_rank: int) -> list[list[int]]:
        """``indices`` in order, cut greedily into micro-batches of at most ``max_tokens_per_rank`` tokens per
        rank of a group of ``group_size`` (each sequence padded to the layout's multiple, as packing does)."""
        multiple = layout_multiple(self.layout, group_size)
        micro_batches: list[list[int]] = []
        load = max_tokens_per_rank
        for i in indices:
            per_rank = math.ceil(int(sequences[i].numel()) / multiple) * multiple // group_size
            if per_rank > max_tokens_per_rank:
                raise ValueError(
                    f"max_tokens_per_rank: sequence {i} ({sequences[i].numel()} tokens) puts {per_rank} tokens on "
                    f"each of its {group_size} ranks, over the budget of {max_tokens_per_rank}; raise the budget "
                    "or split the sequence over more ranks"
                )
            if load + per_rank > max_tokens_per_rank:
                micro_batches.append([])
                load = 0
            micro_batches[-1].append(i)
            load += per_rank
        return micro_batches

    def agree_on_plan(self, seq_lens: Sequence[int], plan: Any = None) -> Any:
        """The plan every rank runs this step: ``plan`` (or, when None, ``plan_step`` with the config's cost
        model) as rank 0 has it, broadcast to the group and checked (``check_plan``) on every rank."""
        from seqpar.solver import Plan, plan_step

        if plan is not None and not isinstance(plan, Plan):
            raise ValueError(f"plan: expected a seqpar.solver.Plan, got {type(plan).__name__}")
        payload = None
        if self.rank == 0:
            try:
                chosen = plan if plan is not None else self._planned_ahead(seq_lens)
                if chosen is None:
                    chosen = plan_step(list(seq_lens), self.config.cost_model, time_limit_s=self.inline_budget())
                payload = chosen.to_json().encode()
            except Exception as err:  # tell the other ranks, which wait in the broadcast, instead of hanging them
                payload = _FAILED + (str(err) if isinstance(err, ValueError) else
                                     f"plan: planning failed on rank 0: {type(err).__name__}: {err}").encode()
        payload = comm.broadcast_bytes(payload, src=0, group=self.group)
        if payload.startswith(_FAILED):
            raise ValueError(payload[len(_FAILED):].decode())
        agreed = Plan.from_json(payload)
        check_plan(agreed, world_size=self.world_size, num_sequences=len(seq_lens), heads=self.heads,
                   kv_heads=self.kv_heads)
        return agreed

    def group_for(self, ranks: Sequence[int]) -> dist.ProcessGroup:
        """The process group of ``ranks`` (ranks of the parent group), created once and cached."""
        return subgroup(self.group, tuple(ranks))


def check_plan(plan: Any, *, world_size: int, num_sequences: int, heads: int | None = None,
               kv_heads: int | None = None) -> None:
    """Check that ``plan`` can run: its groups partition ranks ``0..world_size-1``, every sequence is in one
    group, and each group's strategies are registered, of the right kind and valid at its size.

    Raises:
        ValueError: ``plan: ...`` naming the group and what is wrong.
    """
    seen_ranks: set[int] = set()
    seen_seqs: list[int] = []
    for gi, g in enumerate(plan.groups):
        ranks = list(g.ranks)
        if not ranks or ranks != sorted(set(ranks)) or ranks[0] < 0 or ranks[-1] >= world_size:
            raise ValueError(f"plan: group {gi} ranks {ranks} must be distinct, ascending and in [0, {world_size})")
        if seen_ranks & set(ranks):
            raise ValueError(f"plan: group {gi} shares ranks {sorted(seen_ranks & set(ranks))} with another group")
        seen_ranks |= set(ranks)
        seen_seqs += list(g.seq_indices)
        micro = getattr(g, "micro_batches", None)
        if micro is not None and (any(not m for m in micro)
                                  or sorted(i for m in micro for i in m) != sorted(g.seq_indices)):
            raise ValueError(f"plan: group {gi} micro_batches {micro} must partition its sequences {g.seq_indices}")
        for name, kind in ((g.softmax_strategy, "softmax"), (g.linear_strategy, "linear")):
            if name is None:
                continue
            strategy = strategies.get(name, kind, argument="plan")
            reason = None
            if heads is not None:
                reason = strategy.invalid_reason(len(ranks), heads, kv_heads or heads)
            if reason is not None:
                raise ValueError(f"plan: group {gi} ({len(ranks)} ranks) cannot run {name!r}: {reason}")
    if seen_ranks != set(range(world_size)):
        raise ValueError(f"plan: ranks {sorted(set(range(world_size)) - seen_ranks)} are in no group")
    if sorted(seen_seqs) != list(range(num_sequences)):
        raise ValueError(f"plan: every sequence 0..{num_sequences - 1} must be in exactly one group, got {seen_seqs}")
