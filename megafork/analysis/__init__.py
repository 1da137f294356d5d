"""Entropy statistics, forking-token tables, checkpoint overlap and plots for a run directory.

    megafork analyze runs/<name>      # the CLI (megafork.analysis.cli)

The on-disk formats (metrics.jsonl keys, entropy_step{N}.pt) are documented in megafork.analysis.io.
"""
from megafork.analysis.io import (
    METRIC_KEYS,
    list_dumps,
    read_entropy_dump,
    read_metrics,
    write_entropy_dump,
)
from megafork.analysis.plots import plot_entropy_histogram, plot_token_frequencies, plot_training_curves
from megafork.analysis.stats import (
    entropy_percentiles,
    forking_token_table,
    format_token_table,
    top_overlap,
    top_positions,
    topk_threshold,
)

__all__ = [
    "METRIC_KEYS", "entropy_percentiles", "forking_token_table", "format_token_table", "list_dumps",
    "plot_entropy_histogram", "plot_token_frequencies", "plot_training_curves", "read_entropy_dump",
    "read_metrics", "top_overlap", "top_positions", "topk_threshold", "write_entropy_dump",
]
