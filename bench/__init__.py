"""megafork benchmarks: `make bench` (`python -m bench [name ...]`) prints ratio tables."""
