"""Forking-token thresholds and masks: top / bottom / random / all, exact over a process group."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megafork.forking.radix_select import RadixResult, describe_invalid, radix_select, rank_name

MODES = ("top", "bottom", "random", "all")
TIES = ("include", "topk")
# Random-mode keys are 31-bit hashes reduced below the bit pattern of +inf, so they pass
# through the same fp32 radix select as entropies.
_KEY_LIMIT = 0x7F800000
_HASH_MUL = 0x45D9F3B
_MASK32 = 0xFFFFFFFF


def num_forking_tokens(ratio: float, n_valid: int) -> int:
    """k = ceil(ratio * n_valid), at least 1 when there is any valid token.

    `ratio * n_valid` within 1e-9 (relative) of an integer counts as that integer, so float
    noise cannot add a token: ratio 0.7 of 10 tokens is 7, not ceil(7.000000000000001) = 8.

    Args:
        ratio: fraction in (0, 1].
        n_valid: number of valid tokens (>= 0).
    """
    if n_valid <= 0:
        return 0
    x = ratio * n_valid
    nearest = round(x)
    k = nearest if abs(x - nearest) <= 1e-9 * x else math.ceil(x)
    return min(n_valid, max(1, k))


def _check_ratio(ratio: object) -> str | None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        return f"ratio must be a float in (0, 1], found {type(ratio).__name__} {ratio!r}"
    if not 0.0 < float(ratio) <= 1.0:  # also rejects NaN
        return f"ratio must be in (0, 1], found {ratio!r}"
    return None


def _check_inputs(entropy: object, mask: object, ratio: object) -> str | None:
    """A description of what is wrong with the arguments, or None. Values are checked later."""
    if not isinstance(entropy, torch.Tensor):
        return f"entropy must be a torch.Tensor, found {type(entropy).__name__}"
    if not isinstance(mask, torch.Tensor):
        return f"mask must be a torch.Tensor, found {type(mask).__name__}"
    if mask.dtype != torch.bool:
        return f"mask must have dtype torch.bool, found {mask.dtype}"
    if entropy.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (f"entropy must be float32 (or float16/bfloat16, widened exactly), found {entropy.dtype}; "
                "float64 would be rounded, which changes ties")
    if entropy.shape != mask.shape:
        return f"entropy and mask must have the same shape, found {tuple(entropy.shape)} and {tuple(mask.shape)}"
    if entropy.device != mask.device:
        return f"entropy and mask must be on the same device, found {entropy.device} and {mask.device}"
    return _check_ratio(ratio)


def _flat(entropy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = entropy.detach().reshape(-1).to(torch.float32).contiguous()
    return values, mask.reshape(-1).contiguous()


def _select(entropy, mask, ratio, largest: bool, group, backend: str = "auto") -> RadixResult:
    error = _check_inputs(entropy, mask, ratio)
    if error is None:
        values, flat_mask = _flat(entropy, mask)
    else:  # join pass 1 empty-handed so the other ranks raise with us instead of hanging
        device = entropy.device if isinstance(entropy, torch.Tensor) else torch.device("cpu")
        values = torch.empty(0, dtype=torch.float32, device=device)
        flat_mask = torch.empty(0, dtype=torch.bool, device=device)
    return radix_select(values, flat_mask, lambda n: num_forking_tokens(ratio, n), largest=largest,
                        group=group, local_error=error, backend=backend,
                        call_key=f"{'top' if largest else 'bottom'} ratio={ratio!r}")


def topk_threshold(entropy: torch.Tensor, mask: torch.Tensor, ratio: float,
                   group: dist.ProcessGroup | None = None) -> float:
    """Exact k-th largest entropy over the valid tokens of every rank of `group`.

    k = `num_forking_tokens(ratio, N)` where N counts the tokens with `mask` true on all ranks.
    Two radix passes, one all_reduce of 2^16 int64 counts each; any per-rank count works.

    Args:
        entropy: float32 (or float16/bfloat16) tensor of any shape, finite and >= 0 where
            `mask` is true; values where it is false are ignored.
        mask: bool tensor of the same shape and device: the tokens that count.
        ratio: fraction of the valid tokens to keep, in (0, 1].
        group: ranks whose tokens share one threshold; None means this process alone.
            Every rank of the group must call with the same `ratio`.

    Returns:
        tau, the threshold as a Python float (exactly an fp32 value). `H >= tau` keeps at least
        k tokens, more when entropies tie at tau. When no rank has a valid token, tau is
        +inf and the selection is empty.

    Raises:
        ValueError: on every rank of the group if any rank has bad input (non-bool mask,
            shape/device mismatch, unsupported dtype, ratio outside (0, 1], NaN/inf/negative
            entropy). The message names the rank and what was found.
    """
    result = _select(entropy, mask, ratio, largest=True, group=group)
    return math.inf if result.bits is None else result.value


def bottomk_threshold(entropy: torch.Tensor, mask: torch.Tensor, ratio: float,
                      group: dist.ProcessGroup | None = None) -> float:
    """Exact k-th smallest entropy over the group: `H <= tau` keeps the lowest `ratio` fraction.

    Args:
        entropy: as in `topk_threshold`.
        mask: as in `topk_threshold`.
        ratio: as in `topk_threshold`.
        group: as in `topk_threshold`.

    Returns:
        The threshold; -inf (an empty selection) when no rank has a valid token.
    """
    result = _select(entropy, mask, ratio, largest=False, group=group)
    return -math.inf if result.bits is None else result.value


def _local_error(entropy, mask, ratio) -> str | None:
    """Argument and value checks done with torch ops, for the paths that skip the histograms."""
    error = _check_inputs(entropy, mask, ratio)
    if error is None:
        values, flat_mask = _flat(entropy, mask)
        valid = values[flat_mask]
        if not bool((torch.isfinite(valid) & (valid >= 0)).all()):
            error = describe_invalid(values, flat_mask)
    return error


def _check_local(entropy, mask, ratio) -> None:
    """Validation for the paths without collectives: raise right here."""
    error = _local_error(entropy, mask, ratio)
    if error is not None:
        raise ValueError(f"{rank_name()}: {error}")


def _topk_local(entropy: torch.Tensor, mask: torch.Tensor, ratio: float, largest: bool) -> torch.Tensor:
    """The released code's selection: exactly k = ceil(ratio * N_local) tokens by torch.topk."""
    values, flat_mask = _flat(entropy, mask)
    valid_idx = torch.nonzero(flat_mask).reshape(-1)
    k = num_forking_tokens(ratio, valid_idx.numel())
    out = torch.zeros_like(flat_mask)
    if k:
        chosen = torch.topk(values[valid_idx], k, largest=largest, sorted=False).indices
        out[valid_idx[chosen]] = True
    return out.reshape(mask.shape)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values < 2^32 (products stay < 2^63)."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    return (x >> 16) ^ x


def _random_keys(n: int, device: torch.device, generator: torch.Generator | None, salt: int) -> torch.Tensor:
    draws = torch.randint(0, 1 << 32, (n,), dtype=torch.int64, device=device, generator=generator)
    salt_bits = int(_hash32(torch.tensor([salt + 1], dtype=torch.int64)).item())
    keys = (_hash32(draws ^ salt_bits) >> 1) % _KEY_LIMIT
    return keys.to(torch.int32).view(torch.float32)


def _select_random(entropy, mask, ratio, group, generator) -> torch.Tensor:
    """Exactly k valid tokens over the group, uniformly at random.

    Every valid token gets an i.i.d. random key; the k largest keys over the group are found
    with the same radix select as entropies (ties at the k-th key, rare, are broken by rank
    then position, which costs one more all_reduce of `world_size` counts only when they occur).
    """
    error = _local_error(entropy, mask, ratio)
    if error is not None:
        device = entropy.device if isinstance(entropy, torch.Tensor) else torch.device("cpu")
        flat_mask = torch.empty(0, dtype=torch.bool, device=device)
        keys = torch.empty(0, dtype=torch.float32, device=device)
    else:
        flat_mask = mask.reshape(-1).contiguous()
        salt = 0 if group is None else dist.get_rank(group)
        keys = _random_keys(flat_mask.numel(), flat_mask.device, generator, salt)
    result = radix_select(keys, flat_mask, lambda n: num_forking_tokens(ratio, n), largest=True,
                          group=group, local_error=error, check_values=False, call_key=f"random ratio={ratio!r}")
    if result.bits is None:
        return torch.zeros_like(mask)
    key_bits = keys.view(torch.int32)
    out = flat_mask & (key_bits > result.bits)
    ties = flat_mask & (key_bits == result.bits)
    need = result.k - result.count_beyond
    if need == result.count_equal:
        out |= ties
    else:
        tie_idx = torch.nonzero(ties).reshape(-1)
        world = 1 if group is None else dist.get_world_size(group)
        counts = torch.zeros(world, dtype=torch.int64, device=keys.device)
        me = 0 if group is None else dist.get_rank(group)
        counts[me] = tie_idx.numel()
        if group is not None:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        before = int(counts[:me].sum().item())
        take = max(0, min(tie_idx.numel(), need - before))
        out[tie_idx[:take]] = True
    return out.reshape(mask.shape)


def select_forking_tokens(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    mode: str = "top",
    group: dist.ProcessGroup | None = None,
    ties: str = "include",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The forking-token mask: which valid tokens the policy loss trains on.

    Args:
        entropy: float32 (or float16/bfloat16) per-token entropy, any shape, finite and >= 0
            where `mask` is true.
        mask: bool tensor of the same shape: the response tokens that count.
        ratio: fraction in (0, 1] (0.2 in the paper).
        mode: "top": `mask & (H >= tau)` with tau the exact k-th largest over the group, ties
            kept (the paper's indicator); "bottom": `mask & (H <= tau')` with tau' the k-th
            smallest (the bottom-80% ablation); "random": exactly k valid tokens of the group,
            uniformly at random (a control; see `generator`); "all": `mask` itself.
        group: ranks that share one selection (dp x cp in the trainer); None: this process.
            Every rank of the group must call with the same `ratio`, `mode` and `ties`.
        ties: "include" (default) keeps every token tied at the threshold; "topk" reproduces
            the released code: exactly k = ceil(ratio * N_local) tokens chosen by `torch.topk`
            on this process alone (modes top and bottom only, and `group` must be None).
        generator: random mode only: the source of the keys. Each rank's draws are hashed with
            its group rank, so ranks seeded alike still select independently. Must be on the
            tensors' device.

    Returns:
        bool tensor shaped like `mask`, never true where `mask` is false. k = ceil(ratio * N)
        with N the valid tokens of the group; when N is 0 the selection is empty.

    Raises:
        ValueError: bad mode/ties/option combination (raised at once: these must be the same
            on every rank), or bad tensors or ratio (raised on every rank of the group, naming
            the rank that found them).
    """
    if mode not in MODES:
        raise ValueError(f"{rank_name()}: mode must be one of {MODES}, found {mode!r}")
    if ties not in TIES:
        raise ValueError(f"{rank_name()}: ties must be one of {TIES}, found {ties!r}")
    if generator is not None and mode != "random":
        raise ValueError(f"{rank_name()}: generator is only used by mode='random', found mode={mode!r}")
    if ties == "topk":
        if mode not in ("top", "bottom"):
            raise ValueError(f"{rank_name()}: ties='topk' applies to modes 'top' and 'bottom', found mode={mode!r}")
        if group is not None:
            raise ValueError(f"{rank_name()}: ties='topk' selects on this process only (the released code); "
                             f"found a group of {dist.get_world_size(group)} ranks; pass group=None")
        _check_local(entropy, mask, ratio)
        return _topk_local(entropy, mask, ratio, largest=mode == "top")
    if mode == "all":
        _check_local(entropy, mask, ratio)
        return mask.clone()
    if mode == "random":
        return _select_random(entropy, mask, ratio, group, generator)
    if mode == "top":
        tau = topk_threshold(entropy, mask, ratio, group)
        return mask & (entropy >= tau)
    tau = bottomk_threshold(entropy, mask, ratio, group)
    return mask & (entropy <= tau)
