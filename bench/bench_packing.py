"""Benchmark: variable-length responses, padded micro-batches against token-budget packing + DP balance.

    .venv/bin/python -m bench packing        # or: make bench

Layout (no model): one synthetic step of 64 prompts x 16 responses, mini-batches of 32 prompts,
DP = 4. Response lengths are DAPO-like: log-normal with median 4,096 tokens (sigma 1.0),
truncated at 20,480, so the mass above the cap becomes a lump of capped answers; prompts are
uniform in 100..600 tokens. Rows: today's padded micro-batches of `micro_batch_size` 1 and 4
with contiguous DP slices, against a 24,576-token budget with Karmarkar–Karp balance (and the
budget without balance, for contrast). Columns, per step: padding / processed tokens; Σ over
mini-batches of the busiest rank's processed tokens / the mean rank's (what the step waits for,
the `dp_token_imbalance` metric); micro-batches per rank. Everything goes through the
trainer's own `split_for_dp` and `pack_minibatches`.

CPU timing: the same lengths scaled down 64x (median 64, cap 320, prompts 2..9) on a tiny Qwen3
(hidden 64, 2 layers) on one process: the old pass plus one update (megatron schedule, DDP,
Adam) of 64 sequences, padded rows of 4 against packed rows of at most 512 tokens; medians of
3 runs, as a ratio in one run.

Targets: padding <= 5% of processed tokens, imbalance <= 1.05, packed <= 0.7x the padded time.
"""
from __future__ import annotations

import tempfile
import time

import torch

from bench.common import print_table
from megafork.train.batch import Trajectory
from megafork.train.packing import PackingSpec, equalize, pack_each, pack_minibatches
from megafork.train.shard import split_for_dp

PROMPTS, N, MINI, DP = 64, 16, 32, 4
CAP, MEDIAN, SIGMA = 20480, 4096, 1.0
BUDGET = 24576


def dapo_like_step(prompts: int = PROMPTS, scale: int = 1, seed: int = 0) -> list[Trajectory]:
    """`prompts` x N trajectories with DAPO-like lengths divided by `scale` (random ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(prompts):
        prompt = int(torch.randint(100, 601, (1,), generator=g)) // scale
        for _ in range(N):
            n = float(torch.exp(torch.log(torch.tensor(float(MEDIAN))) + SIGMA * torch.randn(1, generator=g)))
            n = max(1, min(CAP, int(n)) // scale)
            ids = torch.randint(3, 120, (prompt + n,), generator=g)
            out.append(Trajectory(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                                  rollout_logprobs=torch.full((n,), -1.0), reward=0.0, accuracy=0.0,
                                  advantage=float(torch.randn(1, generator=g)), group=p))
    return out


def _layout_row(trajs, spec: PackingSpec, balance: str) -> tuple[float, float, float]:
    """(padding fraction, imbalance, micro-batches per rank) of the step, the DP ranks simulated."""
    shares = split_for_dp(trajs, N, MINI, DP, balance=balance)
    per_rank = [pack_each(share, spec) for share in shares]
    counts = [max(len(r[m]) for r in per_rank) for m in range(len(per_rank[0]))]  # the MAX all-reduce
    packed = [equalize(r, counts, spec) for r in per_rank]
    processed = sum(mb.tokens.numel() for mbs, _ in packed for mb in mbs)
    real = sum(mb.real_tokens for mbs, _ in packed for mb in mbs)
    busiest = sum(max(sum(mbs[i].tokens.numel() for i in spans[m]) for mbs, spans in packed)
                  for m in range(len(counts)))
    return (processed - real) / processed, busiest / (processed / DP), float(len(packed[0][0]))


def _timing_worker(rank, world, hf_dir, trajs, layouts, repeats):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, load_hf_weights, read_hf_config
    from megafork.pipeline import PolicyLossConfig
    from megafork.train.config import ForkingConfig, OptimConfig
    from megafork.train.optim import build_optimizer, enable_per_token_loss, wrap_ddp
    from megafork.train.update import old_pass, select, train_minibatches

    torch.set_num_threads(max(1, torch.get_num_threads()))
    groups = init_distributed(ParallelConfig())
    hf = read_hf_config(hf_dir)
    model = build_qwen3(hf, Qwen3BuildOptions(dtype="fp32"), groups)
    load_hf_weights(model, hf_dir, groups)
    enable_per_token_loss(model)
    chunks = [wrap_ddp(model, groups)]
    optimizer, _ = build_optimizer(OptimConfig(lr=1e-30, warmup_steps=0, weight_decay=0.0), chunks,
                                   total_steps=100, groups=groups)
    times: dict[str, list[float]] = {name: [] for name, _ in layouts}
    for rep in range(repeats + 1):  # the first round warms up
        for name, spec in layouts:  # interleaved, so that machine load hits both alike
            shares = split_for_dp(trajs, N, len(trajs) // N, 1)
            t0 = time.perf_counter()
            mbs, spans = pack_minibatches(shares[0], spec)
            old_pass(chunks, mbs, groups, hf.vocab_size, temperature=1.0, chunk_size=None)
            select(mbs, ForkingConfig(ratio=0.2), spans, groups, seed=0)
            train_minibatches(chunks, optimizer, mbs, spans, PolicyLossConfig(), groups, hf.vocab_size)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    trajs = dapo_like_step()
    lengths = torch.tensor([len(t.response_ids) for t in trajs], dtype=torch.float64)
    capped = float((lengths == CAP).double().mean())
    rows = []
    layouts = [("micro_batch_size 1, padded, contiguous DP (today)", PackingSpec(micro_batch_size=1), "off"),
               ("micro_batch_size 4, padded, contiguous DP (today)", PackingSpec(micro_batch_size=4), "off"),
               (f"token budget {BUDGET:,}, contiguous DP", PackingSpec(max_tokens=BUDGET), "off"),
               (f"token budget {BUDGET:,} + Karmarkar-Karp balance", PackingSpec(max_tokens=BUDGET), "kk")]
    for name, spec, balance in layouts:
        pad, imb, count = _layout_row(trajs, spec, balance)
        rows.append([name, f"{100 * pad:.1f}%", f"{imb:.3f}", int(count)])
    print_table(f"Layout of one DAPO-like step (DP={DP}, {PROMPTS}x{N} responses, mini-batches of {MINI} prompts)",
                ["layout", "padding / processed", "max/mean rank tokens", "micro-batches per rank"], rows,
                note=f"Response lengths: median {float(lengths.median()):,.0f}, mean {float(lengths.mean()):,.0f}, "
                     f"{100 * capped:.1f}% at the {CAP:,} cap. Targets: padding <= 5%, imbalance <= 1.05.")

    from megafork.testing import run_ranks
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3

    small = dapo_like_step(prompts=4, scale=64, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(make_tiny_qwen3(tmp + "/hf", seed=0, max_position_embeddings=512))
        timed = [("padded, micro_batch_size 4", PackingSpec(micro_batch_size=4)),
                 ("packed, 512-token budget", PackingSpec(max_tokens=512))]
        (res,) = run_ranks(_timing_worker, 1, args=(hf_dir, small, timed, 3), timeout=1800)
    base = res[timed[0][0]]
    print_table("CPU: old pass + one update on a tiny Qwen3, lengths / 64 (64 sequences, one process)",
                ["layout", "median seconds", "vs padded"],
                [[name, res[name], res[name] / base] for name, _ in timed],
                note="Target: packed <= 0.7x padded.")


if __name__ == "__main__":
    main()
