"""The planning worker process of ``PlanPrefetcher``: ``python -m seqpar.solver.plan_worker [NICENESS]``.

Reads ``(request_id, seq_lens, cost_model, options)`` frames from stdin (``prefetch.send_frame``), answers each
with ``(request_id, True, plan.to_json())`` or ``(request_id, False, (error type name, message))`` on its
original stdout, in order, and exits when stdin ends. Solvers print to stdout from C (the HiGHS banner), so the
replies go to a duplicate of the original stdout and file descriptor 1 is pointed at stderr.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> None:
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    if argv:
        os.nice(int(argv[0]))
    from seqpar.solver.planner import plan_step
    from seqpar.solver.prefetch import receive_frame, send_frame

    requests = sys.stdin.buffer
    while True:
        try:
            request_id, lengths, cost_model, options = receive_frame(requests)
        except EOFError:
            return
        try:
            reply = (request_id, True, plan_step(lengths, cost_model, **options).to_json())
        except Exception as err:  # the parent re-raises it for the step that asked
            reply = (request_id, False, (type(err).__name__, str(err)))
        send_frame(replies, reply)


if __name__ == "__main__":
    main(sys.argv[1:])
