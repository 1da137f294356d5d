"""Analysis: entropy statistics, forking tables, overlap, plots and `megafork analyze` on synthetic runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megafork.analysis import (
    entropy_percentiles,
    forking_token_table,
    format_token_table,
    list_dumps,
    read_entropy_dump,
    read_metrics,
    top_overlap,
    top_positions,
    topk_threshold,
    write_entropy_dump,
)
from megafork.analysis.cli import main as analyze_main


def test_percentiles_and_threshold_match_numpy_reference():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(1000, generator=g, dtype=torch.float64) ** 4
    mask = torch.rand(1000, generator=g) < 0.7
    pct = entropy_percentiles(e, mask)
    import numpy as np
    ref = np.quantile(e[mask].numpy(), [0.5, 0.8, 0.95])
    assert [pct["p50"], pct["p80"], pct["p95"]] == pytest.approx(ref.tolist(), rel=1e-12)
    tau = topk_threshold(e, 0.2, mask)
    valid = e[mask]
    k = math.ceil(0.2 * valid.numel())
    assert int((valid >= tau).sum()) == k  # continuous values: no ties
    assert tau == float(valid.sort(descending=True).values[k - 1])
    with pytest.raises(ValueError, match=r"ratio: expected a float in \(0, 1\], found 0"):
        topk_threshold(e, 0)
    with pytest.raises(ValueError, match="expected at least one valid token"):
        entropy_percentiles(e, torch.zeros(1000, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: expected 1000 elements"):
        entropy_percentiles(e, torch.ones(3, dtype=torch.bool))


def test_top_overlap():
    e = torch.arange(10, dtype=torch.float32)
    assert top_positions(e, 0.2).tolist() == [9, 8]
    assert top_overlap(e, e.clone(), 0.2) == 1.0
    assert top_overlap(e, -e, 0.2) == 0.0
    b = e.clone()
    b[8] = -1.0  # one of A's two top positions drops out of B's top-2
    assert top_overlap(e, b, 0.2) == 0.5
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert top_positions(e, 0.25, mask).tolist() == [7, 6]  # k = ceil(0.25 * 8) over valid tokens only
    with pytest.raises(ValueError, match=r"one shape, found \(10,\) and \(9,\)"):
        top_overlap(e, e[:9])


def test_forking_token_table():
    ids = torch.tensor([5, 5, 7, 9, 5, 7])
    sel = torch.tensor([True, True, False, True, False, False])
    forking, low = forking_token_table(ids, sel)
    assert forking == {5: 2, 9: 1} and low == {7: 2, 5: 1}
    table = format_token_table(forking, low, lambda i: f"t{i}", top=2)
    assert table.splitlines()[2] == "| 1 | 't5' | 2 | 't7' | 2 |"
    with pytest.raises(ValueError, match="one shape"):
        forking_token_table(ids, sel[:3])


def make_run(run_dir, steps=6):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "reward_mean": -0.5 + 0.1 * s, "accuracy": 0.25 + 0.05 * s}
            if s % 2 == 0:
                row["eval_accuracy"] = 0.2 + 0.06 * s
            f.write(json.dumps(row) + "\n")
    g = torch.Generator().manual_seed(1)
    for step in (2, 6):
        n = 200
        ids = torch.randint(0, 20, (n,), generator=g)
        ent = torch.rand(n, generator=g) ** 6 * (ids % 3 == 0)  # ids divisible by 3 are the uncertain ones
        tau = topk_threshold(ent, 0.2)
        write_entropy_dump(run_dir, step, ids, ent, ent >= tau, torch.arange(n) // 10, torch.arange(n) % 10,
                           ratio=0.2, threshold=tau)
    return run_dir


def test_dump_roundtrip_and_checks(tmp_path):
    run = make_run(tmp_path / "run")
    assert list(list_dumps(run)) == [2, 6]
    d = read_entropy_dump(run / "entropy_step6.pt")
    assert d["step"] == 6 and d["entropy"].dtype == torch.float32 and d["selected"].sum() == 40
    with pytest.raises(ValueError, match="one length"):
        write_entropy_dump(run, 7, torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3),
                           0.2, 0.0)
    torch.save({"step": 1, "ratio": 0.2, "threshold": 0.1, "token_ids": torch.zeros(3)}, run / "entropy_step9.pt")
    with pytest.raises(ValueError, match=r"expected 'token_ids' to be a 1-D torch.int64 tensor, found torch.float32"):
        read_entropy_dump(run / "entropy_step9.pt")
    (run / "bad.jsonl").write_text('{"step": 1}\n{"reward_mean": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:line 2: expected an object with an integer 'step'"):
        read_metrics(run / "bad.jsonl")


def test_analyze_cli_writes_nonempty_pngs(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert analyze_main([str(run), "--top", "10"]) == 0
    out = capsys.readouterr().out
    for name in ("reward_accuracy.png", "entropy_hist.png", "forking_tokens.png"):
        png = run / "plots" / name
        assert png.is_file() and png.stat().st_size > 5000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {png}" in out
    table = (run / "plots" / "forking_tokens.md").read_text()
    # Every forking token has an id divisible by 3 (only those have non-zero entropy).
    forking_ids = [int(line.split("|")[2].strip().strip("'#")) for line in table.splitlines()[2:]
                   if line.split("|")[2].strip()]
    assert forking_ids and all(i % 3 == 0 for i in forking_ids)
    assert "p80" in out and "threshold" in out
    # --overlap of a dump with itself is 1; of different tokens is an error.
    assert analyze_main([str(run), "--overlap", str(run / "entropy_step2.pt"), str(run / "entropy_step2.pt")]) == 0
    assert "overlap: 1.0000" in capsys.readouterr().out
    assert analyze_main([str(run), "--overlap", str(run / "entropy_step2.pt"), str(run / "entropy_step6.pt")]) == 2
    assert "expected two dumps of the same tokens" in capsys.readouterr().err
    assert analyze_main([str(run), "--step", "3"]) == 2
    assert "expected entropy_step3.pt, found dumps for steps [2, 6]" in capsys.readouterr().err
    assert analyze_main([str(tmp_path / "missing")]) == 2


def test_analyze_tolerates_a_cut_off_last_line_and_says_why_plots_are_missing(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    for dump in run.glob("entropy_step*.pt"):
        dump.unlink()  # a run with log.entropy_dump_every=0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "reward_me')  # killed mid-write
    assert analyze_main([str(run)]) == 0
    err = capsys.readouterr().err
    assert (run / "plots" / "reward_accuracy.png").stat().st_size > 5000
    assert "metrics.jsonl:line 7: skipped the last line, cut off mid-write" in err, err
    assert "no entropy_hist.png, forking_tokens.png or forking_tokens.md" in err and "log.entropy_dump_every" in err
    assert len(read_metrics(run / "metrics.jsonl")) == 6
    # Anywhere but the last line, a broken line is still an error naming it.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 8}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:line 7: expected a JSON object, found invalid JSON"):
        read_metrics(run / "metrics.jsonl")
    make_run(tmp_path / "run2")
    (tmp_path / "run2" / "metrics.jsonl").unlink()
    assert analyze_main([str(tmp_path / "run2")]) == 0
    assert "no reward_accuracy.png:" in capsys.readouterr().err
