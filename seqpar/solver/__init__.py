"""Heterogeneity-adaptive SP solver: cost model, MILP planner, per-step plans. Pure Python (numpy, PuLP).

Never imports torch or torch.distributed: rank 0 plans, the runtime broadcasts ``Plan.to_json()``.
"""

from seqpar import strategies as _registry
from seqpar.solver.cost_model import (
    Cluster,
    CostCoefficients,
    CostModel,
    Measurement,
    ModelSpec,
)
from seqpar.solver.plan import Group, Plan
from seqpar.solver.planner import (
    StaticPlanMeasurement,
    calibrate_static_scales,
    makespan_lower_bound,
    plan_step,
    static_plan,
)
from seqpar.solver.prefetch import PlanPrefetcher



def __getattr__(name: str) -> tuple[str, ...]:
    # SOFTMAX_STRATEGIES / LINEAR_STRATEGIES: the registered names of each kind, read when asked
    if name in ("SOFTMAX_STRATEGIES", "LINEAR_STRATEGIES"):
        return _registry.names(name.split("_")[0].lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "StaticPlanMeasurement",
    "calibrate_static_scales",
    "PlanPrefetcher",
]
