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
        ids = s.response_ids.tolist() if hasattr(s.response_ids, "tolist") else s.response_ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        r = float(reward_fn(text, prompts[s.prompt_index].answer))
        rewards.append(r)
        accs.append(1.0 if r > 0 else 0.0)
    return rewards, accs


def collect_rollouts(engine, dataset, sampler, tokenizer, reward_fn, cfg, step: int
                     ) -> tuple[list[Trajectory], RolloutStats]:
    """Generate until `train.prompts_per_step` informative groups are found (or rounds run out).

    Groups are scored as they complete. With a streaming engine (`generate_groups`, the SGLang
    client) a round stops as soon as enough informative groups are in: the rest of its requests
    are aborted and the tokens they and the dropped groups cost are logged as wasted. Kept groups
    are taken in prompt order, not arrival order.

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
    stats = RolloutStats()
    kept: list[list[Trajectory]] = []
    scored_all: list[_Group] = []
    wasted = aborted_requests = 0
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
        sampling = rollout_sampling(cfg, seed=_seed(cfg.train.seed, step, rnd))
        scored, res = _generate_round(engine, prompts, sampling, need, tokenizer, reward_fn, cfg)
        if res is not None:
            wasted += res.wasted_tokens
            aborted_requests += res.aborted_requests
            for k, v in res.as_dict().items():
                stats.extra[k] = stats.extra.get(k, 0) + v if "per_s" not in k else v
        stats.rounds += 1
        stats.prompts_generated += len(prompts)
        for i in sorted(scored):  # prompt order: the batch does not depend on which reply came first
            g = scored[i]
            scored_all.append(g)
            stats.groups_aborted += g.broken
            if g.useful and len(kept) < want:
                kept.append(g.trajectories(len(kept)))
            else:
                wasted += g.tokens
    stats.groups_kept = len(kept)
    stats.groups_short = want - len(kept)
    if stats.groups_short:
        log.warning("step %d: dynamic sampling found %d of %d informative groups in %d rounds "
                    "(algo.max_sampling_rounds=%d); training on %d groups", step, len(kept), want, stats.rounds,
                    cfg.algo.max_sampling_rounds, len(kept))
    if scored_all:
        rewards = torch.cat([g.shaped for g in scored_all])
        lengths = torch.cat([g.lengths for g in scored_all]).float()
        stats.reward_mean = float(rewards.mean())
        stats.accuracy = float(torch.cat([g.accs for g in scored_all]).mean())
        stats.response_len_mean = float(lengths.mean())
        stats.truncated_fraction = sum(g.truncated for g in scored_all) / len(lengths)
    stats.extra["rollout_wasted_tokens"] = wasted
    if wasted or aborted_requests:
        log.info("step %d: rollout wasted %d tokens (uninformative/surplus groups and %d aborted requests)",
                 step, wasted, aborted_requests)
    return [t for group in kept for t in group], stats


def _generate_round(engine, prompts, sampling, need: int, tokenizer, reward_fn, cfg):
    """Generate and score one round's groups; a streaming engine stops once `need` are useful.

    Returns:
        ({prompt position: scored group}, the engine's `StreamResult` or None).
    """
    scored: dict[int, _Group] = {}
    useful = 0

    def on_group(index: int, samples) -> bool:
        nonlocal useful
        g = scored[index] = _score_group(index, prompts[index], samples, tokenizer, reward_fn, cfg)
        useful += g.useful
        return cfg.algo.dynamic_sampling and useful >= need

    ids = [p.prompt_ids for p in prompts]
    if hasattr(engine, "generate_groups"):
        return scored, engine.generate_groups(ids, sampling, lambda grp: on_group(grp.prompt_index, grp.samples()))
    samples = engine.generate(ids, sampling)
    for i in range(len(prompts)):
        on_group(i, samples[i * sampling.n:(i + 1) * sampling.n])
    return scored, None


@dataclass
class _Group:
    """One prompt's scored responses."""

    index: int
    prompt: object
    samples: list
    shaped: torch.Tensor    # [n] verifier reward + overlong penalty
    accs: torch.Tensor      # [n] 1/0
    lengths: torch.Tensor   # [n]
    useful: bool            # informative (or dynamic sampling off) and not broken
    broken: bool
    truncated: int
    adv_eps: float

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def trajectories(self, group: int) -> list[Trajectory]:
        adv = grpo_advantages(self.shaped, len(self.samples), eps=self.adv_eps)
        prompt_ids = torch.tensor(self.prompt.prompt_ids, dtype=torch.int32)
        return [Trajectory(prompt_ids=prompt_ids, response_ids=torch.as_tensor(s.response_ids, dtype=torch.int32),
                           rollout_logprobs=torch.as_tensor(s.logprobs, dtype=torch.float32),
                           reward=float(self.shaped[j]), accuracy=float(self.accs[j]), advantage=float(adv[j]),
                           group=group, finish_reason=s.finish_reason, weight_version=s.weight_version)
                for j, s in enumerate(self.samples)]


def _score_group(index: int, prompt, samples, tokenizer, reward_fn, cfg) -> _Group:
    rewards, accs = score(tokenizer, reward_fn, samples, {s.prompt_index: prompt for s in samples})
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long)
    shaped = torch.tensor(rewards, dtype=torch.float32)
    if cfg.algo.overlong_shaping:
        shaped = shaped + overlong_penalty(lengths, cfg.rollout.max_response_len, cfg.algo.overlong_buffer,
                                           cfg.algo.overlong_penalty)
    acc_t = torch.tensor(accs, dtype=torch.float32)
    informative = bool(informative_groups(acc_t, len(samples))[0]) if cfg.algo.dynamic_sampling else True
    # A group with an aborted (engine paused mid-request) or empty response is not a sample of
    # the policy: drop it whole, since GRPO needs all n responses of a prompt.
    broken = any(s.finish_reason == "abort" or len(s.response_ids) == 0 for s in samples)
    return _Group(index, prompt, list(samples), shaped, acc_t, lengths, informative and not broken, broken,
                  sum(s.finish_reason == "length" for s in samples), cfg.algo.adv_eps)


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
