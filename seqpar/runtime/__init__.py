"""The runtime layer between ``parallelize`` (the model-facing wrapper) and the SP ops.

    config.py    SPConfig: the options, typed and validated
    packing.py   a GLOBAL batch -> one rank's inputs (label shift, padding, sharding, positions, cu_seqlens)
    steps.py     StepRunner: the plan each step runs (rank 0 plans, broadcast), its process groups (cached)
    context.py   SPContext: what the attention calls of the current forward run; softmax_attention /
                 linear_attention, which integrations and adapters call, resolve ops through the strategy
                 registry (seqpar.strategies)
    probe.py     verify_model: refuse models with sequence-mixing modules seqpar does not route
"""

from seqpar.runtime.config import SPConfig
from seqpar.runtime.context import (
    SPContext,
    bind_to_backward,
    causal_conv1d,
    current_context,
    delta_rule_attention,
    in_sp_step,
    linear_attention,
    softmax_attention,
    sp_context,
)
from seqpar.runtime.packing import IGNORE_INDEX, StepShard, shift_labels, split_batch
from seqpar.runtime.probe import verify_model
from seqpar.runtime.steps import StepRunner, check_plan

__all__ = [
    "IGNORE_INDEX",
    "SPConfig",
    "SPContext",
    "bind_to_backward",
    "causal_conv1d",
    "delta_rule_attention",
    "in_sp_step",
    "StepRunner",
    "StepShard",
    "check_plan",
    "current_context",
    "linear_attention",
    "shift_labels",
    "softmax_attention",
    "sp_context",
    "split_batch",
    "verify_model",
]
