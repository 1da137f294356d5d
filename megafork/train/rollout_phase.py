"""One step's rollouts: generate, verify, shape, drop uninformative groups, compute advantages.

Runs on global rank 0, which drives the rollout engine (embedded, or SGLang over HTTP) the
way a single controller drives SGLang servers; the finished trajectories are then broadcast
and every DP rank takes its share.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from megafork.algo import grpo_advantages, informative_groups, overlong_penalty
from megafork.rollout import SamplingParams
from megafork.train.batch import Trajectory

log = logging.getLogger(__name__)


@dataclass
class RolloutStats:
    """What happened while collecting a step's rollouts."""

    rounds: int = 0
    prompts_generated: int = 0
    groups_kept: int = 0
    groups_short: int = 0
    groups_aborted: int = 0
    reward_mean: float = 0.0
    accuracy: float = 0.0
    response_len_mean: float = 0.0
    truncated_fraction: float = 0.0
    extra: dict = field(default_factory=dict)


def rollout_sampling(cfg, seed: int) -> SamplingParams:
    """Sampling parameters of the training rollouts (`rollout` and `algo.n` sections)."""
    return SamplingParams(n=cfg.algo.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_response_len, seed=seed)


def score(tokenizer, reward_fn, samples, prompts) -> tuple[list[float], list[float]]:
    """Verifier rewards (+1/-1) and accuracies (1/0) of samples, each against its prompt's answer."""
    rewards, accs = [], []
    for s in samples:
        text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
        r = float(reward_fn(text, prompts[s.prompt_index].answer))
        rewards.append(r)
        accs.append(1.0 if r > 0 else 0.0)
    return rewards, accs


def collect_rollouts(engine, dataset, sampler, tokenizer, reward_fn, cfg, step: int
                     ) -> tuple[list[Trajectory], RolloutStats]:
    """Generate until `train.prompts_per_step` informative groups are found (or rounds run out).

    Args:
        engine: a `RolloutEngine`.
        dataset: a `PromptDataset`.
        sampler: the `PromptSampler`; extra prompts for dynamic sampling come from its stream.
        tokenizer: decodes responses for the verifier.
        reward_fn: `(response_text, answer) -> float` (+1 / -1).
        cfg: the run config.
        step: the step index (seeds the sampling).

    Returns:
        The trajectories, group-major (n consecutive responses per prompt), with rewards and
        advantages, and the step's rollout statistics.
    """
    want = cfg.train.prompts_per_step
    n = cfg.algo.n
    stats = RolloutStats()
    kept: list[list[Trajectory]] = []
    all_rewards, all_accs, all_lens, all_trunc = [], [], [], []
    rounds = cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 1
    for rnd in range(rounds):
        need = want - len(kept)
        if need <= 0:
            break
        # With dynamic sampling every round generates algo.oversample x prompts_per_step prompts
        # (DAPO's gen_batch_size), drawn from the sampler's stream in whole batches.
        count = math.ceil(cfg.algo.oversample * want) if cfg.algo.dynamic_sampling else want
        idx = [i for _ in range(math.ceil(count / want)) for i in sampler.next_global_batch()][:count]
        prompts = [dataset[i] for i in idx]
        samples = engine.generate([p.prompt_ids for p in prompts],
                                  rollout_sampling(cfg, seed=_seed(cfg.train.seed, step, rnd)))
        stats.rounds += 1
        stats.prompts_generated += len(prompts)
        rewards, accs = score(tokenizer, reward_fn, samples, prompts)
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long)
        truncated = [s.finish_reason == "length" for s in samples]
        shaped = torch.tensor(rewards, dtype=torch.float32)
        if cfg.algo.overlong_shaping:
            shaped = shaped + overlong_penalty(lengths, cfg.rollout.max_response_len, cfg.algo.overlong_buffer,
                                               cfg.algo.overlong_penalty)
        acc_t = torch.tensor(accs, dtype=torch.float32)
        all_rewards += shaped.tolist()
        all_accs += accs
        all_lens += lengths.float().tolist()
        all_trunc += truncated
        keep = (informative_groups(acc_t, n) if cfg.algo.dynamic_sampling
                else torch.ones(len(prompts), dtype=torch.bool))
        # A group with an aborted (engine paused mid-request) or empty response is not a sample of
        # the policy: drop it whole, since GRPO needs all n responses of a prompt.
        broken = torch.tensor([s.finish_reason == "abort" or len(s.response_ids) == 0 for s in samples])
        broken = broken.view(-1, n).any(dim=1)
        stats.groups_aborted += int(broken.sum())
        keep &= ~broken
        adv = grpo_advantages(shaped, n, eps=cfg.algo.adv_eps)
        for g in range(len(prompts)):
            if not keep[g] or len(kept) >= want:
                continue
            group = []
            prompt_ids = torch.tensor(prompts[g].prompt_ids, dtype=torch.int32)
            for j in range(g * n, (g + 1) * n):
                s = samples[j]
                group.append(Trajectory(prompt_ids=prompt_ids, response_ids=torch.tensor(s.response_ids, dtype=torch.int32),
                                        rollout_logprobs=torch.tensor(s.logprobs, dtype=torch.float32),
                                        reward=float(shaped[j]),
                                        accuracy=accs[j], advantage=float(adv[j]), group=len(kept),
                                        finish_reason=s.finish_reason))
            kept.append(group)
    stats.groups_kept = len(kept)
    stats.groups_short = want - len(kept)
    if stats.groups_short:
        log.warning("step %d: dynamic sampling found %d of %d informative groups in %d rounds "
                    "(algo.max_sampling_rounds=%d); training on %d groups", step, len(kept), want, stats.rounds,
                    cfg.algo.max_sampling_rounds, len(kept))
    if all_rewards:
        stats.reward_mean = sum(all_rewards) / len(all_rewards)
        stats.accuracy = sum(all_accs) / len(all_accs)
        stats.response_len_mean = sum(all_lens) / len(all_lens)
        stats.truncated_fraction = sum(all_trunc) / len(all_trunc)
    return [t for group in kept for t in group], stats


def evaluate(engine, dataset, tokenizer, reward_fn, cfg, step: int) -> float:
    """avg@k accuracy on the held-out set (`eval` section)."""
    count = len(dataset) if cfg.eval.max_prompts == 0 else min(len(dataset), cfg.eval.max_prompts)
    prompts = [dataset[i] for i in range(count)]
    sampling = SamplingParams(n=cfg.eval.k, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                              max_new_tokens=cfg.rollout.max_response_len, seed=_seed(cfg.train.seed, step, 1 << 20))
    samples = engine.generate([p.prompt_ids for p in prompts], sampling)
    _, accs = score(tokenizer, reward_fn, samples, prompts)
    return sum(accs) / max(1, len(accs))


def _seed(base: int, step: int, salt: int) -> int:
    # Derived per (step, round), so a resumed run draws exactly what the straight run drew.
    return (base * 1_000_003 + step * 7919 + salt) % (2**63 - 1)
