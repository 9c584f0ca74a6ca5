"""Evaluation: run a Grounder over records, score it (Acc@0.5 first), write reports."""

from .evaluate import EvalResult, ItemResult, compute_metrics, evaluate
from .report import (
    comparison_markdown,
    comparison_rows,
    load_result,
    metrics_markdown,
    plot_comparison,
    plot_examples,
    plot_metrics,
    write_report,
)

__all__ = [
    "EvalResult",
    "ItemResult",
    "evaluate",
    "compute_metrics",
    "write_report",
    "metrics_markdown",
    "load_result",
    "plot_metrics",
    "plot_examples",
    "comparison_markdown",
    "comparison_rows",
    "plot_comparison",
]
