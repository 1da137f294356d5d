"""Peak memory of a block of torch code on any device, counted at the aten level (CPU included).

    with LiveBytes() as probe:
        loss, _ = fused_head_policy_loss(...)
        loss.backward()
    probe.peak      # most bytes held at once by storages that ops inside the block created

Every aten op's outputs are inspected; a storage none of the op's inputs shares is new, and it
counts until its last reference dies (a finalizer on the storage). Views and `out=` results
share an input's storage and count nothing; storages created before the block never count.
Scratch memory inside a single kernel (a GEMM's workspace) is not visible. The CPU has no
allocator statistics, so this is how the LM-head planner's workspace formula is checked there.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Tracks the live bytes of storages created inside the block, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out
