"""Shared test setup: the distributed harness lives in harness.py; its pools close at session end."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# The Triton interpreter runs Triton kernels on the CPU; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import shutdown_pools  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutdown_pools()
