"""LM head forward+backward of a policy-gradient loss: naive autograd vs the fused head.

    .venv/bin/python -m bench lm_head            # or `make bench` (runs every benchmark)

T=4096 tokens, H=512, V=32768, TP=1, fp32 on CPU. Rows:
* naive: materialised logits h @ W^T, `log_softmax`, gather, `dapo_policy_loss`, autograd
  (1 logits GEMM + 2 gradient GEMMs, [T, V] logits/softmax/gradient tensors);
* fused rho=1 / rho=0.2: `fused_head_policy_loss` with a loss mask over all tokens / a random
  20% of them (1 logits GEMM + 2*rho gradient GEMMs, one [chunk, V] block at a time).

Each variant runs in a fresh subprocess (`python -m bench.bench_lm_head --variant NAME`), so
its peak memory is not polluted by the others: after the inputs are built, the process resets
its kernel peak-RSS counter (`/proc/self/clear_refs`), runs one forward+backward, and reports
VmHWM minus the RSS it had before that run. Times are medians of 5 further runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import median_seconds, print_table
from megafork.algo.loss import dapo_policy_loss
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss

T, H, V = 4096, 512, 32768
VARIANTS = {"naive": 1.0, "fused rho=1": 1.0, "fused rho=0.2": 0.2}
REPEATS = 5


def _inputs(rho: float):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).mul_(0.5).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(H ** -0.5).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        # Old log-probs equal to the current ones: ratio 1, so no token is clipped and the
        # fused head really differentiates every masked row.
        old, _ = fused_head_logprobs_entropy(hidden, weight, labels)
    adv = torch.randn(T, generator=g).sign_()
    mask = torch.rand(T, generator=g) < rho
    return hidden, weight, labels, old, adv, mask


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


def run_variant(name: str) -> dict:
    """Peak memory (one run, fresh counter) and median time of one variant, in this process."""
    args = _inputs(VARIANTS[name])
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _step(name, *args)
    peak = _status_kib("VmHWM") - base
    seconds = median_seconds(lambda: _step(name, *args), repeats=REPEATS, warmup=0)
    return {"seconds": seconds, "peak_mib": peak / 1024, "threads": torch.get_num_threads()}


def main() -> None:
    results = {}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.time()
    for name in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "bench.bench_lm_head", "--variant", name],
                             check=True, capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    naive = results["naive"]
    rows = [[name, r["seconds"] * 1e3, r["seconds"] / naive["seconds"], r["peak_mib"],
             r["peak_mib"] / naive["peak_mib"]] for name, r in results.items()]
    load = os.getloadavg()[0]
    print_table(
        f"LM head fwd+bwd, policy-gradient loss (T={T}, H={H}, V={V}, TP=1, fp32, CPU)",
        ["variant", "median ms", "time vs naive", "peak MiB", "memory vs naive"], rows,
        note=(f"Median of {REPEATS} runs per variant, {naive['threads']} torch threads. Peak memory: "
              "each variant in a fresh subprocess; VmHWM after one forward+backward (counter reset "
              "via /proc/self/clear_refs once the inputs exist) minus the RSS before it. "
              "Targets: fused rho=0.2 <= 0.6x naive time and <= 0.25x naive memory. "
              f"Load average {load:.1f} at the end ({time.time() - t0:.0f} s); the machine is "
              "shared, so absolute times are noisy."))


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    print(json.dumps(run_variant(parser.parse_args().variant)))


if __name__ == "__main__":
    _cli()
