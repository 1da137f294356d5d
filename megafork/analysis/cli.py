"""`megafork analyze RUN_DIR`: regenerate a run's plots and print its entropy statistics.

    megafork analyze runs/tiny_cpu                       # plots of the latest entropy dump
    megafork analyze runs/tiny_cpu --step 40 --top 30
    megafork analyze runs/tiny_cpu --overlap runs/a/entropy_step0.pt runs/b/entropy_step0.pt  # same tokens only
    megafork analyze overlap --base runs/tiny_cpu/hf_sft --run runs/tiny_cpu --prompts 128

`analyze overlap` is the paper's measure (`megafork.analysis.overlap`): the base model's responses
re-scored by the base and by every checkpoint of the run.

Reads the files described in `megafork.analysis.io` and writes into RUN_DIR/plots/:
reward_accuracy.png, entropy_hist.png, forking_tokens.png, plus forking_tokens.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from megafork.analysis.io import list_dumps, read_entropy_dump, read_metrics
from megafork.analysis.plots import plot_entropy_histogram, plot_token_frequencies, plot_training_curves
from megafork.analysis.stats import (
    PAPER_FRACTION_BELOW_001,
    PAPER_P80,
    entropy_percentiles,
    entropy_summary,
    forking_token_table,
    format_token_table,
    top_overlap,
)


def _decoder(run_dir: Path, tokenizer_dir: str | None):
    """id -> text with the run's tokenizer; ids shown as '#id' when none can be found (and said so)."""
    path = tokenizer_dir
    if path is None and (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        path = (cfg.get("model") or {}).get("hf_path") or None
    if path and Path(path).is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return lambda i: tok.decode([i])
    print(f"analyze: no tokenizer found (looked at {path or 'config.yaml model.hf_path'}); showing token ids",
          file=sys.stderr)
    return lambda i: f"#{i}"


def analyze(run_dir: str | Path, step: int | None = None, tokenizer: str | None = None, top: int = 30) -> dict:
    """Write the run's plots and return what was computed.

    Args:
        run_dir: the run directory.
        step: which entropy dump to use (None = the latest).
        tokenizer: HF tokenizer directory (default: `model.hf_path` from RUN_DIR/config.yaml).
        top: rows in the token tables.

    Returns:
        {"plots": [paths], "percentiles": {...} | None, "threshold": float | None, "table": str | None,
         "notes": [why a plot is missing, or a line was skipped]}.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {str(run)!r}: expected a directory, found nothing there")
    plots_dir = run / "plots"
    notes: list[str] = []
    result: dict = {"plots": [], "percentiles": None, "summary": None, "threshold": None, "table": None,
                    "notes": notes}
    metrics = run / "metrics.jsonl"
    dumps = list_dumps(run)
    if not metrics.is_file() and not dumps:
        raise FileNotFoundError(f"run directory {str(run)!r}: expected metrics.jsonl or entropy_step*.pt, found "
                                f"neither")
    if not metrics.is_file():
        notes.append(f"no reward_accuracy.png: {metrics} does not exist")
    else:
        rows = read_metrics(metrics, notes)
        if rows:
            result["plots"].append(plot_training_curves(rows, plots_dir / "reward_accuracy.png"))
        else:
            notes.append(f"no reward_accuracy.png: {metrics} has no rows yet")
    if not dumps:
        notes.append(f"no entropy_hist.png, forking_tokens.png or forking_tokens.md: {run} has no "
                     "entropy_step*.pt dumps; the run writes them when log.entropy_dump_every > 0")
    else:
        if step is None:
            step = max(dumps)
        if step not in dumps:
            raise FileNotFoundError(f"{run}: expected entropy_step{step}.pt, found dumps for steps {list(dumps)}")
        dump = read_entropy_dump(dumps[step])
        result["percentiles"] = entropy_percentiles(dump["entropy"])
        result["summary"] = entropy_summary(dump["entropy"], dump["selected"])
        result["threshold"] = dump["threshold"]
        result["plots"].append(plot_entropy_histogram(
            dump["entropy"], dump["threshold"], plots_dir / "entropy_hist.png",
            title=f"response-token entropy, step {step} (rho={dump['ratio']:g})"))
        forking, low = forking_token_table(dump["token_ids"], dump["selected"])
        decode = _decoder(run, tokenizer)
        result["plots"].append(plot_token_frequencies(forking, low, decode, plots_dir / "forking_tokens.png", top))
        result["table"] = format_token_table(forking, low, decode, top)
        (plots_dir / "forking_tokens.md").write_text(result["table"] + "\n")
    return result


def overlap_main(argv: list[str]) -> int:
    """`megafork analyze overlap --base HF_DIR --run RUN_DIR [--prompts N]`."""
    from megafork.analysis.overlap import overlap_analysis, overlap_markdown, plot_overlap

    p = argparse.ArgumentParser(prog="megafork analyze overlap",
                                description="top-rho position overlap of a run's checkpoints with its base model")
    p.add_argument("--base", required=True, help="the HF directory the run started from")
    p.add_argument("--run", required=True, help="the run directory (config.yaml, checkpoints/)")
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts the base model answers")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the base responses")
    args = p.parse_args(argv)
    try:
        rows = overlap_analysis(args.base, args.run, args.prompts, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"megafork analyze overlap: {e}", file=sys.stderr)
        return 2
    table = overlap_markdown(rows)
    plots = Path(args.run) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "overlap.md").write_text(table + "\n")
    print(table)
    print(f"wrote {plots / 'overlap.md'}\nwrote {plot_overlap(rows, plots / 'overlap.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["overlap"]:
        return overlap_main(argv[1:])
    p = argparse.ArgumentParser(prog="megafork analyze", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="runs/<name>")
    p.add_argument("--step", type=int, default=None, help="entropy dump step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: model.hf_path of config.yaml)")
    p.add_argument("--top", type=int, default=30, help="rows in the token tables")
    p.add_argument("--overlap", nargs=2, metavar=("DUMP_A", "DUMP_B"), default=None,
                   help="print the top-rho position overlap of two dumps of the same tokens")
    args = p.parse_args(argv)
    try:
        if args.overlap:
            a, b = (read_entropy_dump(x) for x in args.overlap)
            if not (a["token_ids"].shape == b["token_ids"].shape and bool((a["token_ids"] == b["token_ids"]).all())):
                raise ValueError(f"--overlap: expected two dumps of the same tokens, found {a['token_ids'].numel()} "
                                 f"and {b['token_ids'].numel()} tokens that differ")
            print(f"top-{a['ratio']:g} overlap: {top_overlap(a['entropy'], b['entropy'], a['ratio']):.4f}")
            return 0
        result = analyze(args.run_dir, args.step, args.tokenizer, args.top)
    except (FileNotFoundError, ValueError) as e:
        print(f"megafork analyze: {e}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"megafork analyze: {note}", file=sys.stderr)
    if result["percentiles"] is not None:
        pct = ", ".join(f"{k} {v:.4g}" for k, v in result["percentiles"].items())
        print(f"response-token entropy: {pct}; threshold {result['threshold']:.4g}")
        e = result["summary"]
        print(f"tokens with entropy < 0.01: {100 * e['fraction_below_0.01']:.1f}% (paper, Qwen3-8B: more than "
              f"{100 * PAPER_FRACTION_BELOW_001:.0f}%); p80 {result['percentiles']['p80']:.3f} (paper: {PAPER_P80})")
        print(f"mean entropy: forking tokens {e['forking_mean']:.4f}, other tokens {e['non_forking_mean']:.4f}")
        print(result["table"])
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
