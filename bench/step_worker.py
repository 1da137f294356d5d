"""`megafork train` with per-step wall and CPU clocks, for `python -m bench step` (one run per call).

    python -m bench.step_worker OUT --config examples/configs/tiny_cpu.yaml train.steps=6 ...
    torchrun --nproc_per_node=2 -m bench.step_worker OUT --config ...

Each rank writes `OUT.rank<r>.json`: per step, the wall and process-CPU seconds of the whole
step (from the start of one step to the start of the next) and of each timed phase (rollout,
old pass, update, sync), plus `groups_kept`. The clocks wrap the loop's own `Timer` and
`step_metrics`; nothing else of the trainer changes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

from megafork.train import loop
from megafork.train.metrics import Timer


def main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    steps: list[dict] = []

    class ClockedTimer(Timer):
        """The loop's phase timer, also reading the process CPU clock; one per step."""

        def __init__(self):
            super().__init__()
            self.start = (time.perf_counter(), time.process_time())
            self.cpu: dict[str, float] = {}
            steps.append({"timer": self})

        @contextmanager
        def __call__(self, phase: str):
            c0 = time.process_time()
            with super().__call__(phase):
                yield
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - c0

    step_metrics = loop.step_metrics

    def recording_step_metrics(*a, **k):
        m = step_metrics(*a, **k)
        steps[-1]["groups_kept"] = m.get("groups_kept")
        return m

    loop.Timer, loop.step_metrics = ClockedTimer, recording_step_metrics
    from megafork.train.cli import main as train_main

    rc = train_main(args)
    rows = []
    for this, nxt in zip(steps, steps[1:], strict=False):  # the last step has no end stamp: dropped
        t = this["timer"]
        rows.append({"wall": nxt["timer"].start[0] - t.start[0], "cpu": nxt["timer"].start[1] - t.start[1],
                     "phase_wall": t.seconds, "phase_cpu": t.cpu, "groups_kept": this.get("groups_kept")})
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"steps": rows, "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}, f)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
