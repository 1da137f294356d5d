"""LM head forward+backward of a policy-gradient loss: naive autograd vs the fused head.

    .venv/bin/python -m bench lm_head            # or `make bench` (runs every benchmark)

T=4096 tokens, H=512, V=32768, TP=1, fp32 on CPU. Rows:
* naive: materialised logits h @ W^T, `log_softmax`, gather, `dapo_policy_loss`, autograd
  (1 logits GEMM + 2 gradient GEMMs, [T, V] logits/softmax/gradient tensors);
* fused rho=1 / rho=0.2: `fused_head_policy_loss` with a loss mask over all tokens / a random
  20% of them (1 logits GEMM + 2*rho gradient GEMMs, one [chunk, V] block at a time).

Peak memory: each variant runs once in a fresh subprocess (`python -m bench.bench_lm_head
--memory NAME`), so the others cannot pollute it: after the inputs are built, the process resets
its kernel peak-RSS counter (`/proc/self/clear_refs`), runs one forward+backward, and reports
VmHWM minus the RSS it had before that run. Time: one more subprocess (`--time`) runs the
variants round-robin (a warm-up round, then 5 timed rounds) and reports each one's median, so
load from other processes on a shared machine drifts over all variants alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import print_table
from megafork.algo.loss import dapo_policy_loss
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss

T, H, V = 4096, 512, 32768
VARIANTS = {"naive": 1.0, "fused rho=1": 1.0, "fused rho=0.2": 0.2}
REPEATS = 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).mul_(0.5).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(H ** -0.5).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        # Old log-probs equal to the current ones: ratio 1, so no token is clipped and the
        # fused head really differentiates every masked row.
        old, _ = fused_head_logprobs_entropy(hidden, weight, labels)
    adv = torch.randn(T, generator=g).sign_()
    scores = torch.rand(T, generator=g)
    masks = {name: scores < rho for name, rho in VARIANTS.items()}
    return hidden, weight, labels, old, adv, masks


def _step(name: str, hidden, weight, labels, old, adv, mask) -> None:
    hidden.grad = weight.grad = None
    if name == "naive":
        logits = hidden @ weight.T
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        loss, _ = dapo_policy_loss(logprobs, old, adv, mask, normalizer=T)
    else:
        loss, _ = fused_head_policy_loss(hidden, weight, labels, old, adv, mask, normalizer=T)
    loss.backward()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(name: str) -> float:
    """Peak RSS increase of one forward+backward of `name`, measured in this (fresh) process."""
    hidden, weight, labels, old, adv, masks = _inputs()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _step(name, hidden, weight, labels, old, adv, masks[name])
    return (_status_kib("VmHWM") - base) / 1024


def median_times() -> dict[str, float]:
    """Median seconds per variant, the variants interleaved round by round."""
    hidden, weight, labels, old, adv, masks = _inputs()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(REPEATS + 1):
        for name in VARIANTS:
            t0 = time.perf_counter()
            _step(name, hidden, weight, labels, old, adv, masks[name])
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _subprocess(*args: str):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.bench_lm_head", *args], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    t0 = time.time()
    peaks = {name: _subprocess("--memory", name) for name in VARIANTS}
    seconds = _subprocess("--time")
    rows = [[name, seconds[name] * 1e3, seconds[name] / seconds["naive"], peaks[name],
             peaks[name] / peaks["naive"]] for name in VARIANTS]
    print_table(
        f"LM head fwd+bwd, policy-gradient loss (T={T}, H={H}, V={V}, TP=1, fp32, CPU)",
        ["variant", "median ms", "time vs naive", "peak MiB", "memory vs naive"], rows,
        note=(f"Time: median of {REPEATS} rounds, variants interleaved in one process, "
              f"{torch.get_num_threads()} torch threads. Peak memory: each variant once in a fresh "
              "subprocess; VmHWM after one forward+backward (counter reset via /proc/self/clear_refs "
              "once the inputs exist) minus the RSS before it. Naive computes no entropy; the fused "
              "head also returns per-token entropy. Targets: fused rho=0.2 <= 0.6x naive time and "
              f"<= 0.25x naive memory. Load average {os.getloadavg()[0]:.1f} at the end "
              f"({time.time() - t0:.0f} s): the machine is shared, so absolute times are noisy."))


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--memory", choices=sorted(VARIANTS), help="peak memory of one variant")
    mode.add_argument("--time", action="store_true", help="median times of all variants, interleaved")
    args = parser.parse_args()
    print(json.dumps(peak_memory_mib(args.memory) if args.memory else median_times()))


if __name__ == "__main__":
    _cli()
