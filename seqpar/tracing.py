"""An opt-in, in-process event log: which transfers and kernels ran, in what order.

Used to prove schedules (for example that ring attention issues the transfer of step i+1 before it runs the
kernel of step i) without relying on timing. Costs one list check per event when no trace is open.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

_active: list[list[dict[str, Any]]] = []


@contextlib.contextmanager
def trace_events() -> Iterator[list[dict[str, Any]]]:
    """Collect ``{"kind": ..., **details}`` dicts for every event recorded inside the block, in order."""
    events: list[dict[str, Any]] = []
    _active.append(events)
    try:
        yield events
    finally:
        _active.remove(events)


def record(kind: str, **details: Any) -> None:
    if _active:
        event = {"kind": kind, **details}
        for events in _active:
            events.append(event)
