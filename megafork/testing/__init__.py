"""Test utilities shared by the suite and the benchmarks."""
from megafork.testing.multirank import RankFailure, run_ranks

__all__ = ["RankFailure", "run_ranks"]
