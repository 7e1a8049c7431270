"""``SPConfig``: every option of ``parallelize`` in one typed, validated, frozen value."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch.distributed as dist

from seqpar import strategies

__all__ = ["LAYOUTS", "SPConfig"]

LAYOUTS = ("auto", "zigzag", "contiguous")


@dataclass(frozen=True)
class SPConfig:
    """How ``seqpar.parallelize`` runs a model.

    Attributes:
        group: the ranks that share each sequence (None: the world).
        strategy: a registered softmax strategy (``seqpar.strategies.names("softmax")``: ring, token_ring,
            ulysses, allgather_kv, ...) or ``"auto"``: rank 0 plans every step with ``seqpar.solver.plan_step``
            (groups of different sizes and strategies; needs a power-of-two world) and every rank runs rank 0's
            plan.
        linear_strategy: a registered linear strategy (``names("linear")``: zeco, lasp2) for linear-attention
            layers when ``strategy`` is fixed (an ``"auto"`` plan names its own per group).
        layout: ``"zigzag"``, ``"contiguous"`` or ``"auto"`` (zigzag; contiguous when the model has
            linear-attention layers, whose state flows left to right).
        backend: kernel backend of the attention blocks (``"auto"``: the best available).
        cost_model: a ``seqpar.solver.CostModel`` for ``strategy="auto"`` (None: one from the model's config
            for a generic cluster of this world size).
        check_consistency: whether every SP op of the wrapped model's forwards first checks that the group's
            ranks pass the same shapes, dtypes, options and small whole-held inputs, raising on every rank naming
            what differs (one 32-byte all-gather per op call; ``seqpar.collectives.comm.agreement``). None: the
            process default, on unless ``SEQPAR_CHECK_AGREEMENT=0``; True / False: forced for these forwards only
            (the process-wide setting is left as it was).
        verify_model: at ``parallelize`` time, run the model once on a short random batch unsharded and through
            the SP path and refuse it (ValueError naming the module) if a module seqpar does not route mixes
            tokens along the sequence; costs one unsharded and one SP forward of that batch.
    """

    group: dist.ProcessGroup | None = None
    strategy: str = "ring"
    linear_strategy: str = "zeco"
    layout: str = "auto"
    backend: str = "auto"
    cost_model: Any = None
    check_consistency: bool | None = None
    verify_model: bool = True

    def validate(self) -> SPConfig:
        """Check every field; returns self.

        Raises:
            ValueError: naming the field (``strategy: ...``, ``layout: ...``) and the values it accepts.
        """
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise ValueError(
                f"group: expected a torch.distributed ProcessGroup or None, got {type(self.group).__name__}"
            )
        if self.strategy != "auto":
            strategies.get(self.strategy, "softmax", argument="strategy")  # raises naming the registered ones
        strategies.get(self.linear_strategy, "linear", argument="linear_strategy")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: unknown layout {self.layout!r}; use 'auto', 'zigzag' or 'contiguous'")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend: expected a backend name such as 'auto', got {self.backend!r}")
        if self.cost_model is not None and self.strategy != "auto":
            raise ValueError(
                f"cost_model: only strategy='auto' plans with a cost model; strategy={self.strategy!r} is fixed"
            )
        if self.check_consistency is not None and not isinstance(self.check_consistency, bool):
            raise ValueError(f"check_consistency: expected True, False or None, got {self.check_consistency!r}")
        if not isinstance(self.verify_model, bool):
            raise ValueError(f"verify_model: expected True or False, got {self.verify_model!r}")
        return self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
