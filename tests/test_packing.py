"""Variable-length micro-batches: token-budget packing, DP balance, equal micro-batch counts.

    .venv/bin/python -m pytest tests/test_packing.py -q

On two gloo ranks, megafork's Qwen3 (fp32, megatron DDP + Adam as `build_run` wires it) runs the
old pass and one update through `megafork.train.update` for several layouts of the same step:
padded rows (micro_batch_size 2), packed rows under a token budget, and both with DP balance.
Every layout's per-response log-probs and entropies, the step's loss and the gradients in
DDP's main_grad are compared with a float64 transformers reference that runs each sequence
alone (unpacked, unpadded): at DP=2, at TP=2 (packed rows padded at their end to a multiple of
TP) and at PP=2. At DP=2 the lengths are skewed so that balancing gives the ranks different
sequence counts: they still run the same number of micro-batches (empty ones on the lighter
rank), and balance on or off gives the same loss and gradients. The optimizer's lr is 1e-30,
below the weights' ulp, so every layout sees the same weights.

One process: first-fit decreasing, Karmarkar–Karp / LPT, the packed row's layout, the
block-diagonal mask and per-sequence RoPE against megatron's own unpacked path, and bad input.
"""
from __future__ import annotations

import math

import pytest
import torch

from megafork.algo.loss import dapo_policy_loss
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.train.balance import balance_partition, sequence_cost
from megafork.train.batch import Trajectory, pack_row
from megafork.train.packing import PackingSpec, first_fit_decreasing, pack_minibatches

N = 2  # responses per prompt
CLIP = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0)
ID0 = 60  # trajectory i's prompt starts with token ID0 + i, so packed rows can be traced back


def _shapes(skewed: bool) -> list[tuple[int, int]]:
    """(prompt, response) lengths of 4 groups x N; `skewed`: one response as long as all the others."""
    if skewed:
        return [(5, 50), (3, 4), (3, 4), (2, 3), (4, 2), (3, 5), (2, 6), (3, 3)]
    return [(3 + i % 3, 2 + (5 * i) % 9) for i in range(4 * N)]


def _trajectories(hf_dir, skewed: bool) -> tuple[list[Trajectory], list[dict]]:
    """Trajectories with old log-probs near the reference's, and the float64 reference per sequence."""
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    trajs, refs = [], []
    for i, (p, n) in enumerate(_shapes(skewed)):
        ids = torch.randint(3, ID0, (p + n,), generator=g)
        ids[0] = ID0 + i
        with torch.no_grad():
            logits = ref(ids.unsqueeze(0)).logits[0]
        logp = torch.log_softmax(logits, -1)
        lp = logp[p - 1:p - 1 + n].gather(-1, ids[p:].unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)[p - 1:p - 1 + n]
        old = (lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
        trajs.append(Trajectory(prompt_ids=ids[:p].tolist(), response_ids=ids[p:].tolist(), rollout_logprobs=old,
                                reward=0.0, accuracy=0.0, advantage=(1.0 if i % 3 else -0.8) * (0.4 + 0.2 * i),
                                group=i // N))
        refs.append({"logprobs": lp, "entropy": ent})
    return trajs, refs


def _reference_update(hf_dir, trajs) -> tuple[float, dict]:
    """float64 DAPO over every response token / the global count, each sequence run alone."""
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    norm = sum(len(t.response_ids) for t in trajs)
    total = 0.0
    for t in trajs:
        ids = torch.tensor(list(t.prompt_ids) + list(t.response_ids)).unsqueeze(0)
        p, n = len(t.prompt_ids), len(t.response_ids)
        logp = torch.log_softmax(ref(ids).logits[0], -1)
        lp = logp[p - 1:p - 1 + n].gather(-1, ids[0, p:].unsqueeze(-1)).squeeze(-1)
        mask = torch.ones(n, dtype=torch.bool)
        loss, _ = dapo_policy_loss(lp, torch.as_tensor(t.rollout_logprobs).double(),
                                   torch.full((n,), t.advantage, dtype=torch.float64), mask, normalizer=norm, **CLIP)
        loss.backward()
        total += float(loss.detach())
    return total, {k: p.grad for k, p in ref.named_parameters()}


def _per_sequence(mbs, field) -> dict[int, torch.Tensor]:
    """{trajectory index: its response tokens' values of `field`} from padded or packed micro-batches."""
    out = {}
    for mb in mbs:
        rows, cols, seq = mb.response_ids()
        vals = getattr(mb, field)[rows, cols]
        starts = mb.cu_seqlens[:-1].long() if mb.packed else None
        for s in seq.unique().tolist():
            first = mb.tokens[0, int(starts[s])] if mb.packed else mb.tokens[s, 0]
            out[int(first) - ID0] = vals[seq == s].cpu()
    return out


def _layout_worker(rank, world, hf_dir, trajs, tp, pp, layouts):
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
    from megafork.train.shard import split_for_dp
    from megafork.train.update import old_pass, select, train_minibatches

    groups = init_distributed(ParallelConfig(tp=tp, pp=pp))
    hf = read_hf_config(hf_dir)
    model = build_qwen3(hf, Qwen3BuildOptions(dtype="fp32"), groups)
    load_hf_weights(model, hf_dir, groups)
    model.config.variable_seq_lengths = pp > 1
    enable_per_token_loss(model)
    chunks = [wrap_ddp(model, groups)]
    # lr below the weights' ulp: every layout sees the same weights; grad_clip far above the norm.
    optim = OptimConfig(lr=1e-30, warmup_steps=0, weight_decay=0.0, grad_clip=1e6)
    optimizer, _ = build_optimizer(optim, chunks, total_steps=10, groups=groups)
    out = {}
    for name, spec, balance in layouts:
        shares = split_for_dp(trajs, N, minibatch_prompts=4, dp_size=groups.dp_size, balance=balance)
        mbs, spans = pack_minibatches(shares[groups.dp_rank], spec, groups.dp, groups.device)
        old_pass(chunks, mbs, groups, hf.vocab_size, temperature=1.0, chunk_size=None)
        res = {"n_seq": len(shares[groups.dp_rank][0]), "n_mb": len(mbs), "spans": spans,
               "empty": sum(mb.real_tokens == 0 for mb in mbs), "packed": [mb.packed for mb in mbs]}
        if groups.is_last_stage:
            res["logprobs"], res["entropy"] = _per_sequence(mbs, "old_logprobs"), _per_sequence(mbs, "entropy")
        for mb in mbs:
            mb.old_logprobs = mb.rollout_logprobs  # the trajectories' old log-probs, whatever the layout
        select(mbs, ForkingConfig(mode="all"), spans, groups, seed=0)
        res["sums"] = train_minibatches(chunks, optimizer, mbs, spans, PolicyLossConfig(), groups, hf.vocab_size)
        res["grads"] = dict(export_hf_tensors(model, groups, source=lambda p: p.main_grad))
        out[name] = res
    return out


def _check_layouts(ranks, trajs, refs, want_loss, want_grads, last_stage_ranks, dp_ranks=None):
    """`last_stage_ranks` hold per-token results; `dp_ranks`, one per DP replica, the loss sums."""
    dp_ranks = last_stage_ranks if dp_ranks is None else dp_ranks
    for name in ranks[0]:
        for r in last_stage_ranks:
            for field in ("logprobs", "entropy"):
                for i, got in ranks[r][name][field].items():
                    want = refs[i][field]
                    err = float((got.double() - want).abs().max())
                    assert err < 2e-5, f"{name}: {field} of trajectory {i} on rank {r} off by {err:.2e}"
        seen = sorted(i for r in dp_ranks for i in ranks[r][name]["logprobs"])
        assert seen == list(range(len(trajs))), (name, seen)
        sums = [ranks[r][name]["sums"] for r in dp_ranks]
        loss = sum(s["loss_sum"] for s in sums) / sum(s["normalizer"] for s in sums)
        assert abs(loss - want_loss) < 1e-5 * abs(want_loss), (name, loss, want_loss)
        grads = ranks[0][name]["grads"]
        assert set(grads) == set(want_grads) - {"lm_head.weight"}, name
        for pname, g in grads.items():
            err = float((g.double() - want_grads[pname]).abs().max() / want_grads[pname].abs().max())
            assert err < 1e-5, f"{name}: grad {pname} relative error {err:.2e}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_qwen3(tmp_path_factory.mktemp("packing") / "hf", seed=3))


def test_dp2_packed_and_balanced_equal_unpacked_float64(tiny):
    trajs, refs = _trajectories(tiny, skewed=True)
    want_loss, want_grads = _reference_update(tiny, trajs)
    layouts = [("padded", PackingSpec(micro_batch_size=2), "off"),
               ("packed", PackingSpec(max_tokens=24), "off"),
               ("packed_kk", PackingSpec(max_tokens=24), "kk"),
               ("padded_lpt", PackingSpec(micro_batch_size=2), "lpt")]
    ranks = run_ranks(_layout_worker, 2, args=(tiny, trajs, 1, 1, layouts), timeout=400)
    _check_layouts(ranks, trajs, refs, want_loss, want_grads, last_stage_ranks=[0, 1])
    for name in ("packed", "packed_kk"):
        assert all(all(r[name]["packed"]) for r in ranks), name
    # Balance gives the ranks different sequence counts (one long group against many short
    # responses); both still run the same micro-batches, the lighter one with empty ones.
    kk = [r["packed_kk"] for r in ranks]
    assert kk[0]["n_seq"] != kk[1]["n_seq"], [k["n_seq"] for k in kk]
    assert kk[0]["n_mb"] == kk[1]["n_mb"] and kk[0]["spans"] == kk[1]["spans"]
    assert max(k["empty"] for k in kk) >= 1, [k["empty"] for k in kk]
    # Balance on or off: the same step, to fp32 rounding (only the summation order moves; the
    # normaliser is the global token count either way).
    for a, b in (("packed", "packed_kk"), ("padded", "padded_lpt")):
        sa, sb = ranks[0][a]["sums"], ranks[0][b]["sums"]
        la = sum(r[a]["sums"]["loss_sum"] for r in ranks)
        lb = sum(r[b]["sums"]["loss_sum"] for r in ranks)
        assert sum(r[a]["sums"]["normalizer"] for r in ranks) == sum(r[b]["sums"]["normalizer"] for r in ranks)
        assert abs(la - lb) <= 4e-6 * abs(la), (a, b, la, lb)
        assert abs(sa["grad_norm"] - sb["grad_norm"]) <= 4e-6 * sa["grad_norm"], (a, b)
        for pname, g in ranks[0][a]["grads"].items():
            other = ranks[0][b]["grads"][pname]
            err = float((g - other).abs().max() / other.abs().max())
            assert err < 4e-6, (a, b, pname, err)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_packed_equals_unpacked_float64_tp2_pp2(tiny, tp, pp):
    trajs, refs = _trajectories(tiny, skewed=False)
    want_loss, want_grads = _reference_update(tiny, trajs)
    # At TP=2 the rows are padded at their end to a multiple of 2, as sequence parallelism needs.
    layouts = [("padded", PackingSpec(micro_batch_size=3), "off"),
               ("packed", PackingSpec(max_tokens=31, multiple=tp), "off")]
    ranks = run_ranks(_layout_worker, 2, args=(tiny, trajs, tp, pp, layouts), timeout=400)
    last = [0, 1] if pp == 1 else [1]
    _check_layouts(ranks, trajs, refs, want_loss, want_grads, last_stage_ranks=last, dp_ranks=last[:1])
    assert all(ranks[0]["packed"]["packed"]) and not any(ranks[0]["padded"]["packed"])


# ------------------------------------------------------------------------------------------------
# One process.

def _traj(p, n, first=3):
    return Trajectory(prompt_ids=[first] + [4] * (p - 1), response_ids=list(range(10, 10 + n)),
                      rollout_logprobs=[-1.0] * n, reward=0.0, accuracy=0.0, advantage=0.5)


def test_first_fit_decreasing_respects_the_budget_and_isolates_long_sequences():
    lengths = [7, 3, 12, 5, 5, 2, 9, 1]
    bins = first_fit_decreasing(lengths, budget=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [b for b in bins if sum(lengths[i] for i in b) > 10] == [[2]]  # 12 > 10: alone
    assert len(bins) == 1 + math.ceil(32 / 10)  # optimal: 12 alone, the other 32 tokens in 4 full bins
    # Padding counts against the budget: with multiple 4, 5 + 3 = 8 fits 10 but 9 + 1 -> 12 does not.
    padded = first_fit_decreasing([9, 1, 5, 3], budget=10, multiple=4)
    assert all(-(-sum([9, 1, 5, 3][i] for i in b) // 4) * 4 <= 10 or len(b) == 1 for b in padded)
    assert [0] in padded
    with pytest.raises(ValueError, match="budget >= 1"):
        first_fit_decreasing([1], budget=0)


def test_balance_partition_kk_and_lpt():
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(6.0 + 0.8 * torch.randn(64, generator=g)).clamp(max=2000).round().int().tolist()
    costs = [sequence_cost(n) for n in lengths]
    for method in ("kk", "lpt"):
        parts = balance_partition(costs, 4, method)
        assert sorted(i for p in parts for i in p) == list(range(64)), method
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) / (sum(loads) / 4) < 1.02, (method, loads)
        assert loads == sorted(loads, reverse=True)
    # The textbook case {8, 7, 6, 5, 4} in two: LPT gives 17/13, Karmarkar-Karp 16/14.
    items = [8, 7, 6, 5, 4]
    for method, want in (("kk", [16, 14]), ("lpt", [17, 13])):
        assert [sum(items[i] for i in p) for p in balance_partition(items, 2, method)] == want, method
    assert sequence_cost(100, quadratic=0.01) == 200.0
    assert balance_partition([], 3) == [[], [], []]
    with pytest.raises(ValueError, match="train.dp_balance"):
        balance_partition([1.0], 2, "greedy")


def test_pack_row_layout_and_tp_padding():
    mb = pack_row([_traj(2, 3), _traj(3, 1, first=5)], pad_id=0, multiple=4)
    assert mb.tokens.shape == (1, 12) and mb.cu_seqlens.tolist() == [0, 5, 9, 12] and mb.real_tokens == 9
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    # Labels never cross into the next sequence; response labels sit at p-1+j of each segment.
    assert mb.labels[0].tolist() == [4, 10, 11, 12, 0, 4, 4, 10, 0, 0, 0, 0]
    assert mb.response_mask[0].nonzero().reshape(-1).tolist() == [1, 2, 3, 7]
    rows, cols, seq = mb.response_ids()
    assert seq.tolist() == [0, 0, 0, 1] and cols.tolist() == [1, 2, 3, 7]
    assert mb.tokens[0, 9:].tolist() == [0, 0, 0]
    empty = pack_row([], multiple=2)
    assert empty.tokens.shape == (1, 2) and empty.num_response_tokens == 0 and empty.real_tokens == 0


def test_pack_minibatches_budget_and_empty_minibatch():
    spec = PackingSpec(max_tokens=10)
    mini = [_traj(2, 3), _traj(2, 10), _traj(1, 2), _traj(3, 3)]  # lengths 5, 12, 3, 6
    mbs, spans = pack_minibatches([mini, []], spec)
    assert spans == [[0, 1, 2]] and [mb.real_tokens for mb in mbs] == [12, 6 + 3, 5]
    assert all(mb.tokens.shape[1] <= 10 for mb in mbs if mb.real_tokens <= 10)


def _packed_forward_worker(rank, world, hf_dir):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, load_hf_weights, read_hf_config

    groups = init_distributed(ParallelConfig())
    hf = read_hf_config(hf_dir)
    model = build_qwen3(hf, Qwen3BuildOptions(dtype="fp32"), groups)
    load_hf_weights(model, hf_dir, groups)
    model.eval()
    seqs = [_traj(3, 4, first=7), _traj(2, 6, first=9)]
    mb = pack_row(seqs, multiple=4)
    out = {"alone": []}
    with torch.no_grad():
        out["packed"] = model(mb.tokens, mb.position_ids, None, return_hidden=True, cu_seqlens=mb.cu_seqlens)[:, 0]
        for t in seqs:
            ids = torch.tensor([list(t.prompt_ids) + list(t.response_ids)])
            out["alone"].append(model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None, return_hidden=True)[:, 0])
        # The plain causal mask over the row, for contrast: sequence 2 then sees sequence 1.
        out["flat"] = model(mb.tokens, torch.arange(16).unsqueeze(0), None, return_hidden=True)[:, 0]
        try:
            model(mb.tokens.expand(2, -1), mb.position_ids.expand(2, -1), None, cu_seqlens=mb.cu_seqlens)
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
    return out


def test_block_mask_and_rope_equal_megatron_unpacked(tiny):
    """A packed row through megatron's local spec gives each sequence the hidden states it has alone."""
    from megafork.models.qwen3.packed import block_causal_mask

    mask = block_causal_mask(torch.tensor([0, 2, 5]), 5)[0, 0]
    want = torch.ones(5, 5, dtype=torch.bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4)]:
        want[q, k] = False
    assert torch.equal(mask, want)
    with pytest.raises(ValueError, match="cu_seqlens"):
        block_causal_mask(torch.tensor([0, 3, 2, 5]), 5)

    (res,) = run_ranks(_packed_forward_worker, 1, args=(tiny,), timeout=200)
    for alone, (a, b) in zip(res["alone"], [(0, 7), (7, 15)], strict=True):
        assert torch.allclose(res["packed"][a:b], alone, atol=1e-5), (a, b)
    # Without the block-diagonal mask the second sequence differs (so the check above can fail).
    assert torch.allclose(res["flat"][0:7], res["packed"][0:7], atol=1e-5)
    assert not torch.allclose(res["flat"][7:15], res["packed"][7:15], atol=1e-3)
    assert res["error"] and "shape [1, s]" in res["error"]


@pytest.mark.parametrize("override, match", [
    ("train.max_tokens_per_microbatch=-1", r"train.max_tokens_per_microbatch: expected >= 0, found -1"),
    ("train.dp_balance=greedy", r"train.dp_balance"),
    ("train.balance_quadratic=-0.5", r"train.balance_quadratic: expected >= 0"),
], ids=["negative_budget", "unknown_balance", "negative_quadratic"])
def test_bad_packing_config_fails_at_load(override, match):
    from megafork.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_budget_with_context_parallelism_fails_at_load():
    from megafork.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.max_tokens_per_microbatch: expected 0 with parallel.cp=2"):
        load_config(None, ["train.max_tokens_per_microbatch=4096", "parallel.cp=2"])
    assert load_config(None, ["train.max_tokens_per_microbatch=4096"]).train.max_tokens_per_microbatch == 4096
    with pytest.raises(ValueError, match="train.max_tokens_per_microbatch: expected >= the padding multiple 4"):
        PackingSpec(max_tokens=2, multiple=4)


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "seq_mask"])
def test_sequence_level_rollout_correction_sees_sequences_of_a_packed_row(mode):
    """seq_tis / seq_mask take products and means per sequence: the segments of a packed row."""
    from types import SimpleNamespace

    from megafork.pipeline import PolicyLossConfig, correction_for
    from megafork.train.batch import pack_microbatches
    from megafork.train.step_metrics import _correction_stats

    g = torch.Generator().manual_seed(4)
    seqs = [_traj(2, 5), _traj(3, 2, first=5), _traj(1, 4, first=6)]
    padded, packed = pack_microbatches(seqs, 3)[0], pack_row(seqs, multiple=4)
    rollout = [torch.randn(len(t.response_ids), generator=g) for t in seqs]
    old = [r + 0.05 * torch.randn(r.shape, generator=g) for r in rollout]
    old[1] = rollout[1] + 1.0  # a sequence far off: masked / truncated
    for mb in (padded, packed):
        rows, cols, seq = mb.response_ids()
        mb.old_logprobs = torch.zeros(mb.labels.shape)
        mb.old_logprobs[rows, cols] = torch.cat(old)
        mb.rollout_logprobs = torch.zeros(mb.labels.shape)
        mb.rollout_logprobs[rows, cols] = torch.cat(rollout)
        mb.fork_mask = mb.response_mask.clone()
    cfg = PolicyLossConfig(rollout_correction=mode, rollout_is_cap=2.0, rollout_mask_low=0.9, rollout_mask_high=1.1)
    (w_pad, keep_pad), (w_pack, keep_pack) = correction_for(cfg, padded), correction_for(cfg, packed)
    sel_pad, sel_pack = padded.response_mask.reshape(-1), packed.response_mask.reshape(-1)
    assert torch.equal(w_pad[sel_pad], w_pack[sel_pack]) and torch.equal(keep_pad[sel_pad], keep_pack[sel_pack])
    if mode == "seq_mask":  # sequence 1 (and only it) leaves the loss
        assert keep_pack[sel_pack].tolist() == [True] * 5 + [False] * 2 + [True] * 4
    one = SimpleNamespace(dp_cp=None, device=torch.device("cpu"))
    assert _correction_stats([padded], cfg, one) == _correction_stats([packed], cfg, one)


def test_entropy_dump_indexes_responses_of_packed_rows(tmp_path):
    """The entropy dump numbers each response and each token within it, packed or padded."""
    from types import SimpleNamespace

    from megafork.analysis.io import read_entropy_dump
    from megafork.train.batch import pack_microbatches
    from megafork.train.step_metrics import dump_entropy

    seqs = [_traj(2, 3), _traj(3, 2, first=5), _traj(1, 4, first=6)]
    groups = SimpleNamespace(is_last_stage=True, tp_rank=0, dp_rank=0, cp_rank=0)
    dumps = {}
    for name, mbs in (("padded", pack_microbatches(seqs, 2)), ("packed", [pack_row(seqs[:2], multiple=4),
                                                                        pack_row(seqs[2:])])):
        for mb in mbs:
            mb.entropy = torch.arange(mb.labels.numel(), dtype=torch.float32).view(mb.labels.shape) / 10
            mb.fork_mask = mb.response_mask.clone()
        run = SimpleNamespace(groups=groups, cfg=SimpleNamespace(forking=SimpleNamespace(ratio=0.2)))
        dump_entropy(run, tmp_path / name, 0, mbs, 0.5)
        dumps[name] = read_entropy_dump(next((tmp_path / name).rglob("entropy_step*.pt")))
    for name, d in dumps.items():
        assert d["response_index"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2], name
        assert d["position"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3], name
        assert d["token_ids"].tolist() == [10, 11, 12, 10, 11, 10, 11, 12, 13], name
