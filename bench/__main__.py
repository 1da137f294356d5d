"""Run every benchmark (`make bench`) or the named ones (`python -m bench lm_head threshold`).

Each `bench/bench_<name>.py` has a `main()` that prints its ratio table.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> int:
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    chosen = argv or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {names}", file=sys.stderr)
        return 2
    for name in chosen:
        t0 = time.perf_counter()
        importlib.import_module(f"bench.bench_{name}").main()
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
