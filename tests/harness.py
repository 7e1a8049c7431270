"""The test suite's distributed harness: pooled gloo ranks from seqpar.launch.ranks (shared with the benchmarks)."""

from seqpar.launch.ranks import RankError, RankTimeout, run_distributed, shutdown_pools

__all__ = ["RankError", "RankTimeout", "run_distributed", "shutdown_pools"]
