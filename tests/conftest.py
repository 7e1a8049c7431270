"""Shared test setup: the distributed harness lives in harness.py; its pools close at session end.

``tests`` is a package (imported as ``tests.<module>`` from the repository root), so test modules, their
helpers and the functions the rank processes run import the same way everywhere, with no path changes.
"""

import os

# The Triton interpreter runs Triton kernels on the CPU; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.harness import shutdown_pools  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutdown_pools()
