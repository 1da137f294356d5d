"""Download every wheel megafork needs beyond a stock CUDA torch image, for an offline GPU check.

    make gpu-wheels                       # = .venv/bin/python tools/gpu_wheels.py --out .gpu-wheels

The set is the dependency closure of what `make gpu-check` imports (megatron-core, transformers,
tokenizers, safetensors, huggingface-hub, numpy, pybind11, PyYAML, tqdm, psutil, pytest, setuptools),
minus torch's own closure (the GPU image has torch, and with it filelock, jinja2, sympy, fsspec,
networkx, typing-extensions). Versions are pinned to the ones installed in this venv, the ones
the CPU suite passes with; the wheels are fetched for CPython 3.12 manylinux x86_64 (the GPU
image), with `--no-deps` so no CUDA torch is ever downloaded. The folder must stay under
`--max-mib` so it can travel with the working tree; the total is printed and checked.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ("megatron-core", "transformers", "tokenizers", "safetensors", "huggingface-hub", "numpy", "pybind11",
         "pyyaml", "tqdm", "psutil", "pytest", "pytest-timeout", "setuptools", "packaging")
# What the GPU image brings: torch and everything torch itself requires.
PROVIDED_ROOTS = ("torch",)
# Never fetched, whatever the closure says (CUDA builds come with the image).
NEVER = ("torch", "triton")
# Small pure-python parts of torch's closure fetched anyway: an image with older versions of them
# would otherwise leave transformers/megatron unsatisfiable offline (sympy, networkx stay out).
ALSO = ("typing-extensions", "filelock", "fsspec", "jinja2", "markupsafe", "setuptools")


def target_env(python: str) -> dict[str, str]:
    """Marker environment of the GPU image (CPython `python` on Linux x86_64)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def closure(roots, env: dict[str, str]) -> dict[str, str | None]:
    """name -> installed version (None when not installed here) over the requirement closure."""
    seen: dict[str, str | None] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[name] = None
            continue
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def wanted(python: str) -> dict[str, str]:
    """The pinned wheels to fetch: ROOTS' closure minus torch's."""
    env = target_env(python)
    provided = set(closure(PROVIDED_ROOTS, env))
    need = closure(ROOTS, env)
    missing = sorted(n for n, v in need.items() if v is None and n not in provided)
    if missing:
        raise SystemExit(f"gpu-wheels: {missing} are required but not installed in this venv "
                         f"({sys.prefix}); run `make setup` first")
    also = {n: v for n, v in closure(ALSO, env).items() if n in ALSO and v is not None}
    need.update(also)
    return {n: v for n, v in sorted(need.items())
            if (n not in provided or n in also) and n not in NEVER and v is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".gpu-wheels", help="download folder (git-ignored)")
    ap.add_argument("--python", default="3.12", help="the GPU image's CPython version")
    ap.add_argument("--max-mib", type=float, default=60.0, help="fail when the folder is larger")
    ap.add_argument("--list", action="store_true", help="print the pinned set and exit")
    args = ap.parse_args(argv)
    pins = wanted(args.python)
    if args.list:
        print("\n".join(f"{n}=={v}" for n, v in pins.items()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    abi = "cp" + args.python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(out),
           "--python-version", args.python, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
           "--abi", "none", *(f"--platform={p}" for p in (
               "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
               "manylinux_2_5_x86_64", "manylinux1_x86_64", "any")),
           *(f"{n}=={v}" for n, v in pins.items())]
    subprocess.run(cmd, check=True)
    # Keep exactly the pinned set (an older download of another version would mislead pip).
    keep = {f"{canonicalize_name(n).replace('-', '_')}-{v}" for n, v in pins.items()}
    for whl in out.glob("*.whl"):
        stem = whl.name.split("-")
        if f"{canonicalize_name(stem[0]).replace('-', '_')}-{stem[1]}" not in keep:
            whl.unlink()
    (out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"gpu-wheels: {len(list(out.glob('*.whl')))} wheels for CPython {args.python} in {out}: "
          f"{total / 2**20:.1f} MiB (limit {args.max_mib:g} MiB)")
    if total > args.max_mib * 2**20:
        print(f"gpu-wheels: {out} is larger than {args.max_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
