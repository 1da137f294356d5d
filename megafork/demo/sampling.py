"""Batched prompt encoding, sampling and accuracy for the demo (plain transformers).

    acc = sampled_accuracy(model, tok, problems, temperature=1.0, max_new_tokens=8)

The demo's warm start and its accuracy checks use these; the RL loop itself generates through
`megafork.rollout`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from megafork.demo.task import Problem
from megafork.rewards import get_reward


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask), the layout generation expects."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample(model, tok, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 8, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Sample `n` responses per prompt.

    Args:
        model: a causal LM.
        tok: its tokenizer (pad = eos).
        prompts: prompt texts (encoded without special tokens, as `megafork.data` does).
        n: responses per prompt; responses of prompt i are rows i*n .. i*n+n-1.
        temperature: sampling temperature.
        top_p: nucleus threshold.
        max_new_tokens: response length cap.
        greedy: argmax decoding instead of sampling.

    Returns:
        (prompt_ids [B*n, P] left-padded, response_ids [B*n, R] padded with eos after the first eos,
        decoded response texts).
    """
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = left_pad(enc, tok.pad_token_id)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    resp = out[:, ids.shape[1]:]
    texts = tok.batch_decode(resp, skip_special_tokens=True)
    return ids, resp, texts


def sampled_accuracy(model, tok, problems: Sequence[Problem], temperature: float = 1.0, max_new_tokens: int = 8,
                     greedy: bool = False, batch_size: int = 256, reward: str = "dapo") -> float:
    """Fraction of problems whose sampled (or greedy) response earns a positive reward.

    Args:
        model: a causal LM.
        tok: its tokenizer.
        problems: held-out problems.
        temperature: sampling temperature (1.0 is the paper's and the demo's).
        max_new_tokens: response length cap.
        greedy: argmax decoding.
        batch_size: prompts per generate call.
        reward: registered reward name.
    """
    fn = get_reward(reward)
    correct = 0
    was_training = model.training
    model.eval()
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        _, _, texts = sample(model, tok, [p.prompt for p in chunk], temperature=temperature,
                             max_new_tokens=max_new_tokens, greedy=greedy)
        correct += sum(fn(t, p.answer) > 0 for t, p in zip(texts, chunk))
    model.train(was_training)
    return correct / max(1, len(problems))
