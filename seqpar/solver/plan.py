"""What the planner returns: SP groups, the sequences each one runs, and the predicted step time.

A ``Plan`` is plain data so that rank 0 can solve it and broadcast ``to_json()`` bytes; ``from_json`` gives
back an equal ``Plan`` (floats survive JSON exactly: ``json`` writes ``repr``, which round-trips).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

from seqpar import strategies as registry
from seqpar.solver.cost_model import CostModel, is_power_of_two

__all__ = ["Group", "Plan", "SOLVER_STATUSES"]

SOLVER_STATUSES = ("optimal", "feasible", "greedy", "static")
_JSON_VERSION = 3  # 3: groups carry micro_batches (2 is read as one call per group)


@dataclass
class Group:
    """One SP group: its ``ranks`` (ascending), the SP strategy its softmax-attention layers run and the one its
    linear-attention layers run (None for a layer kind the model does not have), the sequences it runs (indices
    into the step's ``seq_lens``, ascending) and their ``predicted_time_s`` (``CostModel.group_time``).

    ``micro_batches``: None when the group runs all its sequences as one packed call; otherwise the packed
    calls it runs one after another (lists of sequence indices partitioning ``seq_indices``), because the
    packed call of all of them would not fit in memory.
    """

    ranks: tuple[int, ...]
    softmax_strategy: str | None
    linear_strategy: str | None
    seq_indices: list[int]
    predicted_time_s: float
    micro_batches: list[list[int]] | None = None

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def calls(self) -> list[list[int]]:
        """The packed calls the group runs, in order (one: all its sequences)."""
        return [list(self.seq_indices)] if self.micro_batches is None else [list(m) for m in self.micro_batches]

    @property
    def strategy(self) -> str:
        """The cost model's name of the pair: ``"ring"``, ``"zeco"`` or ``"ring+zeco"``."""
        return "+".join(s for s in (self.softmax_strategy, self.linear_strategy) if s)


@dataclass
class Plan:
    """One step's split of the world into SP groups.

    Attributes:
        groups: disjoint groups covering every rank, largest first (power-of-two sizes; the world need not be
            a power of two: 6 ranks = 4 + 2).
        makespan_s: the step's predicted time, ``CostModel.step_time`` of the groups: the slowest group's
            ``predicted_time_s``, or less on ranks that share cores (``Cluster.cores_per_node``).
        solver_status: ``"optimal"`` (proved optimal under the packed cost model: by the exact search on
            small instances, or by meeting the lower bound), ``"feasible"`` (anything else the planner found,
            MILP plans included: the MILP optimises an additive surrogate of the packed model, see
            ``planner``),
            ``"greedy"`` (no MILP solution: CBC missing, timed out or asked not to run; ``note`` says
            which), ``"static"`` (built by ``static_plan``).
        note: how the plan was chosen (human readable).
        bucket_cost_ratio: largest ratio, over the MILP's length buckets and group shapes, of the bucket's
            longest sequence's time to its shortest's; 1.0 when every distinct length had its own bucket (or
            no MILP ran). Informational: the MILP's surrogate is bucketed, the plan is scored on true lengths.
        static_makespan_s: the predicted step time of the fastest static plan (one degree and strategy for
            every group, sequences by LPT, as ``static_plan``) that ``plan_step`` scored for this step, so
            ``static_makespan_s / makespan_s - 1`` is what planning gained over it; None for a plan that
            ``plan_step`` did not make.
    """

    groups: list[Group]
    makespan_s: float
    solver_status: str
    note: str = ""
    bucket_cost_ratio: float = 1.0
    static_makespan_s: float | None = None

    @property
    def num_micro_batches(self) -> int:
        """The most packed calls any group runs (the runtime runs this many micro-batches on every rank)."""
        return max((len(g.calls()) for g in self.groups), default=1)

    @property
    def proven_optimal(self) -> bool:
        """True when the planner proved the plan optimal under the packed cost model."""
        return self.solver_status == "optimal"

    def group_of_sequence(self) -> dict[int, int]:
        """Sequence index -> index in ``groups``."""
        return {i: g for g, group in enumerate(self.groups) for i in group.seq_indices}

    def to_json(self) -> str:
        """The plan as a JSON string; ``Plan.from_json(plan.to_json()) == plan``."""
        payload = {"version": _JSON_VERSION, **asdict(self)}
        return json.dumps(payload, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse ``to_json`` output (str or UTF-8 bytes). Raises ValueError on anything else."""
        try:
            payload = json.loads(text)
            if payload.pop("version") not in (2, _JSON_VERSION):
                raise ValueError("unsupported plan version")
            groups = [Group(tuple(int(r) for r in g["ranks"]), _optional_str(g["softmax_strategy"]),
                            _optional_str(g["linear_strategy"]), [int(i) for i in g["seq_indices"]],
                            float(g["predicted_time_s"]),
                            None if g.get("micro_batches") is None
                            else [[int(i) for i in m] for m in g["micro_batches"]])
                      for g in payload.pop("groups")]
            return cls(groups=groups, makespan_s=float(payload["makespan_s"]),
                       solver_status=str(payload["solver_status"]), note=str(payload["note"]),
                       bucket_cost_ratio=float(payload["bucket_cost_ratio"]),
                       static_makespan_s=None if payload.get("static_makespan_s") is None
                       else float(payload["static_makespan_s"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(f"text is not a Plan.to_json() document: {err}") from err

    def validate(self, seq_lens: Sequence[int], cost_model: CostModel, *, rel_tol: float = 1e-9) -> None:
        """Check the plan against the step's lengths and the cost model; raise ValueError on the first problem.

        Checks: groups disjoint and covering ranks 0..world_size-1; power-of-two sizes; a group never
        straddles a node boundary unless it is made of whole nodes; each group's ``softmax_strategy`` a
        registered softmax strategy exactly when the model has softmax layers (else None), its
        ``linear_strategy`` likewise for linear layers, both valid at the group's degree;
        every sequence in exactly one group; each group's micro-batches (if any) partition its sequences; every
        packed call's memory per rank (``CostModel.call_memory``) within ``mem_bytes``; ``predicted_time_s``
        (``CostModel.group_time`` with the group's micro-batches) and ``makespan_s`` (``CostModel.step_time``)
        equal to the cost model's within ``rel_tol``.
        """
        cluster = cost_model.cluster
        world, per_node = cluster.world_size, cluster.gpus_per_node
        seen_ranks: set[int] = set()
        seen_seqs: set[int] = set()
        # structure first: ranks, placement, strategies, which sequences go where
        for gi, g in enumerate(self.groups):
            ranks = list(g.ranks)
            if not ranks or not is_power_of_two(len(ranks)):
                raise ValueError(f"group {gi} has {len(ranks)} ranks; SP groups must have a power-of-two size")
            if ranks != sorted(set(ranks)) or ranks[0] < 0 or ranks[-1] >= world:
                raise ValueError(f"group {gi} ranks {ranks} must be distinct, ascending and in [0, {world})")
            if seen_ranks & set(ranks):
                raise ValueError(f"group {gi} shares ranks {sorted(seen_ranks & set(ranks))} with another group")
            seen_ranks |= set(ranks)
            nodes = {r // per_node for r in ranks}
            if len(nodes) > 1 and not all(set(range(n * per_node, (n + 1) * per_node)) <= set(ranks) for n in nodes):
                raise ValueError(f"group {gi} ranks {ranks} straddle a node boundary without covering whole nodes")
            _check_pair(gi, g, cost_model)
            why = cost_model.why_invalid(len(ranks), g.strategy)
            if why is not None:
                raise ValueError(f"group {gi}: strategy {g.strategy!r} cannot run at degree {len(ranks)}: {why}")
            for i in g.seq_indices:
                if not 0 <= i < len(seq_lens):
                    raise ValueError(f"group {gi} names sequence {i}, but there are {len(seq_lens)}")
                if i in seen_seqs:
                    raise ValueError(f"sequence {i} is in more than one group")
                seen_seqs.add(i)
        if seen_ranks != set(range(world)):
            raise ValueError(f"groups leave ranks {sorted(set(range(world)) - seen_ranks)} out")
        if seen_seqs != set(range(len(seq_lens))):
            raise ValueError(f"sequences {sorted(set(range(len(seq_lens))) - seen_seqs)} are in no group")
        # then memory and times, against the cost model: each packed call (micro-batch) must fit
        for gi, g in enumerate(self.groups):
            if g.micro_batches is not None and sorted(i for m in g.micro_batches for i in m) != sorted(g.seq_indices):
                raise ValueError(f"group {gi} micro_batches {g.micro_batches} do not partition its sequences")
            if g.micro_batches is not None and any(not m for m in g.micro_batches):
                raise ValueError(f"group {gi} has an empty micro-batch")
            for call in g.calls():
                if not call:
                    continue
                mem = cost_model.call_memory([seq_lens[i] for i in call], len(g.ranks), g.strategy)
                if mem > cluster.mem_bytes:
                    raise ValueError(
                        f"group {gi} (degree {len(g.ranks)}, {g.strategy}) packs sequences {call} into one call "
                        f"that needs {mem:.4g} bytes per rank, more than mem_bytes={cluster.mem_bytes:.4g}"
                    )
            lengths = [seq_lens[i] for i in g.seq_indices]
            position = {i: k for k, i in enumerate(g.seq_indices)}
            calls = None if g.micro_batches is None else [[position[i] for i in m] for m in g.micro_batches]
            expected = cost_model.group_time(lengths, len(g.ranks), g.strategy, micro_batches=calls)
            if not math.isclose(g.predicted_time_s, expected, rel_tol=rel_tol, abs_tol=0.0):
                raise ValueError(f"group {gi} predicted_time_s={g.predicted_time_s!r}, cost model says {expected!r}")
        step = cost_model.step_time((g.ranks, g.predicted_time_s) for g in self.groups)
        if not math.isclose(self.makespan_s, step, rel_tol=rel_tol, abs_tol=0.0):
            raise ValueError(f"makespan_s={self.makespan_s!r} but the cost model's step time is {step!r}")
        if self.solver_status not in SOLVER_STATUSES:
            raise ValueError(f"solver_status={self.solver_status!r} is not one of {SOLVER_STATUSES}")


def _check_pair(gi: int, group: Group, cost_model: CostModel) -> None:
    """Each of the group's two strategies: registered, of its kind, and set exactly when the model has that kind."""
    layer_kinds = set(cost_model.model.layer_kinds)
    for kind, name in (("softmax", group.softmax_strategy), ("linear", group.linear_strategy)):
        field = f"group {gi} {kind}_strategy"
        if kind not in layer_kinds:
            if name is not None:
                raise ValueError(f"{field}={name!r}, but the model has no {kind} attention layers; it must be None")
            continue
        if name is None:
            raise ValueError(f"{field} is None, but the model has {kind} attention layers; name the strategy they run")
        registry.get(name, kind, argument=field)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)
