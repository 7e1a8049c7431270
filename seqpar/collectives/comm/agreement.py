"""Cross-rank agreement: every SP op call checks, before its first transfer, that all ranks of its group called
it with what must match, and raises ValueError on every rank naming the ranks and the arguments that differ.

Without it a mismatch is silent or fatal: fp16 on one rank and bf16 on another move the same bytes and give
wrong results, as do a different ``causal`` flag, reshaped same-numel inputs, different ``cu_seqlens`` or a
different per-head ``log_decay``; different sizes make gloo abort the process.

What is compared (the caller lists it, see ``prepare_softmax_sp`` / ``prepare_linear_sp``): named fields
(shapes, dtypes, flags, the local ``cu_seqlens`` boundaries), and the CONTENTS of small inputs every rank holds
whole (a per-head ``log_decay``, ``initial_state``) by a hash of their bytes. Per-token tensors, which differ
between ranks by design, are compared by shape and dtype only.

Cost: one all-gather of a fixed-size 32-byte record (a 64-bit digest of the fields, the fingerprint's length,
the debug flag, and a hash of device-resident integer contents such as hinted packed ``cu_seqlens``, computed
where they live so the packed path reads no boundaries on the host) per call, so a size mismatch is caught
before any variable-size transfer; only when digests differ,
a second all-gather of the readable fingerprints to name what differs. Not counted by ``count_comm`` (it is
metadata; the counters are compared with the algorithms' byte formulas). Measured in
``bench/agreement_cost.py``.

Control, innermost wins:

* ``agreement_checks(enabled)``: a context manager, nestable, restores the previous setting on exit;
* the process default: ON, unless ``SEQPAR_CHECK_AGREEMENT=0``;
* debug level (``SEQPAR_DEBUG=1`` or ``set_consistency_checks(True)``, their names from before the check was on
  by default): checks on wherever no ``agreement_checks`` scope says otherwise, and the readable fingerprints
  are gathered and compared on every call instead of trusting the 64-bit digest.
  ``set_consistency_checks(False)`` returns to the default level.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from seqpar.collectives.comm.devices import required_device
from seqpar.collectives.comm.transport import gather_uncounted, group_info

__all__ = [
    "agreement_checks",
    "agreement_checks_enabled",
    "check_agreement",
    "check_consistent",
    "consistency_checks_enabled",
    "set_consistency_checks",
    "tensor_digest",
]


class _AgreementSettings:
    """The process default, the debug level, and the open ``agreement_checks`` scopes (innermost last)."""

    def __init__(self) -> None:
        self.default = os.environ.get("SEQPAR_CHECK_AGREEMENT", "1").strip() not in ("0", "false", "False", "off")
        self.debug = os.environ.get("SEQPAR_DEBUG", "") not in ("", "0")
        self.scopes: list[bool] = []

    def enabled(self) -> bool:
        if self.scopes:
            return self.scopes[-1]
        return self.debug or self.default


_settings = _AgreementSettings()


@contextlib.contextmanager
def agreement_checks(enabled: bool) -> Iterator[None]:
    """Turn the cross-rank agreement check of every SP op on or off inside the block (nests; restores on exit).

    Every rank of a group must use the same setting for a call: the check is a collective.
    """
    _settings.scopes.append(bool(enabled))
    try:
        yield
    finally:
        _settings.scopes.pop()


def agreement_checks_enabled() -> bool:
    """Whether SP op calls made here check cross-rank agreement (see the module docstring)."""
    return _settings.enabled()


def set_consistency_checks(enabled: bool) -> None:
    """The debug level, process-wide (also ``SEQPAR_DEBUG=1``): True forces the checks on outside any
    ``agreement_checks`` scope and compares the full fingerprints on every call; False returns to the default
    (on unless ``SEQPAR_CHECK_AGREEMENT=0``). Prefer the scoped ``agreement_checks``."""
    _settings.debug = bool(enabled)


def consistency_checks_enabled() -> bool:
    """Same as ``agreement_checks_enabled`` (the name from before the check was on by default)."""
    return _settings.enabled()


def tensor_digest(t: torch.Tensor) -> str:
    """A 64-bit hash (hex) of a tensor's bytes, for small inputs every rank holds whole. Copies to the CPU."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()


def check_agreement(
    what: str,
    fields: Mapping[str, object],
    *,
    group: dist.ProcessGroup | None = None,
    contents: Mapping[str, torch.Tensor | None] | None = None,
    device_contents: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Raise ValueError on every rank of ``group`` unless all its ranks passed equal ``fields`` and ``contents``.

    A collective over ``group`` when checks are enabled (``agreement_checks_enabled()``), nothing otherwise;
    call it on every rank, before the op's first transfer.

    Args:
        what: the op, first word of the error (e.g. ``"ring_attention"``).
        fields: name -> value that must be equal on every rank, compared by ``str(value)`` (shapes, dtypes,
            flags, boundaries).
        contents: name -> small tensor every rank holds whole (or None), compared by shape, dtype and a hash of
            its bytes (``tensor_digest``).
        device_contents: name -> integer tensor compared by a hash computed where it lives and carried in the
            same fixed-size record (no read of its values on the host unless the ranks disagree): for packed
            ``cu_seqlens`` on the GPU, whose host reads the packed path avoids.

    Raises:
        ValueError: ``"{what}: ranks [..] of the group called it with different arguments than ranks [..]: "``
            followed by each differing field and its value on each set of ranks; on every rank.
    """
    group, rank, size = group_info(group)
    if size == 1 or not _settings.enabled():
        return
    entries = [(name, str(value).replace("\n", " ")) for name, value in fields.items()]
    for name, t in (contents or {}).items():
        value = "None" if t is None else f"{tuple(t.shape)} {t.dtype}, contents hash {tensor_digest(t)}"
        entries.append((name, value))
    _compare(what, entries, group, rank, full=_settings.debug, device_contents=device_contents or {})


def check_consistent(fingerprint: str, *, group: dist.ProcessGroup | None = None, what: str = "call") -> None:
    """Raise on every rank when ranks of ``group`` passed different ``fingerprint`` strings (a collective,
    whether or not checks are enabled: the caller asked for it)."""
    group, rank, size = group_info(group)
    if size > 1:
        _compare(what, [("arguments", fingerprint)], group, rank, full=_settings.debug)


def _device_hash(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 64-bit hash of an integer tensor's values and length, computed on its own device (int64 arithmetic wraps
    the same way on every rank), moved to the record's device without reading it on the host."""
    x = t.detach().reshape(-1).to(torch.int64)
    i = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.int64)
    weights = (i * 0x1E3779B97F4A7C15 + 0x232BE59BD9B4E019) ^ (i << 17)  # distinct per position
    return ((x + 0x5851F42D) * weights).sum().reshape(1).to(device) + x.numel()


def _compare(
    what: str, entries: list[tuple[str, str]], group: dist.ProcessGroup, rank: int, *, full: bool,
    device_contents: Mapping[str, torch.Tensor] | None = None,
) -> None:
    device_contents = device_contents or {}
    text = "\n".join(f"{name}={value}" for name, value in entries).encode()
    digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)
    device = required_device(group)  # CUDA on NCCL; reading the gathered record back is this check's host sync
    # the debug level travels along, so that every rank takes the second all-gather if any rank asks for it
    # a fixed-size record whatever the call passed (a size mismatch must never reach the collective): the device
    # contents' hashes are folded into one slot, 0 without any
    record = torch.tensor([digest, len(text), int(full), 0], dtype=torch.int64, device=device)
    for position, t in enumerate(device_contents.values()):
        record[3:] += _device_hash(t, device) * (2 * position + 1)
    gathered = gather_uncounted(record, group=group, describe=f"agreement check of {what} on rank {rank}")
    rows = gathered.tolist()  # one host sync
    lengths, fulls = [row[1] for row in rows], [row[2] for row in rows]
    if len({(row[0], row[3]) for row in rows}) == 1 and not any(fulls):
        return
    if device_contents:  # disagreement (or debug): now read the values, to name them
        entries = entries + [(name, str(t.tolist())) for name, t in device_contents.items()]
        text = "\n".join(f"{name}={value}" for name, value in entries).encode()
        sizes = torch.tensor([len(text)], dtype=torch.int64, device=device)
        lengths = gather_uncounted(sizes, group=group, describe=f"agreement check of {what} on rank {rank}")
        lengths = lengths.reshape(-1).tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    texts = gather_uncounted(padded, group=group, describe=f"agreement check of {what} on rank {rank}").cpu()
    per_rank = [
        dict(line.split("=", 1) for line in bytes(row[:n].numpy()).decode().split("\n") if line)
        for row, n in zip(texts, lengths)
    ]
    if all(p == per_rank[0] for p in per_rank):
        return
    raise ValueError(_describe_mismatch(what, per_rank))


def _describe_mismatch(what: str, per_rank: list[dict[str, str]]) -> str:
    """Name the ranks that differ from the largest set of agreeing ranks (ties: the one with rank 0), and how."""
    sets: dict[tuple, list[int]] = {}
    for r, fingerprint in enumerate(per_rank):
        sets.setdefault(tuple(sorted(fingerprint.items())), []).append(r)
    majority = max(sets.values(), key=len)
    differ = sorted(r for members in sets.values() if members is not majority for r in members)
    names = list(dict.fromkeys(name for fingerprint in per_rank for name in fingerprint))
    details = []
    for name in names:
        by_value: dict[str, list[int]] = {}
        for r, fingerprint in enumerate(per_rank):
            by_value.setdefault(fingerprint.get(name, "<missing>"), []).append(r)
        if len(by_value) > 1:
            details.append(f"{name}: " + "; ".join(f"{value} on ranks {ranks}" for value, ranks in by_value.items()))
    return (
        f"{what}: ranks {differ} of the group called it with different arguments than ranks {majority}: "
        + " | ".join(details)
        + "; every rank of the group must pass the same shapes, dtypes, options and whole-held inputs"
    )
