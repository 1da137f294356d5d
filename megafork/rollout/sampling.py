"""Next-token sampling for the embedded engine, and the log-probs it reports.

Which log-prob is reported (the "rollout log-prob" the trainer compares against):

- **Sampling (temperature > 0).** The log-prob of the chosen token under the distribution it was
  actually drawn from: logits / temperature, then top-k, then top-p on the renormalised top-k
  distribution, then renormalised again. With top_p = 1 and top_k = -1 this is exactly
  `log_softmax(logits / temperature)`, which is also what SGLang returns. With top-p/top-k
  SGLang returns the *untruncated* temperature-scaled log-prob instead; megafork returns the
  truncated one, because that is the behaviour policy an off-policy correction needs.
- **Greedy (temperature = 0).** The chosen token is the argmax and the reported log-prob is
  `log_softmax(logits)` at temperature 1 (the sampling distribution is a point mass, whose
  log-prob 0 says nothing); SGLang does the same.

Each row draws from its own `torch.Generator` seeded with that row's seed (`sample_seed`), so
a seeded request gives the same samples however it is batched with other rows.
"""
from __future__ import annotations

import torch

SEED_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio increment: well-spread per-sample seeds


def sample_seed(seed: int, prompt_index: int, sample_index: int, n: int) -> int:
    """The seed of one sample: a function of the step seed and the sample's place in the step.

    Every sample of a step gets its own seed, so the n responses of a GRPO group differ on
    engines that honour seeds per request (SGLang copies one `sampling_seed` to all n copies of
    a prompt, which under `--enable-deterministic-inference` makes them identical).

    Args:
        seed: the step's seed.
        prompt_index: index of the prompt in the `generate` call.
        sample_index: 0..n-1 within the prompt's group.
        n: samples per prompt (the flat index is prompt-major, `prompt_index * n + sample_index`).
    """
    return (int(seed) + SEED_STRIDE * (prompt_index * n + sample_index + 1)) % 2**63


def sample_generators(seeds: list[int | None], device: torch.device) -> list[torch.Generator]:
    """One generator per sample row, seeded with that row's seed (None: fresh randomness).

    Args:
        seeds: one seed per row (prompts x n, prompt-major), e.g. from `sample_seed`.
        device: device the sampling tensors live on.
    """
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if s is None else int(s) % 2**63)
        gens.append(g)
    return gens


def sampling_log_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log of the distribution sampled from, over the full vocabulary (-inf outside its support).

    Args:
        logits: [B, V] next-token logits (any float dtype; computed in fp32).
        temperature: > 0.
        top_k: -1 for all tokens, else keep the k largest logits.
        top_p: nucleus mass in (0, 1].

    Returns:
        [B, V] fp32 log-probs.
    """
    if temperature <= 0:
        raise ValueError(f"sampling_log_probs: temperature must be > 0 (greedy is separate), found {temperature}")
    z = logits.float() / temperature
    vocab = z.shape[-1]
    if top_k != -1 and top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def next_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generators: list[torch.Generator] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row and return (token ids [B], their rollout log-probs [B] fp32).

    Args:
        logits: [B, V] next-token logits.
        temperature: 0 for greedy.
        top_k: -1 for all tokens.
        top_p: nucleus mass.
        generators: one per row (ignored when greedy).
    """
    if temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.argmax(logits, dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = sampling_log_probs(logits, temperature, top_k, top_p)
    probs = logp.exp()
    if generators is None or len(generators) != probs.shape[0]:
        raise ValueError(f"next_tokens: need one generator per row ({probs.shape[0]}), "
                         f"found {None if generators is None else len(generators)}")
    tokens = draw(probs, generators)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` [B, V], row i drawn with `generators[i]`.

    The same draws as `torch.multinomial(probs[i], 1, generator=generators[i])` row by row (and
    the generators end in the same state): torch samples one category as argmax(p / q) with
    q ~ Exp(1) from the row's generator. Only the noise is drawn per row; the division and the
    argmax run once over the batch, which saves multinomial's per-call checks and host syncs.

    Raises:
        ValueError: a row is not a distribution (non-finite or negative entries, zero mass).
    """
    valid = ((probs >= 0) & (probs < float("inf"))).all() & (probs.sum(-1) > 0).all()
    if not bool(valid):  # one check per batch, where multinomial syncs once per row
        raise ValueError("next_tokens: probabilities must be finite, >= 0 and sum to > 0 in every row "
                         "(non-finite logits from the model?)")
    noise = torch.empty_like(probs)
    for row, g in zip(noise, generators, strict=True):
        row.exponential_(1.0, generator=g)
    return (probs / noise).argmax(dim=-1)
