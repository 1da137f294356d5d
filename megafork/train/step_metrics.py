"""A step's metrics (one metrics.jsonl line) and its entropy dump, gathered onto rank 0.

Token statistics live on the last pipeline stage; they are summed over its `dp_cp` group and
sent to rank 0 from the stage's first rank (tp 0, dp 0). Entropy percentiles are exact global
order statistics from the same radix select the forking threshold uses.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megafork.algo.rollout_correction import correction_metrics, correction_sums, rollout_correction
from megafork.algo.segments import to_rows
from megafork.analysis.io import write_entropy_dump
from megafork.forking import topk_threshold
from megafork.train.packing import layout_stats
from megafork.train.shard import broadcast_from, response_tokens
from megafork.train.update import reduce_sums


def reporter_rank(groups) -> int:
    """Global rank of the last stage's (tp 0, dp 0, cp 0) rank: it reports token statistics."""
    me = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0
    t = torch.tensor([groups.rank if me else -1], device=groups.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def step_metrics(run, step: int, mbs, sums: dict, rstats, threshold: float, timer, spans=()) -> dict:
    """The metrics of one step, identical on every rank (computed on the last stage, broadcast).

    `spans` are the micro-batch indices of each mini-batch (for the layout metrics).
    """
    g = run.groups
    token_stats = None
    if g.is_last_stage:
        # The threshold too: with PP > 1 rank 0 (the logger) is on the first stage, where it is NaN.
        token_stats = {**_token_stats(mbs, sums, g), **_correction_stats(mbs, run.loss_cfg, g),
                       "entropy_threshold": threshold}
    token_stats = broadcast_from(token_stats, src=reporter_rank(g))
    layout = layout_stats(mbs, spans, g.dp, g.device)  # every stage holds the same micro-batches
    lr = float(run.optimizer.param_groups[0]["lr"])
    seconds = timer.as_metrics()
    total_s = sum(seconds.values()) or math.nan
    m = {
        "reward_mean": rstats.reward_mean, "accuracy": rstats.accuracy,
        "response_len_mean": rstats.response_len_mean, "truncated_fraction": rstats.truncated_fraction,
        "groups_kept": rstats.groups_kept, "groups_short": rstats.groups_short,
        "groups_aborted": rstats.groups_aborted,
        "sampling_rounds": rstats.rounds, "lr": lr,
        **rstats.extra,  # staleness of the trained samples, rollout wait (megafork.train.rollout_ahead)
        **token_stats,
        **layout,
        **seconds,
    }
    m["tokens_per_second"] = token_stats.get("tokens", 0.0) / total_s if total_s == total_s else math.nan
    return m


def _token_stats(mbs, sums: dict, g) -> dict:
    # Per-token results live on the device (old pass, selection); the batch fields on the host.
    ent = _flat(mbs, "entropy")
    resp = _flat_mask(mbs).to(ent.device)
    sel = _flat(mbs, "fork_mask") if mbs and mbs[0].fork_mask is not None else None
    old = response_tokens(mbs, "old_logprobs")
    rollout = response_tokens(mbs, "rollout_logprobs").to(old.device)
    local = {
        "response_tokens": float(resp.sum()),
        "selected_count": float(sel[resp].sum()) if sel is not None else float(sums.get("selected", 0.0)),
        "gap_sum": float((old - rollout).abs().sum()) if old.numel() else 0.0,
        "tokens": float(sum(mb.tokens.numel() for mb in mbs)),
        **{k: v for k, v in sums.items() if k not in ("grad_norm", "grad_norm_max", "skipped_updates")},
    }
    tot = reduce_sums(local, g.dp_cp, g.device)
    n_resp, n_sel = max(tot["response_tokens"], 1.0), max(tot.get("selected", tot["selected_count"]), 1.0)
    out = {
        "selected_count": tot["selected_count"],
        "selected_fraction": tot["selected_count"] / n_resp,
        "logprob_gap": tot["gap_sum"] / n_resp,
        "tokens": tot["tokens"],
        "grad_norm": sums.get("grad_norm", math.nan),  # mean over the step's optimizer steps
        "grad_norm_max": sums.get("grad_norm_max", math.nan),
        "skipped_updates": sums.get("skipped_updates", 0.0),  # same on every rank: not summed
        "loss": tot.get("loss_sum", math.nan) / max(tot.get("normalizer", 0.0), 1.0),
        "clip_fraction_low": tot.get("clipfrac_low_sum", 0.0) / n_sel,
        "clip_fraction_high": tot.get("clipfrac_high_sum", 0.0) / n_sel,
        "approx_kl": tot.get("approx_kl_sum", 0.0) / n_sel,
    }
    if sel is None:  # scope "local": selected in the training pass
        out["selected_count"] = tot.get("selected", 0.0)
        out["selected_fraction"] = out["selected_count"] / n_resp
    for name, ratio in (("entropy_p50", 0.5), ("entropy_p80", 0.2), ("entropy_p95", 0.05)):
        out[name] = topk_threshold(ent, resp, ratio, group=g.dp_cp) if ent.numel() else math.nan
    return out


def _correction_stats(mbs, loss_cfg, g) -> dict:
    """mismatch_kl and the importance-weight statistics of the step (see algo.rollout_correction)."""
    keys = ("mismatch_k3_sum", "mismatch_tokens", "is_weight_sum", "is_weight_max", "is_truncated", "is_tokens",
            "sequences", "sequences_masked")
    local = dict.fromkeys(keys, 0.0)
    for mb in mbs:
        # old log-probs and the fork mask are on the device (old pass), the batch fields on the host
        old = mb.old_logprobs
        rollout, response = mb.rollout_logprobs.to(old.device), mb.response_mask.to(old.device)
        loss_mask = mb.fork_mask if mb.fork_mask is not None else response
        if mb.packed:  # one row per sequence, as the sequence-level statistics expect
            cu = mb.cu_seqlens
            old, rollout, response, loss_mask = (to_rows(x, cu) for x in (old, rollout, response, loss_mask))
        corr = rollout_correction(old, rollout, response, loss_cfg.rollout_correction,
                                  loss_cfg.rollout_is_cap, loss_cfg.rollout_mask_low, loss_cfg.rollout_mask_high)
        part = correction_sums(corr, old, rollout, response, loss_mask, loss_cfg.rollout_is_cap)
        for k in keys:
            local[k] = max(local[k], part[k]) if k == "is_weight_max" else local[k] + part[k]
    w_max = torch.tensor([local.pop("is_weight_max")], dtype=torch.float64, device=g.device)
    if g.dp_cp is not None:
        dist.all_reduce(w_max, op=dist.ReduceOp.MAX, group=g.dp_cp)
    return correction_metrics({**reduce_sums(local, g.dp_cp, g.device), "is_weight_max": float(w_max)})


def _flat(mbs, field):
    return torch.cat([getattr(mb, field).reshape(-1) for mb in mbs]) if mbs else torch.zeros(0)


def _flat_mask(mbs):
    return torch.cat([mb.response_mask.reshape(-1) for mb in mbs]) if mbs else torch.zeros(0, dtype=torch.bool)


def dump_entropy(run, run_dir, step: int, mbs, threshold: float) -> None:
    """Write `entropy_step{N}.pt` from the reporting rank's response tokens (see analysis.io)."""
    g = run.groups
    if not (g.is_last_stage and g.tp_rank == 0 and g.dp_rank == 0 and g.cp_rank == 0) or not mbs:
        return
    ids, ent, sel, resp_idx, pos = [], [], [], [], []
    seq0 = 0
    for mb in mbs:
        rows, cols, seq = mb.response_ids()  # one index per sequence, padded or packed
        ids.append(mb.labels[rows, cols])
        ent.append(mb.entropy[rows, cols].cpu())
        fork = mb.fork_mask if mb.fork_mask is not None else torch.zeros_like(mb.response_mask)
        sel.append(fork[rows, cols].cpu())
        n_seq = int(seq.max()) + 1 if seq.numel() else 0
        first = torch.full((n_seq,), mb.tokens.shape[1], dtype=cols.dtype, device=cols.device)
        first = first.scatter_reduce(0, seq, cols, reduce="amin")
        resp_idx.append(seq + seq0)
        pos.append(cols - first[seq])
        seq0 += n_seq
    write_entropy_dump(run_dir, step + 1, torch.cat(ids), torch.cat(ent).float(), torch.cat(sel),
                       torch.cat(resp_idx), torch.cat(pos), run.cfg.forking.ratio, threshold)
