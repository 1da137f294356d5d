"""GPU checks: ops, selection, megatron Qwen3, the trainer, checkpoints, on one CUDA device.

    make gpu-check                              # on the GPU machine, offline (tools/gpu_check.py)
    .venv/bin/python -m pytest tests/test_gpu.py                          # skipped without CUDA
    MEGAFORK_CHECK_DEVICE=cpu .venv/bin/python -m pytest tests/test_gpu.py   # CPU rehearsal

What runs on the device, and what it is compared with:
* the three LM-head ops in fp32 and bf16, values and gradients, against float64 on the CPU; for
  a bf16 weight, fp32 logits and the weight gradient in an fp32 main_grad at fp32-level error;
* the radix threshold and the forking mask against `torch.topk` on the same tensors;
* megafork's megatron-core Qwen3 (local spec; TE's when transformer-engine imports) through the
  trainer's old pass and `train_minibatches`, NCCL at world size 1, against the same steps on
  CPU ranks (gloo, CUDA hidden): entropies, loss sums and every gradient;
* TP=2 as two processes sharing the one GPU over gloo, against the same CPU result;
* the trainer on examples/configs/tiny_cpu.yaml (tiny model, embedded engine) for 2 steps on the
  device, checkpointing after step 1; a run resumed from that checkpoint must repeat step 2.

With MEGAFORK_CHECK_DEVICE=cpu every check runs on the CPU at small sizes: the rehearsal that
`make test` runs (tests/test_gpu_check.py) so the logic is known to work before a GPU sees it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafork.algo.loss import dapo_policy_loss
from megafork.forking import select_forking_tokens, topk_threshold
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss, vocab_parallel_logprobs_entropy
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.testing.toy_prompts import write_sum_prompts

DEVICE = os.environ.get("MEGAFORK_CHECK_DEVICE", "cuda")
REHEARSAL = DEVICE == "cpu"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
# Relative error (norm of the difference / norm of the reference) allowed against float64.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _head_inputs(dtype, seed=0, t=300, h=64, v_pad=512, vocab=500):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    weight = (0.3 * torch.randn(v_pad, h, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (t,), generator=g)
    return g, hidden, weight, labels, vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprob_entropy_ops_and_grads_match_float64(dtype):
    g, hidden, weight, labels, vocab = _head_inputs(dtype)
    g_lp, g_ent = torch.randn(len(labels), generator=g), torch.randn(len(labels), generator=g)
    # float64 reference on the same (rounded) inputs
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = torch.log_softmax((h64 @ w64.T)[:, :vocab], -1)
    want_lp, want_ent = logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    (g_lp.double() * want_lp + g_ent.double() * want_ent).sum().backward()
    dev = torch.device(DEVICE)
    h, w = hidden.to(dev, copy=True).requires_grad_(), weight.to(dev, copy=True).requires_grad_()
    lp, ent = fused_head_logprobs_entropy(h, w, labels.to(dev), vocab_size=vocab, chunk_size=64)
    (g_lp.to(dev) * lp + g_ent.to(dev) * ent).sum().backward()
    tol = TOL[dtype]
    for name, got, want in (("logprob", lp, want_lp), ("entropy", ent, want_ent), ("d hidden", h.grad, h64.grad),
                            ("d weight", w.grad, w64.grad)):
        assert _rel(got, want) < tol, f"fused head {name} ({dtype}): relative error {_rel(got, want):.2e}"
    # vocab-parallel op from materialised logits, gradient w.r.t. the logits
    z64 = (hidden.double() @ weight.double().T).requires_grad_()
    logp = torch.log_softmax(z64[:, :vocab], -1)
    ref_lp, ref_ent = logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    (g_lp.double() * ref_lp + g_ent.double() * ref_ent).sum().backward()
    z = (hidden.to(dev) @ weight.to(dev).T).detach().requires_grad_()
    lp2, ent2 = vocab_parallel_logprobs_entropy(z, labels.to(dev), vocab_size=vocab)
    (g_lp.to(dev) * lp2 + g_ent.to(dev) * ent2).sum().backward()
    for name, got, want in (("logprob", lp2, ref_lp), ("entropy", ent2, ref_ent), ("d logits", z.grad, z64.grad)):
        assert _rel(got, want) < tol, f"vocab-parallel {name} ({dtype}): relative error {_rel(got, want):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rho", [1.0, 0.2])
def test_fused_policy_head_and_grads_match_float64(dtype, rho):
    g, hidden, weight, labels, vocab = _head_inputs(dtype, seed=1, t=256, v_pad=384, vocab=384)
    t = len(labels)
    old = torch.randn(t, generator=g) - 5.0
    adv = torch.randn(t, generator=g)
    mask = torch.rand(t, generator=g) < rho
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = torch.log_softmax(h64 @ w64.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    ref, _ = dapo_policy_loss(lp, old.double(), adv.double(), mask, clip_ratio_c=10.0, normalizer=float(t))
    ref.backward()
    dev = torch.device(DEVICE)
    h, w = hidden.to(dev, copy=True).requires_grad_(), weight.to(dev, copy=True).requires_grad_()
    loss, _ = fused_head_policy_loss(h, w, labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                     clip_ratio_c=10.0, normalizer=float(t), chunk_size=64)
    loss.backward()
    tol = TOL[dtype]
    assert abs(float(loss) - float(ref)) <= tol * max(abs(float(ref)), 1e-3), (float(loss), float(ref))
    assert _rel(h.grad, h64.grad) < tol and _rel(w.grad, w64.grad) < tol, (_rel(h.grad, h64.grad),
                                                                           _rel(w.grad, w64.grad))


def test_bf16_head_fp32_logits_and_main_grad():
    """bf16 weight: fp32 logits (mm with out_dtype on CUDA), dW into an fp32 main_grad far below bf16 error."""
    g, hidden, weight, labels, vocab = _head_inputs(torch.bfloat16, seed=3, t=512, v_pad=512, vocab=500)
    t = len(labels)
    old, adv = torch.randn(t, generator=g) - 5.0, torch.randn(t, generator=g)
    mask = torch.rand(t, generator=g) < 0.3
    w64 = weight.double().requires_grad_()
    lp_ref = torch.log_softmax((hidden.double() @ w64.T)[:, :vocab], -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref,) = torch.autograd.grad(dapo_policy_loss(lp_ref, old.double(), adv.double(), mask, normalizer=t)[0], w64)
    dev = torch.device(DEVICE)
    w = torch.nn.Parameter(weight.to(dev))
    w.main_grad, w.grad_added_to_main_grad = torch.zeros(w.shape, device=dev), False  # megatron DDP's attributes
    loss, metrics = fused_head_policy_loss(hidden.to(dev), w, labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                           vocab_size=vocab, normalizer=t, chunk_size=128)
    loss.backward()
    lp_err = float((metrics["logprobs"].double().cpu() - lp_ref.detach()).abs().max())
    assert lp_err < 1e-4, f"log-probs off by {lp_err:.2e}: the logits were not fp32"
    bf16_err, err = _rel(ref.to(torch.bfloat16), ref), _rel(w.main_grad, ref)
    assert w.grad_added_to_main_grad and err < 1e-2 * bf16_err, f"main_grad {err:.2e}, bf16 rounding {bf16_err:.2e}"


@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_radix_threshold_and_mask_match_topk(ratio):
    n = 1 << (16 if REHEARSAL else 22)
    g = torch.Generator().manual_seed(2)
    dev = torch.device(DEVICE)
    ent = (torch.rand(n, generator=g) ** 8 * 3.0).to(dev)
    ent[: n // 64] = 0.5  # ties at one value
    mask = (torch.rand(n, generator=g) < 0.9).to(dev)
    valid = ent[mask]
    k = math.ceil(ratio * valid.numel())
    want = float(torch.topk(valid, k).values[-1])
    assert topk_threshold(ent, mask, ratio) == want
    sel = select_forking_tokens(ent, mask, ratio)
    assert sel.device == ent.device and torch.equal(sel, mask & (ent >= want))


# --- megatron-core Qwen3 through the trainer's update on the device ------------------------------

def _trajectories():
    from megafork.train.batch import Trajectory

    g = torch.Generator().manual_seed(21)
    out = []
    for i in range(8):
        p, n = 3 + i % 2, 4 + (3 * i) % 9
        ids = torch.randint(3, 98, (p + n,), generator=g).tolist()
        out.append(Trajectory(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[-1.0] * n, reward=0.0,
                              accuracy=0.0, advantage=(1.0 if i % 2 else -1.0) * (0.5 + 0.25 * i), group=i // 2))
    return out


def _update_worker(rank, world, hf_dir, tp, backend):
    """One optimizer step of `train_minibatches` (all response tokens, so no threshold tie can
    make devices differ); returns the old-pass entropies, the loss sums and the HF-named grads."""
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, export_hf_tensors, load_hf_weights
    from megafork.models.qwen3.config import read_hf_config, te_available
    from megafork.pipeline import PolicyLossConfig
    from megafork.train.config import ForkingConfig, OptimConfig
    from megafork.train.optim import build_optimizer, enable_per_token_loss, wrap_ddp
    from megafork.train.packing import PackingSpec, pack_minibatches
    from megafork.train.update import old_pass, select, train_minibatches

    groups = init_distributed(ParallelConfig(tp=tp, backend=backend))
    hf = read_hf_config(hf_dir)
    model = build_qwen3(hf, Qwen3BuildOptions(dtype="fp32"), groups)  # spec auto: TE when it imports
    load_hf_weights(model, hf_dir, groups)
    enable_per_token_loss(model)
    chunks = [wrap_ddp(model, groups)]
    optimizer, _ = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=1e6), chunks,
                                   total_steps=10, groups=groups)
    mbs, spans = pack_minibatches([_trajectories()], PackingSpec(micro_batch_size=2, pad_id=0,
                                                                 multiple=128 if groups.device.type == "cuda" else 1))
    old_pass(chunks, mbs, groups, hf.vocab_size, temperature=1.0, chunk_size=32)
    select(mbs, ForkingConfig(mode="all"), spans, groups, seed=0)
    sums = train_minibatches(chunks, optimizer, mbs, spans, PolicyLossConfig(), groups, hf.vocab_size)
    grads = {n: t.cpu() for n, t in export_hf_tensors(model, groups, source=lambda p: p.main_grad)}
    entropy = [mb.entropy[mb.response_mask.to(mb.entropy.device)].cpu() for mb in mbs]
    return {"device": str(groups.device), "te": te_available(), "sums": sums, "grads": grads, "entropy": entropy,
            "backend": torch.distributed.get_backend()}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return str(make_tiny_qwen3(tmp_path_factory.mktemp("gpu") / "hf", seed=8, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def cpu_update(tiny_hf):
    return run_ranks(_update_worker, 1, args=(tiny_hf, 1, "auto"), init_process_group=False, timeout=300,
                     device="cpu")[0]


def _compare_update(got, want, what):
    assert set(got["grads"]) == set(want["grads"])
    for a, b in zip(got["entropy"], want["entropy"]):
        assert _rel(a, b) < 1e-4, f"{what}: old-pass entropy differs"
    for key in ("loss_sum", "normalizer", "selected", "response_tokens"):
        assert abs(got["sums"][key] - want["sums"][key]) <= 1e-4 * max(abs(want["sums"][key]), 1.0), (what, key)
    for name, g in want["grads"].items():
        assert _rel(got["grads"][name], g) < 1e-3, f"{what}: gradient of {name} differs by {_rel(got['grads'][name], g):.2e}"


def test_megatron_qwen3_update_on_device_matches_cpu(tiny_hf, cpu_update):
    got = run_ranks(_update_worker, 1, args=(tiny_hf, 1, "auto"), init_process_group=False, timeout=300,
                    device=DEVICE)[0]
    assert got["device"].startswith(DEVICE) and got["backend"] == ("gloo" if REHEARSAL else "nccl")
    assert cpu_update["device"] == "cpu" and cpu_update["sums"]["response_tokens"] > 0
    _compare_update(got, cpu_update, f"{DEVICE} world size 1 (TE spec: {got['te']})")


def test_tp2_two_processes_on_one_device_over_gloo(tiny_hf, cpu_update):
    ranks = run_ranks(_update_worker, 2, args=(tiny_hf, 2, "gloo"), init_process_group=True, timeout=300,
                      device=DEVICE)
    assert [r["device"] for r in ranks] == [ranks[0]["device"]] * 2 and ranks[0]["device"].startswith(DEVICE)
    _compare_update(ranks[0], cpu_update, f"TP=2 on one {DEVICE}")  # rank 0 holds the exported grads


# --- the trainer ----------------------------------------------------------------------------------

def has_digit(response: str, answer: str) -> float:
    """Reward (data.reward=test_gpu:has_digit): +1 when the response holds a digit, about half of a
    random char-level model's answers, so advantages are non-zero and the updates move the weights."""
    return 1.0 if any(c.isdigit() for c in response) else -1.0


def _train(run_dir: Path, hf: Path, data: Path, *overrides: str) -> list[dict]:
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    if REHEARSAL:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "megafork", "train", "--config", str(REPO / "examples/configs/tiny_cpu.yaml"),
           f"model.hf_path={hf}", f"data.train_path={data}", "eval.path=", "parallel.tp=1", "parallel.backend=auto",
           "train.prompts_per_step=4", "train.minibatch_prompts=2", "train.micro_batch_size=4", "algo.n=4",
           "algo.dynamic_sampling=false", "rollout.batch_size=16", "data.reward=test_gpu:has_digit",
           "log.tensorboard=false", "log.entropy_dump_every=0", f"log.dir={run_dir.parent}",
           f"log.run_name={run_dir.name}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"megafork train failed ({run_dir.name}):\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_two_steps_on_device_then_resume_repeats_step_two(tmp_path):
    hf = make_tiny_qwen3(tmp_path / "hf", seed=0)
    data = tmp_path / "train.jsonl"
    write_sum_prompts(data, 6)
    straight = _train(tmp_path / "runs/straight", hf, data, "train.steps=2", "train.save_every=1",
                      "train.resume=none", "train.seed=3")
    assert [r["step"] for r in straight] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in straight), straight
    ckpt = tmp_path / "runs/straight/checkpoints/step_0000001"
    assert ckpt.is_dir(), f"no step-1 checkpoint: {sorted(p.name for p in ckpt.parent.iterdir())}"
    resumed = _train(tmp_path / "runs/resumed", hf, data, "train.steps=2", "train.save_every=0",
                     f"train.resume={ckpt}", "train.seed=3")
    assert [r["step"] for r in resumed] == [2], resumed
    # Same weights, sampler and RNG state after the resume: the same rollouts and the same update.
    for key in ("reward_mean", "accuracy", "response_len_mean", "selected_count"):
        assert resumed[0][key] == straight[1][key], (key, resumed[0][key], straight[1][key])
    assert abs(resumed[0]["loss"] - straight[1]["loss"]) <= 1e-4 * max(abs(straight[1]["loss"]), 1e-3)
