"""megafork.train.checkpoint: bit-exact round trips at TP=2 and DP=2, atomic saves, resume errors.

Round trip: train a tiny Qwen3 2 steps, save, train 2 more (the reference); then build a fresh
model/optimizer/scheduler with other weights and scrambled RNGs, load, and train the same 2 steps.
The batches are drawn from python `random`, numpy and torch, so every RNG, the Adam moments and
the LR schedule (warm-up + cosine) must be restored exactly for losses and weights to be equal.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megafork.testing.multirank import run_ranks
from megafork.train import checkpoint as ckpt

SEQ, BATCH = 8, 2


def _build(hf_dir, groups, init_seed: int):
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, read_hf_config
    from megafork.train.config import OptimConfig
    from megafork.train.optim import build_optimizer, enable_per_token_loss, wrap_ddp

    torch.manual_seed(init_seed)
    model = build_qwen3(read_hf_config(hf_dir), Qwen3BuildOptions(dtype="fp32", spec="local"), groups)
    enable_per_token_loss(model)
    ddp = wrap_ddp(model, groups)
    optim_cfg = OptimConfig(lr=3e-3, min_lr=1e-4, warmup_steps=2, schedule="cosine", weight_decay=0.1, grad_clip=1.0)
    optimizer, scheduler = build_optimizer(optim_cfg, [ddp], total_steps=6, groups=groups)
    return ddp, optimizer, scheduler


def _train_step(ddp, optimizer, scheduler, groups) -> float:
    """One update on a batch drawn from all three RNGs; returns the global mean token loss."""
    vocab = ddp.module.vocab_size_unpadded
    shift = random.randrange(vocab) + int(np.random.randint(vocab))
    ids = (torch.randint(0, vocab, (BATCH, SEQ + 1)) + shift) % vocab
    ids, labels = ids[:, :-1], ids[:, 1:]
    # TP ranks must see the same batch: take TP rank 0's (the DP ranks keep their own).
    if groups.tp is not None:
        both = torch.stack([ids, labels])
        torch.distributed.broadcast(both, src=torch.distributed.get_global_rank(groups.tp, 0), group=groups.tp)
        ids, labels = both[0], both[1]
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = ddp(ids, pos, None, labels=labels)  # [b, s] per-token CE (vocab-parallel)
    total = losses.sum()
    total.backward()
    tokens = torch.tensor(losses.numel(), dtype=torch.int)
    ddp.config.finalize_model_grads_func([ddp], tokens)  # sums tokens over DP, scales grads by 1/total
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(1)
    summed = torch.stack([total.detach(), tokens.to(total.dtype)])
    if groups.dp is not None:
        torch.distributed.all_reduce(summed, group=groups.dp)
    return float(summed[0] / summed[1])


def _weights(ddp) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if isinstance(v, torch.Tensor)
            and not k.endswith("_extra_state")}


def _roundtrip(rank: int, world: int, hf_dir: str, root: str) -> dict:
    from megafork.distributed import ParallelConfig, init_distributed

    out = {}
    for tp in (2, 1):  # TP=2 (DP=1), then DP=2 (TP=1), in one spawn
        groups = init_distributed(ParallelConfig(tp=tp))
        ck_root = Path(root) / f"tp{tp}"
        ddp, optimizer, scheduler = _build(hf_dir, groups, init_seed=1)
        random.seed(10 + rank)
        np.random.seed(20 + rank)
        torch.manual_seed(30 + rank)
        first = [_train_step(ddp, optimizer, scheduler, groups) for _ in range(2)]
        saved = ckpt.save_checkpoint(ck_root, 2, [ddp], optimizer, scheduler, groups,
                                     extra={"data": {"epoch": 0, "position": 8}, "summary": [1.5]},
                                     rank_extra={"rank": rank}, keep_last=0)
        reference = [_train_step(ddp, optimizer, scheduler, groups) for _ in range(2)]
        ref_weights = _weights(ddp)

        ddp2, optimizer2, scheduler2 = _build(hf_dir, groups, init_seed=99)
        random.seed(1)
        np.random.seed(2)
        torch.manual_seed(3)
        path = ckpt.resolve_resume("auto", ck_root)
        loaded = ckpt.load_checkpoint(path, [ddp2], optimizer2, scheduler2, groups)
        lr_after_load = optimizer2.param_groups[0]["lr"]
        resumed = [_train_step(ddp2, optimizer2, scheduler2, groups) for _ in range(2)]
        weights = _weights(ddp2)
        out[tp] = {
            "first": first, "reference": reference, "resumed": resumed, "path": str(path), "saved": str(saved),
            "step": loaded.step, "extra": loaded.extra, "rank_extra": loaded.rank_extra,
            "lr_after_load": lr_after_load, "lr_expected": 3e-3,  # num_steps=2 == warmup_steps: the peak
            "weights_equal": sorted(weights) == sorted(ref_weights)
            and all(torch.equal(weights[k], ref_weights[k]) for k in weights),
            "files": sorted(os.listdir(path)),
        }
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3

    # vocab 128 with TP=2; untied output layer so both embedding and head shards are checkpointed.
    return str(make_tiny_qwen3(tmp_path_factory.mktemp("hf"), tie_word_embeddings=False))


def test_roundtrip_bit_exact_tp2_and_dp2(hf_dir, tmp_path):
    results = run_ranks(_roundtrip, 2, args=(hf_dir, str(tmp_path)), timeout=240)
    for rank, per_layout in enumerate(results):
        for tp, r in per_layout.items():
            where = f"rank {rank}, tp={tp}"
            assert r["path"] == r["saved"] and r["step"] == 2, where
            assert r["resumed"] == r["reference"], where  # bit-exact: float equality
            assert r["weights_equal"], where
            assert r["reference"] != r["first"], where  # the steps do change the model
            assert r["extra"] == {"data": {"epoch": 0, "position": 8}, "summary": [1.5]}, where
            assert r["rank_extra"] == {"rank": rank}, where
            assert r["lr_after_load"] == pytest.approx(r["lr_expected"], rel=1e-12), where
            assert ckpt.META_FILE in r["files"] and "common.pt" in r["files"], where
    # DP ranks draw different batches: their losses are all-reduced, so both report the same numbers.
    assert results[0][1]["reference"] == results[1][1]["reference"]
    meta = json.loads((Path(results[0][2]["path"]) / ckpt.META_FILE).read_text())
    assert meta["layout"] == {"tp": 2, "pp": 1, "cp": 1, "dp": 1} and meta["world_size"] == 2
    assert meta["has_optimizer_state"] and meta["model_keys"] == ["model"]


# --------------------------------------------------------------------------------------------------
# Atomic save: SIGKILL in the middle of the second save.

def _killed_save_main(hf_dir: str, root: str, marker: str, weights_file: str) -> None:
    """Runs in a subprocess: save step 1, then hang inside the save of step 2 until killed."""
    from megafork.distributed import ParallelConfig, init_distributed

    groups = init_distributed(ParallelConfig())
    ddp, optimizer, scheduler = _build(hf_dir, groups, init_seed=5)
    _train_step(ddp, optimizer, scheduler, groups)
    ckpt.save_checkpoint(root, 1, [ddp], optimizer, scheduler, groups, extra={"data": {"position": 1}})
    torch.save(_weights(ddp), weights_file)
    _train_step(ddp, optimizer, scheduler, groups)
    from megafork.train import checkpoint_commit

    real_fsync_dir = checkpoint_commit._fsync_dir

    def hang_before_rename(path: Path) -> None:
        real_fsync_dir(path)  # everything, the meta file included, is on disk; only the rename is left
        if ".tmp-" in path.name:
            Path(marker).write_text(path.name)
            time.sleep(300)

    checkpoint_commit._fsync_dir = hang_before_rename  # where `_publish` looks it up
    ckpt.save_checkpoint(root, 2, [ddp], optimizer, scheduler, groups, extra={"data": {"position": 2}})


def _after_kill(rank: int, world: int, hf_dir: str, root: str, weights_file: str) -> dict:
    from megafork.distributed import ParallelConfig, init_distributed

    groups = init_distributed(ParallelConfig())
    ddp, optimizer, scheduler = _build(hf_dir, groups, init_seed=6)
    loaded = ckpt.load_checkpoint(ckpt.resolve_resume("auto", root), [ddp], optimizer, scheduler, groups)
    expected = torch.load(weights_file)
    weights = _weights(ddp)
    equal = all(torch.equal(weights[k], expected[k]) for k in expected)
    for step in (2, 3, 4, 4):  # the last one saves step 4 again: the new one replaces the old
        _train_step(ddp, optimizer, scheduler, groups)
        ckpt.save_checkpoint(root, step, [ddp], optimizer, scheduler, groups, extra={"data": {"position": step}},
                             keep_last=2)
    return {"step": loaded.step, "extra": loaded.extra, "equal": equal, "final_weights": _weights(ddp)}


def test_killed_save_leaves_previous_checkpoint(hf_dir, tmp_path):
    root, marker, weights_file = tmp_path / "ck", tmp_path / "marker", tmp_path / "w1.pt"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_train_checkpoint as t; "
            f"t._killed_save_main({hf_dir!r}, {str(root)!r}, {str(marker)!r}, {str(weights_file)!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the saving process exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "the saving process never reached the rename"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    tmp_dir = root / marker.read_text()
    assert tmp_dir.is_dir() and (tmp_dir / ckpt.META_FILE).is_file()  # fully written, never renamed
    assert (root / "latest").read_text().strip() == "step_0000001"
    assert ckpt.resolve_resume("auto", root) == root / "step_0000001"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000001"]
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_resume(str(tmp_dir), root)

    (res,) = run_ranks(_after_kill, 1, args=(hf_dir, str(root), str(weights_file)), timeout=180)
    assert res["step"] == 1 and res["extra"] == {"data": {"position": 1}} and res["equal"]
    # The next save removed the killed save's directory; keep_last=2 pruned steps 1 and 2.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003", "step_0000004"]
    assert (root / "latest").read_text().strip() == "step_0000004"
    meta = ckpt.validate_checkpoint(root / "step_0000004")
    assert meta["step"] == 4


# --------------------------------------------------------------------------------------------------
# Resume resolution and errors (no ranks needed).

def _fake_checkpoint(path: Path, step: int, files=("metadata.json", ".metadata", "common.pt")) -> Path:
    """A checkpoint directory that passes validation but holds no state (resolution tests only)."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    path.mkdir(parents=True)
    contents = {"metadata.json": lambda f: f.write_text(json.dumps({"sharded_backend": "torch_dist"})),
                ".metadata": lambda f: f.write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_data={}))),
                "common.pt": lambda f: torch.save({}, f)}
    for f in files:
        contents[f](path / f)
    (path / ckpt.META_FILE).write_text(json.dumps({
        "format_version": ckpt.FORMAT_VERSION, "step": step, "world_size": 1, "model_keys": ["model"],
        "has_optimizer_state": True}))
    return path


def test_resume_resolution_and_errors(tmp_path, caplog):
    root = tmp_path / "ck"
    assert ckpt.resolve_resume("auto", root) is None  # fresh run
    assert ckpt.resolve_resume("none", root) is None
    with pytest.raises(ckpt.CheckpointError, match=r"train.resume='/nope/step_1'.*found nothing at that path"):
        ckpt.resolve_resume("/nope/step_1", root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="expected a directory, found a file"):
        ckpt.resolve_resume(str(tmp_path / "file"), root)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.pt").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match=r"plain: not a megafork checkpoint .*weights.pt"):
        ckpt.resolve_resume(str(tmp_path / "plain"), root)
    (tmp_path / "mcore").mkdir()
    (tmp_path / "mcore" / "metadata.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="not a megafork training checkpoint.*model.megatron_path"):
        ckpt.resolve_resume(str(tmp_path / "mcore"), root)
    partial = _fake_checkpoint(tmp_path / "partial", 3, files=("metadata.json",))
    with pytest.raises(ckpt.CheckpointError, match=r"partial: incomplete, dist_checkpointing files \['.metadata', "
                                                   r"'common.pt'\] are missing"):
        ckpt.resolve_resume(str(partial), root)
    bad_meta = _fake_checkpoint(tmp_path / "badmeta", 3)
    (bad_meta / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"badmeta/megafork_checkpoint.json: unreadable"):
        ckpt.resolve_resume(str(bad_meta), root)

    s1, s2 = _fake_checkpoint(root / "step_0000001", 1), _fake_checkpoint(root / "step_0000002", 2)
    (root / "step_0000003.tmp-abc").mkdir()  # a killed save: ignored
    (root / "latest").write_text("step_0000002\n")
    assert ckpt.resolve_resume("auto", root) == s2
    assert ckpt.resolve_resume(str(root), root) == s2  # a checkpoints directory resolves through `latest`
    assert ckpt.resolve_resume(str(s1), root) == s1
    assert ckpt.list_checkpoints(root) == [s1, s2]
    # `latest` names a checkpoint that was deleted by hand: fall back to the newest complete one, loudly.
    (root / "latest").write_text("step_0000007\n")
    assert ckpt.latest_checkpoint(root) == s2
    assert "step_0000007" in caplog.text and "not usable" in caplog.text


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints: resume falls back to the newest valid one; a failed load names the file.

def _corrupt(step_dir: Path, how: str) -> None:
    def truncate(name, keep):
        f = step_dir / name
        f.write_bytes(f.read_bytes()[:keep])

    if how == "common.pt deleted":
        (step_dir / "common.pt").unlink()
    elif how == "meta truncated":
        truncate(ckpt.META_FILE, 40)
    elif how == "distcp truncated":
        truncate("__0_0.distcp", 1000)
    elif how == "metadata truncated":
        truncate(".metadata", 500)
    elif how == "common.pt truncated":
        truncate("common.pt", 1000)
    else:
        raise AssertionError(how)


CORRUPTIONS = ("common.pt deleted", "meta truncated", "distcp truncated", "metadata truncated", "common.pt truncated")


def _damaged_resume(rank: int, world: int, hf_dir: str, root: str) -> dict:
    import logging
    import shutil

    from megafork.distributed import ParallelConfig, init_distributed

    groups = init_distributed(ParallelConfig(tp=1))
    ddp, optimizer, scheduler = _build(hf_dir, groups, init_seed=1)
    pristine = Path(root) / "pristine"
    saved = {}
    for step in (1, 2):
        _train_step(ddp, optimizer, scheduler, groups)
        ckpt.save_checkpoint(pristine, step, [ddp], optimizer, scheduler, groups, extra={"data": {"step": step}},
                             keep_last=0)
        saved[step] = _weights(ddp)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megafork.train.checkpoint").addHandler(handler)
    out = {}
    for how in CORRUPTIONS:
        case = Path(root) / how.replace(" ", "_")
        shutil.copytree(pristine, case)
        _corrupt(case / "step_0000002", how)
        warnings.clear()
        path = ckpt.resolve_resume("auto", case)
        loaded = ckpt.load_checkpoint(path, [ddp], optimizer, scheduler, groups)
        w = _weights(ddp)
        out[how] = {"path": path.name, "step": loaded.step, "extra": loaded.extra, "warnings": list(warnings),
                    "equal_step1": all(torch.equal(w[k], saved[1][k]) for k in w),
                    "kept": sorted(os.listdir(case))}
    # A shard file whose size is right but whose stored object is garbage fails mid-load.
    case = Path(root) / "garbage_object"
    shutil.copytree(pristine, case)
    shard = case / "step_0000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[:64] = bytes(64)  # the first stored item is a pickled _extra_state
    shard.write_bytes(bytes(data))
    try:
        ckpt.load_checkpoint(case / "step_0000002", [ddp], optimizer, scheduler, groups)
        out["garbage"] = "loaded"
    except ckpt.CheckpointError as exc:
        out["garbage"] = str(exc)
    return out


def test_damaged_latest_falls_back_to_previous_and_resumes(hf_dir, tmp_path):
    (res,) = run_ranks(_damaged_resume, 1, args=(hf_dir, str(tmp_path)), timeout=240)
    for how in CORRUPTIONS:
        r = res[how]
        assert r["path"] == "step_0000001" and r["step"] == 1 and r["extra"] == {"data": {"step": 1}}, (how, r)
        assert r["equal_step1"], how
        # One warning names the broken checkpoint, why, and the one used instead.
        (msg,) = [m for m in r["warnings"] if "falling back" in m]
        assert "step_0000002" in msg and "step_0000001" in msg, (how, msg)
        assert r["kept"] == ["latest", "step_0000001", "step_0000002"], (how, r["kept"])  # nothing deleted
    assert "common.pt" in res["common.pt deleted"]["warnings"][0]
    assert "megafork_checkpoint.json: unreadable" in res["meta truncated"]["warnings"][0]
    assert "__0_0.distcp: expected at least" in res["distcp truncated"]["warnings"][0]
    assert ".metadata: unreadable" in res["metadata truncated"]["warnings"][0]
    assert "common.pt: unreadable" in res["common.pt truncated"]["warnings"][0]
    garbage = res["garbage"]
    assert "step_0000002: loading failed" in garbage and "step_0000002/__0_0.distcp" in garbage, garbage
    assert "does not decode" in garbage, garbage


def test_no_valid_checkpoint_is_an_error_naming_each(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2):
        _fake_checkpoint(root / ckpt.step_dir_name(step), step, files=("metadata.json", ".metadata"))
    (root / "latest").write_text("step_0000002\n")
    with pytest.raises(ckpt.CheckpointError, match=r"no valid checkpoint.*step_0000002.*step_0000001.*"
                                                   r"train.resume=none"):
        ckpt.resolve_resume("auto", root)
    assert len(ckpt.list_checkpoints(root)) == 2  # nothing deleted


# --------------------------------------------------------------------------------------------------
# Storage failures name the directory and say what failed.

def _save_with_limits(rank: int, world: int, hf_dir: str, root: str, max_file_bytes: int | None) -> str:
    import resource

    from megafork.distributed import ParallelConfig, init_distributed

    groups = init_distributed(ParallelConfig(tp=1))
    ddp, optimizer, scheduler = _build(hf_dir, groups, init_seed=1)
    _train_step(ddp, optimizer, scheduler, groups)
    if max_file_bytes is not None:  # files may not grow past this: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))
    try:
        ckpt.save_checkpoint(root, 1, [ddp], optimizer, scheduler, groups, extra={"data": {}})
    except ckpt.StorageError as exc:
        return str(exc)
    return "saved"


def test_failed_save_names_the_directory(hf_dir, tmp_path):
    root = tmp_path / "ck"
    (msg,) = run_ranks(_save_with_limits, 1, args=(hf_dir, str(root), 100_000), timeout=180)
    assert msg.startswith(f"saving checkpoint step 1 into {root}/step_0000001.tmp-"), msg
    assert f"cannot write {root}" in msg, msg
    assert ckpt.list_checkpoints(root) == [] and not (root / "latest").exists()  # nothing published


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_during_save_says_no_space_on_the_directory(hf_dir, tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "400k"):  # needs root (or CAP_SYS_ADMIN); the EFBIG test above runs everywhere
        pytest.skip("cannot mount a small tmpfs here to fill up")
    try:
        root = small / "ck"
        (msg,) = run_ranks(_save_with_limits, 1, args=(hf_dir, str(root), None), timeout=180)
        assert msg.startswith(f"saving checkpoint step 1 into {root}/step_0000001.tmp-"), msg
        assert f"no space left on the filesystem of {root}" in msg, msg
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_unwritable_log_dir_is_named(tmp_path):
    from megafork.train.config import load_config
    from megafork.train.config_types import ConfigError
    from megafork.train.preflight import prepare_run_dir

    (tmp_path / "file").write_text("x")
    cfg = load_config(None, [f"log.dir={tmp_path / 'file' / 'runs'}"])
    with pytest.raises(ConfigError, match=rf"log.dir='{tmp_path}/file/runs': expected a directory this process can "
                                          rf"write; cannot write {tmp_path}/file/runs/run \(NotADirectoryError"):
        prepare_run_dir(cfg)
