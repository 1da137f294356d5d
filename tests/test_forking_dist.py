"""Forking-token selection over 1, 2 and 4 gloo ranks against numpy/torch.topk on the gathered values.

Every case is built here in the parent, split into uneven per-rank shards (one rank empty), run
on the ranks, and the per-rank results compared with the unsharded reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafork.forking import num_forking_tokens
from megafork.testing.multirank import run_ranks

RATIOS = (0.2, 1.0, 1e-9)


def _values(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    if name == "ties":  # zeros and heavy duplication
        return torch.tensor([0.0, 0.0, 0.25, 1.0, 3.0])[torch.randint(0, 5, (n,), generator=g)]
    if name == "range":  # 1e-30 .. 1e3
        h = (10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 33 - 30)).float()
        h[::11] = 0.0
        return h
    return torch.exp(torch.randn(n, generator=g) * 2 - 4)


def _good_values() -> torch.Tensor:
    return torch.linspace(0.1, 0.8, 8)


def _make_cases(world: int) -> list[dict]:
    g = torch.Generator().manual_seed(world)
    cases = []
    for name in ("ties", "range", "smooth"):
        # Uneven shards: rank 1 has no tokens at all, rank 0 has padding only in a 2-D block.
        sizes = [(6, 17), (0,), (53,), (5, 3)][:world]
        shards = []
        for r, shape in enumerate(sizes):
            n = int(np.prod(shape))
            h = _values(name, n, g).reshape(shape)
            m = (torch.rand(shape, generator=g) < 0.7) if r != 1 else torch.ones(shape, dtype=torch.bool)
            h = torch.where(m, h, torch.full_like(h, float("nan")))  # junk in the padding must not matter
            shards.append((h, m))
        cases.append({"name": name, "shards": shards})
    none = [(torch.rand(4), torch.zeros(4, dtype=torch.bool)) for _ in range(world)]
    cases.append({"name": "all-empty", "shards": none})
    return cases


def _rank_fn(rank: int, world: int, cases: list[dict]) -> dict:
    import torch.distributed as dist

    import megafork.forking.selection as selection
    from megafork.forking import bottomk_threshold, radix_select, select_forking_tokens, topk_threshold

    group = dist.new_group(list(range(world)))
    out: dict = {"cases": []}
    for case in cases:
        h, m = case["shards"][rank]
        per_ratio = []
        for ratio in RATIOS:
            flat_h = torch.where(m, h, torch.zeros_like(h)).reshape(-1)
            twin = radix_select(flat_h, m.reshape(-1), lambda n, r=ratio: num_forking_tokens(r, n), True,
                                group=group, backend="torch")
            same_seed = torch.Generator().manual_seed(123)  # alike on every rank on purpose
            per_ratio.append({
                "top": topk_threshold(h, m, ratio, group=group),
                "bottom": bottomk_threshold(h, m, ratio, group=group),
                "twin": twin.value,
                "sel_top": select_forking_tokens(h, m, ratio, group=group),
                "sel_bottom": select_forking_tokens(h, m, ratio, mode="bottom", group=group),
                "sel_random": select_forking_tokens(h, m, ratio, mode="random", group=group, generator=same_seed),
                "sel_all": select_forking_tokens(h, m, ratio, mode="all", group=group),
            })
        out["cases"].append(per_ratio)

    # Random keys with massive ties exercise the exact-k tie break across ranks.
    real_keys = selection._random_keys
    selection._random_keys = lambda n, device, generator, salt: torch.randint(
        0, 3, (n,), generator=generator).to(torch.int32).view(torch.float32)
    h, m = cases[0]["shards"][rank]
    out["tied_random"] = select_forking_tokens(h, m, 0.3, mode="random", group=group,
                                               generator=torch.Generator().manual_seed(rank))
    selection._random_keys = real_keys

    # Bad input on one rank: every rank raises (nobody hangs), then the group still works.
    errors = []
    good_h, good_m = _good_values(), torch.ones(8, dtype=torch.bool)
    bad_inputs = {
        "nan": lambda: (torch.tensor([0.1, float("nan")]), torch.ones(2, dtype=torch.bool), 0.2),
        "shape": lambda: (torch.rand(3), torch.ones(4, dtype=torch.bool), 0.2),
        "ratio": lambda: (good_h, good_m, 0.0),
    }
    for kind, make in bad_inputs.items():
        for mode in ("top", "random"):
            args = make() if rank == world - 1 else (good_h, good_m, 0.2)
            try:
                select_forking_tokens(*args, mode=mode, group=group)
                errors.append(None)
            except ValueError as exc:
                errors.append((kind, str(exc)))
    out["errors"] = errors
    # Ranks that disagree on the arguments all raise (world > 1) rather than each select alone.
    mismatch = []
    odd = rank == world - 1
    for ratio, mode in ((0.3 if odd else 0.2, "top"), (0.2, "bottom" if odd else "top"),
                        (0.2, "random" if odd else "top")):
        try:
            select_forking_tokens(good_h, good_m, ratio, mode=mode, group=group)
            mismatch.append(None)
        except ValueError as exc:
            mismatch.append(str(exc))
    out["mismatch"] = mismatch
    out["after_errors"] = topk_threshold(good_h * (rank + 1), good_m, 0.5, group=group)
    out["alike_random"] = select_forking_tokens(torch.zeros(64), torch.ones(64, dtype=torch.bool), 0.25,
                                                mode="random", group=group, generator=torch.Generator().manual_seed(7))
    return out


def _check(world: int, cases: list[dict], results: list[dict]) -> None:
    for ci, case in enumerate(cases):
        valid = [h[m] for h, m in case["shards"]]
        allv = torch.cat([v.reshape(-1) for v in valid]).double().numpy()
        for ri, ratio in enumerate(RATIOS):
            k = num_forking_tokens(ratio, allv.size)
            res = [results[r]["cases"][ci][ri] for r in range(world)]
            if k == 0:
                assert all(x["top"] == float("inf") and x["bottom"] == float("-inf") for x in res)
                assert all(not x[s].any() for x in res for s in ("sel_top", "sel_bottom", "sel_random"))
                continue
            desc = np.sort(allv)[::-1]
            tau, tau_b = float(desc[k - 1]), float(desc[allv.size - k])
            if allv.size:
                assert tau == float(torch.topk(torch.from_numpy(allv), k).values.min())
            n_top = n_bottom = n_random = 0
            for r, (h, m) in enumerate(case["shards"]):
                x = res[r]
                assert x["top"] == tau and x["twin"] == tau and x["bottom"] == tau_b, (case["name"], ratio, r)
                assert torch.equal(x["sel_top"], m & (h >= tau))
                assert torch.equal(x["sel_bottom"], m & (h <= tau_b))
                assert torch.equal(x["sel_all"], m)
                assert not (x["sel_random"] & ~m).any()
                n_top += int(x["sel_top"].sum())
                n_bottom += int(x["sel_bottom"].sum())
                n_random += int(x["sel_random"].sum())
            assert n_top >= k and int((allv > tau).sum()) < k
            assert n_bottom >= k
            assert n_random == k  # exact over the group
    # Exact k under massive key ties.
    shards = cases[0]["shards"]
    k = num_forking_tokens(0.3, sum(int(m.sum()) for _, m in shards))
    tied = [results[r]["tied_random"] for r in range(world)]
    assert sum(int(t.sum()) for t in tied) == k
    assert all(not (t & ~m).any() for t, (_, m) in zip(tied, shards))

    bad = world - 1
    for r in range(world):
        errs = results[r]["errors"]
        assert all(e is not None for e in errs), f"rank {r} did not raise: {errs}"
        for kind, msg in errs:
            if r == bad:
                assert msg.startswith(f"rank {bad}: ")
                expected = {"nan": "1 NaN", "shape": "same shape, found (3,) and (4,)", "ratio": "found 0.0"}[kind]
                assert expected in msg, msg
            else:
                assert msg.startswith(f"rank {r}: ") and f"rank(s) [{bad}] found invalid input" in msg, msg
    for r in range(world):
        for msg in results[r]["mismatch"]:
            if world == 1:
                assert msg is None
            else:
                assert msg is not None and msg.startswith(f"rank {r}: ") and "different arguments" in msg, msg
    # After the errors the collectives are still aligned and exact.
    after = torch.cat([_good_values() * (r + 1) for r in range(world)])
    expected = float(torch.topk(after, num_forking_tokens(0.5, after.numel())).values.min())
    assert all(results[r]["after_errors"] == expected for r in range(world))
    # Ranks with the same seed and the same shapes still draw independent random selections.
    alike = [results[r]["alike_random"] for r in range(world)]
    assert sum(int(a.sum()) for a in alike) == num_forking_tokens(0.25, 64 * world)
    assert len({tuple(a.tolist()) for a in alike}) == world


@pytest.mark.parametrize("world", [1, 2, 4])
def test_selection_over_ranks_matches_gathered_reference(world):
    cases = _make_cases(world)
    results = run_ranks(_rank_fn, world, args=(cases,), timeout=240)
    _check(world, cases, results)
