"""The trainer's step internals: old pass, forking selection by scope, mini-batch updates, bad input.

    .venv/bin/python -m pytest tests/test_train_update.py -q

On two gloo ranks (DP=2, megafork's Qwen3 with megatron DDP + Adam, as `build_run` wires it):
- `select` produces the documented masks: scope "step" is `entropy >= τ` with τ the exact k-th
  largest over every response token of both ranks (checked against torch.topk on the gathered
  entropies), "minibatch" the same per mini-batch, "microbatch" per micro-batch index; mode
  "bottom", "random" and "all" are checked too;
- after `train_minibatches` the gradients in DDP's main_grad, the grad norm and the loss equal a
  float64 transformers reference at the same weights: mode "all" + normalizer "all_tokens" is
  plain DAPO over every response token; mode "top" trains on the selected tokens only; scope
  "local" keeps exactly ceil(ρ·N_mb) tokens per micro-batch by torch.topk on the entropy of the
  training pass;
- a micro-batch that skipped selection (no fork_mask) is an error naming the field.
One process: `pack_microbatches`, `split_for_dp` and `_check_layout` errors.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megafork.algo.loss import dapo_policy_loss
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.train.batch import Trajectory, pack_microbatches
from megafork.train.packing import PackingSpec, pack_minibatches
from megafork.train.shard import split_for_dp

N, GROUPS, RATIO = 2, 4, 0.2  # responses per prompt, prompts in the step, forking ratio
CLIP = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0)


def _trajectories() -> list[Trajectory]:
    """GROUPS prompt groups of N responses, lengths 2..9, advantages of both signs."""
    g = torch.Generator().manual_seed(21)
    out = []
    for i in range(GROUPS * N):
        p, n = 3 + i % 2, 2 + (3 * i) % 8
        ids = torch.randint(3, 98, (p + n,), generator=g).tolist()
        out.append(Trajectory(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[-1.0] * n, reward=0.0,
                              accuracy=0.0, advantage=(1.0 if i % 2 else -1.0) * (0.5 + 0.25 * i), group=i // N))
    return out


def _masks(mbs, field):
    return [getattr(mb, field).clone() for mb in mbs]


def _update_worker(rank, world, hf_dir):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import (
        Qwen3BuildOptions,
        build_qwen3,
        export_hf_tensors,
        load_hf_weights,
        read_hf_config,
    )
    from megafork.pipeline import PolicyLossConfig
    from megafork.train.config import ForkingConfig, OptimConfig
    from megafork.train.optim import build_optimizer, enable_per_token_loss, wrap_ddp
    from megafork.train.update import old_pass, select, train_minibatches

    groups = init_distributed(ParallelConfig(tp=1))
    hf = read_hf_config(hf_dir)
    model = build_qwen3(hf, Qwen3BuildOptions(dtype="fp32"), groups)
    load_hf_weights(model, hf_dir, groups)
    enable_per_token_loss(model)
    chunks = [wrap_ddp(model, groups)]
    # grad_clip far above the norm: megatron then reports the norm but leaves main_grad unscaled.
    optim = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=1e6)
    optimizer, _ = build_optimizer(optim, chunks, total_steps=10, groups=groups)

    # Two mini-batches of two prompts; each rank takes one prompt (2 responses) of each, one
    # response per micro-batch: 4 micro-batches per rank.
    shares = split_for_dp(_trajectories(), N, minibatch_prompts=2, dp_size=groups.dp_size)
    mbs, spans = pack_minibatches(shares[groups.dp_rank], PackingSpec(micro_batch_size=1))
    old_pass(chunks, mbs, groups, hf.vocab_size, temperature=1.0, chunk_size=None)
    out = {"spans": spans, "entropy": _masks(mbs, "entropy"), "response": _masks(mbs, "response_mask"),
           "select": {}}
    for scope, mode in (("step", "top"), ("minibatch", "top"), ("microbatch", "top"), ("step", "bottom"),
                        ("step", "random"), ("step", "all")):
        tau = select(mbs, ForkingConfig(ratio=RATIO, mode=mode, scope=scope), spans, groups, seed=7)
        out["select"][scope, mode] = (tau, _masks(mbs, "fork_mask"))
    assert math.isnan(select(mbs, ForkingConfig(ratio=RATIO, scope="local"), spans, groups, seed=7))

    one_minibatch = [list(range(len(mbs)))]
    for mb in mbs:
        mb.fork_mask = None
    try:
        train_minibatches(chunks, optimizer, mbs, one_minibatch, PolicyLossConfig(), groups, hf.vocab_size)
        out["no_fork_mask"] = None
    except ValueError as e:
        out["no_fork_mask"] = str(e)

    # Each case: weights before, then one update; main_grad keeps that update's gradient.
    out["cases"] = []
    for name, forking, loss_cfg in (
        ("all", ForkingConfig(mode="all"), PolicyLossConfig(normalizer="all_tokens")),
        ("top", ForkingConfig(ratio=RATIO), PolicyLossConfig(normalizer="all_tokens")),
        ("top_selected", ForkingConfig(ratio=RATIO), PolicyLossConfig(normalizer="selected_tokens")),
        ("local", ForkingConfig(ratio=RATIO, scope="local"), PolicyLossConfig(local_ratio=RATIO)),
    ):
        params = dict(export_hf_tensors(model, groups))
        old_pass(chunks, mbs, groups, hf.vocab_size, temperature=1.0, chunk_size=None)
        for i, mb in enumerate(mbs):  # old log-probs off the current policy, so that the clip matters
            g = torch.Generator().manual_seed(100 * rank + i)
            mb.old_logprobs = mb.old_logprobs + 0.2 * torch.randn(mb.old_logprobs.shape, generator=g)
        select(mbs, forking, one_minibatch, groups, seed=0)
        sums = train_minibatches(chunks, optimizer, mbs, one_minibatch, loss_cfg, groups, hf.vocab_size)
        grads = dict(export_hf_tensors(model, groups, source=lambda p: p.main_grad))
        out["cases"].append({
            "name": name, "params": params, "grads": grads, "sums": sums,
            "mbs": [(mb.tokens, mb.labels, mb.response_mask, mb.advantages, mb.old_logprobs, mb.fork_mask,
                     mb.entropy) for mb in mbs]})
    return out


def _check_selection(ranks):
    ent = [r["entropy"] for r in ranks]
    resp = [r["response"] for r in ranks]
    spans = ranks[0]["spans"]
    assert spans == ranks[1]["spans"] and len(spans) == 2 and len(ent[0]) == 4

    def expected(mb_ids, largest=True):
        """Per rank, per micro-batch: resp & (H >= k-th largest) over the micro-batches `mb_ids` of both ranks."""
        vals = torch.cat([ent[r][i][resp[r][i]] for r in range(2) for i in mb_ids])
        k = math.ceil(RATIO * vals.numel())
        tau = float(torch.topk(vals, k, largest=largest).values[-1])
        cmp = (lambda e: e >= tau) if largest else (lambda e: e <= tau)
        return tau, {(r, i): resp[r][i] & cmp(ent[r][i]) for r in range(2) for i in mb_ids}

    def got(scope, mode):
        return {(r, i): ranks[r]["select"][scope, mode][1][i] for r in range(2) for i in range(4)}

    tau, want = expected(range(4))
    assert ranks[0]["select"]["step", "top"][0] == ranks[1]["select"]["step", "top"][0] == tau
    for key, mask in got("step", "top").items():
        assert torch.equal(mask, want[key]), ("step", key)
    want_bottom = expected(range(4), largest=False)[1]
    for key, mask in got("step", "bottom").items():
        assert torch.equal(mask, want_bottom[key]), ("step bottom", key)
    for span in spans:
        want_span = expected(span)[1]
        for key, mask in want_span.items():
            assert torch.equal(got("minibatch", "top")[key], mask), ("minibatch", key)
    for i in range(4):
        for key, mask in expected([i])[1].items():
            assert torch.equal(got("microbatch", "top")[key], mask), ("microbatch", key)
    n_resp = sum(int(m.sum()) for r in resp for m in r)
    random_sel = got("step", "random")
    assert sum(int(m.sum()) for m in random_sel.values()) == math.ceil(RATIO * n_resp)
    assert all(not (m & ~resp[r][i]).any() for (r, i), m in random_sel.items())
    assert all(torch.equal(m, resp[r][i]) for (r, i), m in got("step", "all").items())
    # Scopes differ on this data (otherwise the checks above could not tell them apart).
    assert any(not torch.equal(got("step", "top")[k], got("microbatch", "top")[k]) for k in want)
    assert any(not torch.equal(got("step", "top")[k], got("minibatch", "top")[k]) for k in want)


def _reference(hf_dir, case, parts):
    """float64 loss, gradients and their norm at the case's weights, for its mask and normaliser."""
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    missing, unexpected = ref.load_state_dict({k: v.double() for k, v in case["params"].items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    n_resp = sum(int(p[2].sum()) for p in parts)
    masks = []
    for _, _, resp, _, _, fork, ent in parts:
        if case["name"] == "all":
            masks.append(resp)
        elif case["name"] == "local":  # exactly ceil(ρ N_mb) by torch.topk on the training-pass entropy
            idx = resp.reshape(-1).nonzero().reshape(-1)
            k = math.ceil(RATIO * idx.numel())
            m = torch.zeros(resp.numel(), dtype=torch.bool)
            m[idx[torch.topk(ent.reshape(-1)[idx], k).indices]] = True
            masks.append(m.view_as(resp))
        else:
            masks.append(fork & resp)
    norm = sum(int(m.sum()) for m in masks) if case["name"] == "top_selected" else n_resp
    total = 0.0
    for (tokens, labels, _, adv, old, _, _), mask in zip(parts, masks):
        lp = torch.log_softmax(ref(tokens).logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss, _ = dapo_policy_loss(lp, old.double(), adv.double(), mask, normalizer=norm, **CLIP)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad for n, p in ref.named_parameters()}
    grad_norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    return total, grads, grad_norm, sum(int(m.sum()) for m in masks), n_resp


def test_selection_scopes_and_updates_on_two_ranks(tmp_path):
    hf_dir = str(make_tiny_qwen3(tmp_path / "hf", seed=8))
    ranks = run_ranks(_update_worker, 2, args=(hf_dir,), timeout=300)
    _check_selection(ranks)
    assert ranks[0]["no_fork_mask"] and "fork_mask" in ranks[0]["no_fork_mask"]

    grads_by_case = {}
    for c0, c1 in zip(ranks[0]["cases"], ranks[1]["cases"]):
        name = c0["name"]
        want_loss, want, want_norm, n_sel, n_resp = _reference(hf_dir, c0, c0["mbs"] + c1["mbs"])
        sums = {k: c0["sums"].get(k, 0.0) + c1["sums"].get(k, 0.0) for k in c0["sums"]}
        assert sums["selected"] == n_sel and sums["response_tokens"] == n_resp, name
        assert sums["normalizer"] == (n_sel if name == "top_selected" else n_resp), name
        if name == "all":
            assert n_sel == n_resp
        else:
            assert math.ceil(RATIO * n_resp) <= n_sel < 0.35 * n_resp, (name, n_sel, n_resp)
        got_loss = sums["loss_sum"] / sums["normalizer"]
        assert abs(got_loss - want_loss) < 1e-5 * abs(want_loss), (name, got_loss, want_loss)
        assert abs(c0["sums"]["grad_norm"] - want_norm) < 1e-5 * want_norm, (name, c0["sums"]["grad_norm"], want_norm)
        assert set(c0["grads"]) == set(want) - {"lm_head.weight"}, name
        for pname, g in c0["grads"].items():
            err = float((g.double() - want[pname]).abs().max() / want[pname].abs().max())
            assert err < 1e-5, f"{name}: grad {pname} relative error {err:.2e}"
        grads_by_case[name] = c0["grads"]
    # The selected-token update is a different gradient from the all-token one.
    emb = "model.embed_tokens.weight"
    assert not torch.allclose(grads_by_case["all"][emb], grads_by_case["top"][emb], rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# Bad input, one process.

def _traj(n_resp=3, n_lp=None, p=2):
    return Trajectory(prompt_ids=list(range(3, 3 + p)), response_ids=list(range(10, 10 + n_resp)),
                      rollout_logprobs=[-1.0] * (n_resp if n_lp is None else n_lp), reward=1.0, accuracy=1.0)


def test_pack_microbatches_layout():
    mbs = pack_microbatches([_traj(3, p=2), _traj(1, p=4), _traj(2)], micro_batch_size=2, pad_id=0)
    assert [mb.tokens.shape for mb in mbs] == [torch.Size([2, 5]), torch.Size([1, 4])]
    # Label position p-1+j holds response token j.
    assert mbs[0].response_mask[0].tolist() == [False, True, True, True, False]
    assert mbs[0].labels[0, 1:4].tolist() == [10, 11, 12]
    assert mbs[0].response_mask[1].tolist() == [False, False, False, True, False]


def test_pack_pads_lengths_to_a_multiple():
    trajs = [_traj(3, p=2), _traj(1, p=4), _traj(2)]
    plain = pack_microbatches(trajs, micro_batch_size=2, pad_id=7)
    padded, spans = pack_minibatches([trajs[:2], trajs[2:]], PackingSpec(micro_batch_size=2, pad_id=7, multiple=8))
    assert [mb.tokens.shape for mb in padded] == [torch.Size([2, 8]), torch.Size([1, 8])] and spans == [[0], [1]]
    for p, q in zip(plain[:1], padded[:1]):
        s = p.tokens.shape[1]
        for field in ("tokens", "labels", "response_mask", "advantages", "rollout_logprobs"):
            assert torch.equal(getattr(q, field)[:, :s], getattr(p, field)), field
        assert (q.tokens[:, s:] == 7).all() and not q.response_mask[:, s:].any() and (q.labels[:, s:] == 0).all()
        assert q.position_ids[0].tolist() == list(range(8))
    with pytest.raises(ValueError, match="train.pad_multiple: expected >= 1 once resolved, found 0"):
        pack_microbatches(trajs, 2, pad_multiple=0)


def test_pad_multiple_auto_is_128_on_gpu_only():
    from megafork.train.setup import Run

    assert Run.resolve_pad_multiple(0, torch.device("cuda", 0)) == 128
    assert Run.resolve_pad_multiple(0, torch.device("cpu")) == 1
    assert Run.resolve_pad_multiple(256, torch.device("cpu")) == 256


def test_microbatches_move_to_the_device_one_at_a_time(monkeypatch):
    from megafork.train.batch import MicroBatch
    from megafork.train.update import to_device_one_at_a_time

    mbs = pack_microbatches([_traj(), _traj(2), _traj(3)], micro_batch_size=1)
    moved = []
    real_to = MicroBatch.to
    monkeypatch.setattr(MicroBatch, "to", lambda self, device: moved.append(self) or real_to(self, device))
    it = to_device_one_at_a_time(mbs, torch.device("meta"))
    assert moved == []
    first = next(it)
    assert [id(m) for m in moved] == [id(mbs[0])] and first.tokens.device.type == "meta"
    assert all(mb.tokens.device.type == "cpu" for mb in mbs), "the host copies stay on the host"
    assert [mb.tokens.shape for mb in it] == [mb.tokens.shape for mb in mbs[1:]]
    assert [id(m) for m in moved] == [id(m) for m in mbs]


@pytest.mark.parametrize("trajs, mbs, match", [
    ([_traj()], 0, r"train.micro_batch_size: expected >= 1, found 0"),
    ([_traj(), _traj(), _traj(0)], 2, r"trajectory 2: expected at least one response token"),
    ([_traj(), _traj(3, n_lp=2)], 1, r"trajectory 1: expected one rollout log-prob per response token \(3\), found 2"),
    ([_traj(), _traj(p=0)], 2, r"trajectory 1: expected at least one prompt token"),
], ids=["micro_batch_size_0", "empty_response", "logprob_count", "empty_prompt"])
def test_pack_microbatches_errors(trajs, mbs, match):
    with pytest.raises(ValueError, match=match):
        pack_microbatches(trajs, mbs)


def test_split_for_dp_with_fewer_groups_than_dp_ranks_trains_on_nothing():
    trajs = [_traj() for _ in range(3 * N)]  # 3 groups over dp=2: one group dropped, not one rank idle
    shares = split_for_dp(trajs, N, minibatch_prompts=2, dp_size=2)
    assert shares == [[trajs[:N]], [trajs[N:2 * N]]]
    lone = split_for_dp(trajs[:N], N, minibatch_prompts=2, dp_size=2)
    for share in lone:
        assert pack_minibatches(share, PackingSpec(micro_batch_size=2)) == ([], [])


def _cfg(**train):
    from megafork.train.config import Config, TrainConfig

    cfg = Config()
    cfg.train = TrainConfig(**{"prompts_per_step": 8, "minibatch_prompts": 4, **train})
    return cfg


def test_check_layout_errors_name_the_field():
    from megafork.train.config import ConfigError, ForkingConfig
    from megafork.train.setup import _check_layout

    with pytest.raises(ValueError, match=r"train.minibatch_prompts: expected a multiple of the data-parallel size 2, "
                                         r"found 3"):
        _check_layout(_cfg(minibatch_prompts=3, prompts_per_step=6), SimpleNamespace(dp_size=2, cp_size=1))
    with pytest.raises(ConfigError, match=r"forking.mode: expected 'top' or 'bottom' with scope 'local'.*'random'"):
        ForkingConfig(scope="local", mode="random")
    with pytest.raises(ValueError, match=r"split_for_dp: expected whole groups of algo.n=4 trajectories, found 6"):
        split_for_dp([None] * 6, 4, minibatch_prompts=2, dp_size=1)
    with pytest.raises(ValueError, match=r"parallel.cp: expected 1 .*found 2"):
        _check_layout(_cfg(), SimpleNamespace(dp_size=1, cp_size=2))
    _check_layout(_cfg(), SimpleNamespace(dp_size=2, cp_size=1))  # the good layout passes
