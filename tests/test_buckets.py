"""Streaming bucket packing for the weight sync: layout, buffer reuse, and memory freed as it packs.

    .venv/bin/python -m pytest tests/test_buckets.py -q
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from megafork.rollout.buckets import BucketPacker, iter_buckets, layout, unpack


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = [("a", (40,), torch.float32), ("b", (3, 5), torch.bfloat16), ("c", (7,), torch.float32),
             ("d", (64,), torch.bfloat16), ("e", (9,), torch.int64), ("f", (1,), torch.bfloat16),
             ("big", (200,), torch.float32), ("g", (11,), torch.bfloat16)]
    return [(n, (torch.randn(s, generator=g) * 100).to(d)) for n, s, d in specs]


def test_packed_buckets_round_trip_in_order_and_respect_the_byte_limit():
    src = _tensors()
    packer = BucketPacker(256, torch.device("cpu"))
    got, seen = [], []
    for bucket in packer.packed((n, t.clone()) for n, t in src):
        seen.append(bucket.names)
        assert bucket.flat.dtype == torch.uint8
        if bucket.names != ["big"]:
            assert bucket.flat.numel() <= 256
        # The receiver's own check: every tensor starts at a multiple of its itemsize.
        unpacked = unpack(bucket.flat, layout(bucket.names, bucket.dtypes, bucket.shapes))
        got += [(n, t.clone()) for n, t in unpacked]
    assert [n for n, _ in got] == [n for n, _ in src], "arrival order is kept"
    for (n, want), (_, t) in zip(src, got):
        assert t.dtype == want.dtype and torch.equal(t, want), n
    assert ["big"] in seen  # 800 bytes > 256: alone
    # a float32 after 15 bf16 elements (30 bytes) would be misaligned: "c" opens a new bucket
    assert any(names[0] == "c" for names in seen)


def test_two_buffers_are_reused_across_buckets_and_syncs():
    src = [(f"t{i}", torch.full((30,), float(i))) for i in range(12)]  # 120 B each, 2 per bucket
    packer = BucketPacker(256, torch.device("cpu"))
    ptrs = []
    for _ in range(2):  # two syncs with one packer
        ptrs += [b.flat.data_ptr() for b in packer.packed(iter(src))]
    assert len(ptrs) == 12 and len(set(ptrs)) == 2
    assert ptrs[0::2] == [ptrs[0]] * 6 and ptrs[1::2] == [ptrs[1]] * 6


def test_each_gathered_tensor_is_freed_once_packed():
    alive: dict[str, weakref.ref] = {}

    def exporter():  # like export_hf_tensors: fresh tensors, no reference kept
        for i in range(10):
            t = torch.full((50,), float(i))
            alive[f"t{i}"] = weakref.ref(t)
            yield f"t{i}", t
            del t

    packer = BucketPacker(450, torch.device("cpu"))  # two 200-byte tensors per bucket
    for bucket in packer.packed(exporter()):
        gc.collect()
        still = [n for n in bucket.names if alive[n]() is not None]
        assert still == [], f"packed tensors {still} are still referenced"
        assert [t[0].item() for _, t in bucket.tensors()] == [float(n[1:]) for n in bucket.names]


def test_packer_checks_its_inputs():
    with pytest.raises(ValueError, match="bucket_bytes: expected a positive byte count, found 0"):
        BucketPacker(0, torch.device("cpu"))
    with pytest.raises(TypeError, match=r"expected \(hf_name: str, tensor\) pairs, found \(int, Tensor\)"):
        list(BucketPacker(64, torch.device("cpu")).packed([(3, torch.zeros(2))]))
    assert [len(b) for b in iter_buckets([("x", torch.zeros(2))], 64)] == [1]
