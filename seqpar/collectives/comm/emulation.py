"""Link emulation for benchmarks: a network slower than the compute, on a CPU.

With ``set_link_emulation(LinkEmulation(gbps, latency_s))`` or ``SEQPAR_EMULATE_LINK="GBPS[,LATENCY_US]"``, a
transfer completes no earlier than latency + bytes / bandwidth after it could start on its link, one link per
peer and direction (``("p2p", peer)``) plus one shared by the collectives (``"collective"``), so overlap and
bidirectional schedules show on a CPU what they buy on a slow network. Off by default.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["LinkEmulation", "emulated_finish", "set_link_emulation"]


@dataclass(frozen=True)
class LinkEmulation:
    """Every link carries ``gbps`` gigabits per second per direction after ``latency_s``."""

    gbps: float
    latency_s: float = 0.0


def _link_from_env() -> LinkEmulation | None:
    spec = os.environ.get("SEQPAR_EMULATE_LINK", "").strip()
    if not spec:
        return None
    parts = [float(x) for x in spec.split(",")]
    return LinkEmulation(parts[0], parts[1] * 1e-6 if len(parts) > 1 else 0.0)


class _Links:
    """The emulated link (None: off) and, per link, when the transfers already issued on it finish."""

    def __init__(self, link: LinkEmulation | None) -> None:
        self.link = link
        self.free_at: dict[object, float] = {}


_links = _Links(_link_from_env())


def set_link_emulation(link: LinkEmulation | None) -> None:
    """Turn link emulation on (a ``LinkEmulation``) or off (None) for this process."""
    if link is not None and link.gbps <= 0:
        raise ValueError(f"link: gbps must be > 0, got {link.gbps}")
    _links.link = link
    _links.free_at.clear()


def emulated_finish(link_key: object, nbytes: int) -> float | None:
    """When a transfer of ``nbytes`` issued now on ``link_key`` would finish on the emulated link (None: off)."""
    link = _links.link
    if link is None:
        return None
    start = max(time.perf_counter(), _links.free_at.get(link_key, 0.0))
    finish = start + link.latency_s + nbytes * 8 / (link.gbps * 1e9)
    _links.free_at[link_key] = finish
    return finish
