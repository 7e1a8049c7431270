"""Where communication tensors must live, and an audit mode that checks every transfer against it.

NCCL takes CUDA tensors only, gloo CPU ones; a tensor on the wrong device fails at run time on the cluster, or
(a mixed ``"cpu:gloo,cuda:nccl"`` group) silently takes the slow path. ``required_device(group)`` says where
the tensors handed to ``torch.distributed`` on ``group`` belong: the current CUDA device when the group has an
NCCL backend, the CPU otherwise. A test can make a group (or every group) "nccl-like" with another required
device (``set_required_device``, ``device_audit(required_device=...)``).

``device_audit()``: inside it, every collective and point-to-point call of ``comm`` records the device of each
tensor it hands to ``torch.distributed`` and raises ``DeviceMismatchError`` (naming the op, the tensor and its
device) before the transfer when a tensor is not on its group's required device. Outside it nothing is checked
and the check costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["DeviceAudit", "DeviceMismatchError", "device_audit", "required_device", "set_required_device"]


class DeviceMismatchError(RuntimeError):
    """A tensor handed to ``torch.distributed`` is not on the device its group's backend requires."""


@dataclass
class DeviceAudit:
    """What ``device_audit`` saw: ``calls`` holds ``(op, tensor role, device)`` per tensor, in call order."""

    required: torch.device | None = None
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def ops(self) -> set[str]:
        """The names of the ops that moved tensors while the audit was on."""
        return {op for op, _, _ in self.calls}


class _Devices:
    """Per-group overrides of the required device, and the open audits (innermost last)."""

    def __init__(self) -> None:
        self.overrides: dict[dist.ProcessGroup, torch.device] = {}
        self.audits: list[DeviceAudit] = []


_devices = _Devices()


def _resolve(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def required_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device every tensor handed to ``torch.distributed`` on ``group`` (None: the world) must live on.

    An override (``set_required_device``, or the innermost ``device_audit(required_device=...)``) wins; else the
    current CUDA device when the group's backend includes NCCL (``"nccl"``, ``"cpu:gloo,cuda:nccl"``: NCCL is
    the path the data takes there), else the CPU (gloo).
    """
    group = _resolve(group)
    if group in _devices.overrides:
        return _devices.overrides[group]
    for audit in reversed(_devices.audits):
        if audit.required is not None:
            return audit.required
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_required_device(group: dist.ProcessGroup | None, device: torch.device | str | None) -> None:
    """Make ``group`` (None: the world) require ``device`` for its tensors, as an NCCL group requires CUDA
    (``None``: back to what its backend requires). For tests: seqpar then allocates its communication buffers
    for this group there, and ``device_audit`` checks against it."""
    group = _resolve(group)
    if device is None:
        _devices.overrides.pop(group, None)
    else:
        _devices.overrides[group] = torch.device(device)


@contextlib.contextmanager
def device_audit(*, required_device: torch.device | str | None = None) -> Iterator[DeviceAudit]:
    """Check the device of every tensor ``comm`` hands to ``torch.distributed`` inside the block.

    Args:
        required_device: treat every group without its own override as requiring this device (as if every
            group were an NCCL group on it); None: each group's ``required_device``.

    Yields:
        The ``DeviceAudit`` recording every checked tensor.

    Raises (inside the block, before the transfer):
        DeviceMismatchError: a tensor is not on its group's required device; names the op, the tensor and both
            devices. Raised on the rank that holds the tensor (the other ranks then time out at their wait,
            bounded by ``SEQPAR_COMM_TIMEOUT_S``): an audit is a test of seqpar, not a run-time guard.
    """
    audit = DeviceAudit(None if required_device is None else torch.device(required_device))
    _devices.audits.append(audit)
    try:
        yield audit
    finally:
        _devices.audits.remove(audit)


def audit(op: str, group: dist.ProcessGroup | None, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Called by every transfer of ``comm`` with the tensors it is about to hand to ``torch.distributed``."""
    if not _devices.audits:
        return
    required = required_device(group)
    for role, tensor in tensors:
        _devices.audits[-1].calls.append((op, role, str(tensor.device)))
        if not _same_device(tensor.device, required):
            raise DeviceMismatchError(
                f"seqpar: {op}: the {role} tensor is on {tensor.device}, but the group's backend requires "
                f"{required}; create communication tensors on comm.required_device(group)"
            )


def _same_device(actual: torch.device, required: torch.device) -> bool:
    if actual.type != required.type:
        return False
    # "cuda" without an index means the current device
    return required.index is None or actual.index is None or actual.index == required.index
