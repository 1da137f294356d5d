"""Validate a GPU machine before a long run, offline, in under 8 minutes (`make gpu-check`).

    make gpu-wheels                       # where the registry is reachable: fills .gpu-wheels/ (< 60 MiB)
    make gpu-check                        # on the GPU machine (offline): = python3 tools/gpu_check.py
    make gpu-check DEVICE=cpu             # CPU rehearsal of the same steps, small sizes, in .venv

Steps, each started only if the time budget still allows it:
1. (cuda) a venv `.gpu-venv` with `--system-site-packages`, so it reuses the machine's CUDA
   torch; `pip install --no-index` of .gpu-wheels/requirements.txt (nothing is downloaded); then
   megafork itself, which builds the C++ extension (`--no-build-isolation`: setuptools and
   pybind11 come from the image and the wheels). With `--device cpu` the current interpreter
   (the project's .venv) is used as is.
2. `pytest tests/test_gpu.py` on the device (see that file for what is compared with what).
3. `python -m bench gpu`: the fused-head, threshold and megatron-step numbers against the
   targets, written to the JSON file as they come (partial results survive a timeout).

The JSON (default runs/gpu_check.json; runs/gpu_check_rehearsal.json on CPU) gets the install
and pytest outcomes too; the exit status is non-zero when a step failed or the tests did not pass.
This script uses only the standard library until the venv exists.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu-wheels"
VENV = REPO / ".gpu-venv"
# Seconds kept back for the benchmark when giving pytest its share of the budget.
BENCH_RESERVE = {"cuda": 200.0, "cpu": 60.0}
# With --quick (the rehearsal in `make test`): the fast device checks only.
QUICK_TESTS = "ops or policy_head or radix"


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()


def run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a step; returns rc, seconds and the output tail (rc 124 on timeout)."""
    t0 = time.time()
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=max(timeout, 1.0), capture_output=True, text=True)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += f"\n(timed out after {timeout:.0f} s)"
    print(out[-6000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "tail": out[-2000:]}


def install(budget: Budget) -> tuple[str, dict]:
    """Create .gpu-venv from the image's python and install megafork offline; returns its python."""
    req = WHEELS / "requirements.txt"
    if not req.is_file():
        raise SystemExit(f"{req}: not found; run `make gpu-wheels` where the package registry is reachable, "
                         "then bring .gpu-wheels/ along")
    py = VENV / "bin" / "python"
    steps = []
    if not py.exists():
        steps.append(run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], budget.left()))
    steps.append(run([str(py), "-c", "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; "
                                     "print('torch', torch.__version__, torch.cuda.get_device_name(0))"], 60))
    steps.append(run([str(py), "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS), "-r", str(req)],
                     budget.left()))
    steps.append(run([str(py), "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e",
                      str(REPO)], budget.left()))
    steps.append(run([str(py), "-c", "import megafork._C, megatron.core, transformers; print('megafork ok')"], 120))
    return str(py), {"steps": steps, "ok": all(s["rc"] == 0 for s in steps)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON report")
    ap.add_argument("--quick", action="store_true", help=f"only the fast device tests ({QUICK_TESTS!r})")
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    out = args.out or REPO / ("runs/gpu_check.json" if args.device == "cuda" else "runs/gpu_check_rehearsal.json")
    report: dict = {"device": args.device, "budget_s": args.budget}
    if args.device == "cuda":
        python, report["install"] = install(budget)
        if not report["install"]["ok"]:
            _write(out, report)
            print(f"gpu-check: the offline install failed; see {out}", file=sys.stderr)
            return 1
    else:
        python = sys.executable
    env = {**os.environ, "MEGAFORK_CHECK_DEVICE": args.device, "MEGAFORK_CHECK_OUT": str(out),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    tests = budget.left() - BENCH_RESERVE[args.device]
    if tests > 10:
        cmd = [python, "-m", "pytest", "tests/test_gpu.py", "-p", "no:cacheprovider", "-rfEs",
               "--durations=10"] + (["-k", QUICK_TESTS] if args.quick else [])
        report["pytest"] = run(cmd, tests, env)
        lines = [ln for ln in report["pytest"]["tail"].splitlines() if ln.strip()]
        report["pytest"]["summary"] = lines[-1].strip("= ") if lines else ""  # e.g. "9 passed in 51.2s"
    else:
        report["pytest"] = {"rc": None, "skipped": f"{budget.left():.0f} s left"}
    env["MEGAFORK_CHECK_DEADLINE"] = str(budget.deadline)
    bench = run([python, "-m", "bench", "gpu"], max(budget.left(), 5.0), env)
    try:
        report.update({k: v for k, v in json.loads(out.read_text()).items() if k not in report})
    except (OSError, ValueError):
        pass  # the benchmark died before writing: its tail below says why
    report["bench"] = {k: bench[k] for k in ("cmd", "rc", "seconds")} | {"tail": bench["tail"][-800:]}
    report["passed"] = report["pytest"].get("rc") == 0 and bench["rc"] == 0
    _write(out, report)
    print(bench["tail"][-3000:] if bench["rc"] else "")
    verdict = "PASSED" if report["passed"] else "FAILED"
    print(f"gpu-check ({args.device}): {verdict}: pytest rc {report['pytest'].get('rc')}, bench rc {bench['rc']}; "
          f"{args.budget - budget.left():.0f} s of {args.budget:.0f}; report {out}")
    return 0 if report["passed"] else 1


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
