"""``SPConfig``: every option of ``parallelize`` in one typed, validated, frozen value."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from seqpar import strategies

__all__ = ["LAYOUTS", "SPConfig"]

LAYOUTS = ("auto", "zigzag", "contiguous")


@dataclass(frozen=True)
class SPConfig:
    """How ``seqpar.parallelize`` runs a model.

    Attributes:
        group: the ranks that share each sequence (None: the world). Exclusive with ``mesh``.
        mesh: a ``DeviceMesh`` with dimensions named ``("dp", "sp")`` (or a 1-D mesh named ``"sp"``): each
            data-parallel replica (a row along ``dp``) feeds its own global batch through its ``sp`` ranks; the
            loss is the token mean over all replicas and gradients are summed over the whole mesh.
        strategy: a registered softmax strategy (``seqpar.strategies.names("softmax")``: ring, token_ring,
            ulysses, allgather_kv, ...) or ``"auto"``: rank 0 plans every step with ``seqpar.solver.plan_step``
            (power-of-two groups of different sizes and strategies, any world: 3 ranks = 2 + 1) and every rank
            runs rank 0's plan.
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
        grad_bucket_bytes: ``SPModel.sync_gradients`` reduces gradients in buckets of at most this many bytes
            (a larger single gradient is reduced in place, without a copy), so its extra memory is one bucket.
        overlap_grad_sync: start each bucket's all-reduce from backward hooks as soon as its gradients are
            ready; ``sync_gradients()`` then only waits for them (and reduces what no hook started).
    """

    group: dist.ProcessGroup | None = None
    strategy: str = "ring"
    linear_strategy: str = "zeco"
    layout: str = "auto"
    backend: str = "auto"
    cost_model: Any = None
    check_consistency: bool | None = None
    verify_model: bool = True
    mesh: Any = None
    grad_bucket_bytes: int = 25 * 2**20
    overlap_grad_sync: bool = False

    def validate(self) -> SPConfig:
        """Check every field; returns self.

        Raises:
            ValueError: naming the field (``strategy: ...``, ``layout: ...``) and the values it accepts.
        """
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise ValueError(
                f"group: expected a torch.distributed ProcessGroup or None, got {type(self.group).__name__}"
            )
        if self.mesh is not None:
            if self.group is not None:
                raise ValueError("mesh: pass either group= or mesh=, not both (the mesh's 'sp' dimension is the group)")
            names = tuple(getattr(self.mesh, "mesh_dim_names", None) or ())
            if not isinstance(self.mesh, DeviceMesh) or names not in (("dp", "sp"), ("sp",)):
                raise ValueError(
                    "mesh: expected a torch.distributed DeviceMesh with dimensions named ('dp', 'sp') or ('sp',), "
                    f"got {type(self.mesh).__name__} with dimensions {names}; e.g. "
                    "init_device_mesh('cuda', (dp, sp), mesh_dim_names=('dp', 'sp'))"
                )
        if isinstance(self.grad_bucket_bytes, bool) or not isinstance(self.grad_bucket_bytes, int) \
                or self.grad_bucket_bytes < 1:
            raise ValueError(f"grad_bucket_bytes: expected a positive number of bytes, got {self.grad_bucket_bytes!r}")
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
        for name in ("verify_model", "overlap_grad_sync"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        return self

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The ranks that share each sequence: the mesh's ``sp`` dimension, else ``group`` (None: the world)."""
        return self.mesh.get_group("sp") if self.mesh is not None else self.group

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The group of this rank's peers in the other data-parallel replicas (None: one replica)."""
        if self.mesh is None or self.mesh.mesh_dim_names == ("sp",) or self.mesh.size(0) == 1:
            return None
        return self.mesh.get_group("dp")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
