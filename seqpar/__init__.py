"""seqpar: sequence-parallel runtime for long-context training with PyTorch.

Public names are imported on first use, so that ``import seqpar.solver`` (pure Python) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # layouts and accounting
    "CommStats": "seqpar.collectives.comm",
    "count_comm": "seqpar.collectives.comm",
    "PaddedSequence": "seqpar.collectives.layout",
    "local_positions": "seqpar.collectives.layout",
    "pad_for_layout": "seqpar.collectives.layout",
    "shard_sequence": "seqpar.collectives.layout",
    "unshard_sequence": "seqpar.collectives.layout",
    # softmax-attention SP
    "ring_attention": "seqpar.collectives.ring",
    "token_ring_attention": "seqpar.collectives.token_ring",
    "ulysses_attention": "seqpar.collectives.ulysses",
    "allgather_kv_attention": "seqpar.collectives.allgather_kv",
    "usp_attention": "seqpar.collectives.usp",
    # linear-attention SP
    "lasp2_linear_attention": "seqpar.collectives.lasp2",
    "zeco_linear_attention": "seqpar.collectives.zeco",
    "all_scan": "seqpar.collectives.scan",
    "lasp2_delta_rule": "seqpar.collectives.delta_rule",
    "zeco_delta_rule": "seqpar.collectives.delta_rule",
    "causal_conv1d": "seqpar.collectives.halo",
    "halo_exchange": "seqpar.collectives.halo",
    # the wrapper and its runtime
    "parallelize": "seqpar.wrapper",
    "SPConfig": "seqpar.runtime",
    "SPModel": "seqpar.wrapper",
    "SPOutput": "seqpar.wrapper",
    "register_adapter": "seqpar.integrations",
    # the planner
    "Cluster": "seqpar.solver",
    "ModelSpec": "seqpar.solver",
    "CostModel": "seqpar.solver",
    "Plan": "seqpar.solver",
    "Group": "seqpar.solver",
    "plan_step": "seqpar.solver",
    "static_plan": "seqpar.solver",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'seqpar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # static analysers see the real names; keep in step with _EXPORTS
    from seqpar.collectives.allgather_kv import allgather_kv_attention
    from seqpar.collectives.comm import CommStats, count_comm
    from seqpar.collectives.delta_rule import lasp2_delta_rule, zeco_delta_rule
    from seqpar.collectives.halo import causal_conv1d, halo_exchange
    from seqpar.collectives.lasp2 import lasp2_linear_attention
    from seqpar.collectives.layout import (
        PaddedSequence,
        local_positions,
        pad_for_layout,
        shard_sequence,
        unshard_sequence,
    )
    from seqpar.collectives.ring import ring_attention
    from seqpar.collectives.scan import all_scan
    from seqpar.collectives.token_ring import token_ring_attention
    from seqpar.collectives.ulysses import ulysses_attention
    from seqpar.collectives.usp import usp_attention
    from seqpar.collectives.zeco import zeco_linear_attention
    from seqpar.integrations import register_adapter
    from seqpar.runtime import SPConfig
    from seqpar.solver import Cluster, CostModel, Group, ModelSpec, Plan, plan_step, static_plan
    from seqpar.wrapper import SPModel, SPOutput, parallelize
