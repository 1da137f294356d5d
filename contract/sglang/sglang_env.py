"""Make SGLang 0.5.23's server-side modules importable on a CPU machine without its GPU stack.

Imported first by everything in this folder. The wheel and its small pure-Python dependencies
live in `.sglang-contract/site` (see `requirements.txt`, installed by `make sglang-contract`),
layered over the project's venv through PYTHONPATH; the venv's torch (CPU) is reused.

Two things are not SGLang's own code, and both only let imports succeed:
- `sglang/__init__.py` (the frontend DSL: `sglang.lang`, aiohttp, IPython...) is not executed;
  `sglang` is registered as a plain package over the wheel's directory, so `sglang.srt...` and
  `sglang.api...` import as in the server.
- GPU-only or notebook modules that some SGLang modules import at module level but never call on
  the paths tested here are empty stand-ins: `triton` (GPU kernels), `tvm_ffi` (CUDA JIT
  kernels), `torchvision` (image processors) and `IPython` (notebook display). Any call into
  them would return a stand-in object, so a test that reached them would fail its assertions,
  not pass silently.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

STUBBED = ("triton", "tvm_ffi", "torchvision", "IPython")
SITE = os.environ.get("SGLANG_CONTRACT_SITE") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", ".sglang-contract", "site")


class _StubMeta(type):
    """A class that stands for any attribute of a stubbed module (usable in isinstance checks)."""

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator (@triton.jit): the function itself
        return _stub(cls.__name__ + "()")

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{cls.__name__}.{name}")

    def __getitem__(cls, item):
        return _stub(cls.__name__ + "[]")


def _stub(name: str) -> type:
    return _StubMeta(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+stub"
        return module

    def exec_module(self, module):
        pass


def install() -> str:
    """Put the wheel on sys.path, the stand-ins on the import path and `sglang` in sys.modules."""
    site = os.path.abspath(SITE)
    if not os.path.isdir(os.path.join(site, "sglang")):
        raise SystemExit(f"{site}/sglang: not found; run `make sglang-contract` (it installs SGLang 0.5.23 there)")
    if site not in sys.path:
        sys.path.insert(0, site)
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
    if "sglang" not in sys.modules:
        pkg = types.ModuleType("sglang")
        pkg.__path__ = [os.path.join(site, "sglang")]
        sys.modules["sglang"] = pkg
    return site


SITE = install()
