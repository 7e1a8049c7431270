"""Link emulation for benchmarks: a network slower than the compute, on a CPU.

With ``set_link_emulation(LinkEmulation(gbps, latency_s))`` or ``SEQPAR_EMULATE_LINK="GBPS[,LATENCY_US]"`` on
every rank, transfers take the time a link of that bandwidth and latency needs, with arrival semantics:

* point-to-point: a message starts on its link (one per peer and direction, ``("p2p", peer)``) when the link
  is free and arrives ``latency + bytes / bandwidth`` later (the alpha-beta model: the link is busy for both,
  so K pieces on one link cost K latencies, as the cost model charges). Both the sender's and the receiver's
  waits return no earlier than the arrival. The sender stamps the arrival time into a one-number header
  message that travels with the payload (same peer and tag, not counted by ``comm.accounting``), so a chain
  of relays is charged hop after hop, as on a real network.
* collectives (one ``"collective"`` link per rank): they complete no earlier than the latest participant's
  start + this rank's bytes / bandwidth + one latency per round (a ring all-gather has P - 1 rounds); the
  start times travel in a small all-gather posted with the collective.

Times are ``clock()``, CLOCK_MONOTONIC, which is one clock for every process on a host (``time.perf_counter``
is the same clock on Linux; ``time.time`` can jump). Emulation is for ranks on one machine: across hosts the
clocks differ and arrivals would be wrong. Every rank must have it on or off alike (a rank without it does not
post the headers the others wait for: their waits time out). Off by default, and then nothing extra is sent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LinkEmulation", "clock", "link_emulation", "set_link_emulation"]


@dataclass(frozen=True)
class LinkEmulation:
    """Every link carries ``gbps`` gigabits per second per direction, after ``latency_s`` per message."""

    gbps: float
    latency_s: float = 0.0

    def transfer_s(self, nbytes: float) -> float:
        """Seconds ``nbytes`` need on a link, latency excluded."""
        return nbytes * 8 / (self.gbps * 1e9)


def clock() -> float:
    """Seconds on CLOCK_MONOTONIC, comparable between the processes of one host."""
    return time.monotonic()


def _link_from_env() -> LinkEmulation | None:
    spec = os.environ.get("SEQPAR_EMULATE_LINK", "").strip()
    if not spec:
        return None
    try:
        parts = [float(x) for x in spec.split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 2 or parts[0] <= 0 or (len(parts) == 2 and parts[1] < 0):
        raise ValueError(f"SEQPAR_EMULATE_LINK: expected 'GBPS[,LATENCY_US]' with GBPS > 0, e.g. '1,20', got {spec!r}")
    return LinkEmulation(parts[0], parts[1] * 1e-6 if len(parts) > 1 else 0.0)


class _Links:
    """The emulated link (None: off) and, per link, when the bytes already issued on it are out."""

    def __init__(self, link: LinkEmulation | None) -> None:
        self.link = link
        self.free_at: dict[object, float] = {}


_links = _Links(_link_from_env())


def set_link_emulation(link: LinkEmulation | None) -> None:
    """Turn link emulation on (a ``LinkEmulation``) or off (None) for this process; call it on every rank."""
    if link is not None and (link.gbps <= 0 or link.latency_s < 0):
        raise ValueError(f"link: gbps must be > 0 and latency_s >= 0, got {link}")
    _links.link = link
    _links.free_at.clear()


def link_emulation() -> LinkEmulation | None:
    """The emulated link of this process (None: emulation is off)."""
    return _links.link


def sleep_until(deadline: float) -> None:
    """Block until ``clock()`` reaches ``deadline``."""
    remaining = deadline - clock()
    if remaining > 0:
        time.sleep(remaining)


# ----------------------------------------------------------------------------------------------------
# Point-to-point: the sender reserves its link and stamps the arrival into a header message
# ----------------------------------------------------------------------------------------------------


def send_header(peer: int, nbytes: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Reserve the link to ``peer`` for a message of ``nbytes`` from when it is free; return (the header to send
    after the payload, holding the arrival time; the arrival time). Emulation must be on."""
    link = _links.link
    start = max(clock(), _links.free_at.get(("p2p", peer), 0.0))
    arrival = start + link.latency_s + link.transfer_s(nbytes)
    _links.free_at[("p2p", peer)] = arrival
    return torch.tensor([arrival], dtype=torch.float64, device=device), arrival


def recv_header(device: torch.device) -> torch.Tensor:
    """A buffer for the header that follows a payload from a peer."""
    return torch.empty(1, dtype=torch.float64, device=device)


def p2p_finish(sent_arrivals: Sequence[float], received_headers: Sequence[torch.Tensor]) -> float:
    """When an exchange completes: every message it sends and every message it receives arrived."""
    return max([*sent_arrivals, *(float(h.item()) for h in received_headers)], default=0.0)


# ----------------------------------------------------------------------------------------------------
# Collectives: every rank's start is gathered; the collective ends after the latest one's transfer
# ----------------------------------------------------------------------------------------------------


def collective_start(nbytes: int, device: torch.device) -> torch.Tensor:
    """This rank's start of a collective moving ``nbytes`` through it (when its collective link is free), as
    the tensor to all-gather; the link is held for the transfer from there. Emulation must be on."""
    link = _links.link
    start = max(clock(), _links.free_at.get("collective", 0.0))
    _links.free_at["collective"] = start + link.transfer_s(nbytes)  # at least; collective_finish extends it
    return torch.tensor([start], dtype=torch.float64, device=device)


def collective_finish(starts: torch.Tensor, nbytes: int, rounds: int) -> float:
    """When a collective completes on this rank: the latest participant's start + this rank's bytes' time +
    one latency per round; the collective link stays busy until then."""
    link = _links.link
    finish = float(starts.max().item()) + link.transfer_s(nbytes) + rounds * link.latency_s
    _links.free_at["collective"] = max(_links.free_at.get("collective", 0.0), finish)
    return finish
