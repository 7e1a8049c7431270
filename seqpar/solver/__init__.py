"""Heterogeneity-adaptive SP solver: cost model, MILP planner, per-step plans. Pure Python (numpy, PuLP).

Never imports torch or torch.distributed: rank 0 plans, the runtime broadcasts ``Plan.to_json()``.
"""

from seqpar.solver.cost_model import (
    LINEAR_STRATEGIES,
    SOFTMAX_STRATEGIES,
    Cluster,
    CostCoefficients,
    CostModel,
    Measurement,
    ModelSpec,
)
from seqpar.solver.plan import Group, Plan
from seqpar.solver.planner import makespan_lower_bound, plan_step, static_plan
from seqpar.solver.prefetch import PlanPrefetcher

__all__ = [
    "Cluster",
    "ModelSpec",
    "CostCoefficients",
    "CostModel",
    "Measurement",
    "SOFTMAX_STRATEGIES",
    "LINEAR_STRATEGIES",
    "Group",
    "Plan",
    "plan_step",
    "static_plan",
    "makespan_lower_bound",
    "PlanPrefetcher",
]
