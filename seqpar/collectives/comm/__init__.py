"""Communication for the SP algorithms: every byte an SP op moves goes through this package.

* ``transport``: groups, bounded waits (``SEQPAR_COMM_TIMEOUT_S``), the batched point-to-point ``exchange``
  (``send``, ``recv`` and the ring exchanges use it), collectives, ``broadcast_bytes``;
* ``accounting``: ``count_comm()`` reports the bytes this rank sent, per operation, per peer and per ring
  direction, by the conventions in its docstring; benchmarks and tests compare them with each algorithm's
  formula;
* ``emulation``: a link slower than the compute for benchmarks (``set_link_emulation``,
  ``SEQPAR_EMULATE_LINK``);
* ``agreement``: the cross-rank check every SP op runs before its first transfer (on by default;
  ``agreement_checks(False)`` / ``SEQPAR_CHECK_AGREEMENT=0`` turn it off);
* ``autograd``: differentiable all-gather and all-to-all;
* ``devices``: ``required_device(group)`` (CUDA for NCCL groups, CPU for gloo) and ``device_audit()``, the test
  mode that checks the device of every tensor handed to torch.distributed;
* ``tags``: the table of every point-to-point message tag in seqpar.

Everything public is re-exported here: ``from seqpar.collectives import comm; comm.ring_exchange(...)``.
"""

from seqpar.collectives.comm import tags
from seqpar.collectives.comm.accounting import CommStats, count_comm
from seqpar.collectives.comm.agreement import (
    agreement_checks,
    agreement_checks_enabled,
    check_agreement,
    check_consistent,
    consistency_checks_enabled,
    set_consistency_checks,
    tensor_digest,
)
from seqpar.collectives.comm.autograd import (
    all_gather_differentiable,
    all_to_all_differentiable,
)
from seqpar.collectives.comm.devices import (
    DeviceAudit,
    DeviceMismatchError,
    device_audit,
    required_device,
    set_required_device,
)
from seqpar.collectives.comm.emulation import LinkEmulation, set_link_emulation
from seqpar.collectives.comm.transport import (
    PendingTransfer,
    all_gather,
    all_gather_async,
    all_reduce,
    all_reduce_async,
    all_to_all,
    all_to_all_single,
    broadcast_bytes,
    default_timeout,
    exchange,
    group_info,
    recv,
    reduce_scatter,
    ring_exchange,
    ring_exchange_bidirectional,
    send,
)

# The tag names of the module this package replaces.
TAG_NEXT = tags.RING_NEXT
TAG_PREV = tags.RING_PREV
TAG_P2P = tags.P2P

__all__ = [
    "CommStats",
    "DeviceAudit",
    "DeviceMismatchError",
    "LinkEmulation",
    "PendingTransfer",
    "agreement_checks",
    "agreement_checks_enabled",
    "all_gather",
    "all_gather_async",
    "all_gather_differentiable",
    "all_reduce",
    "all_reduce_async",
    "all_to_all",
    "all_to_all_differentiable",
    "broadcast_bytes",
    "check_agreement",
    "check_consistent",
    "consistency_checks_enabled",
    "count_comm",
    "default_timeout",
    "device_audit",
    "exchange",
    "group_info",
    "recv",
    "reduce_scatter",
    "required_device",
    "ring_exchange",
    "ring_exchange_bidirectional",
    "send",
    "set_consistency_checks",
    "set_required_device",
    "set_link_emulation",
    "tags",
    "tensor_digest",
]
