"""Evaluation helpers that need no model: metric tables and plots (Matplotlib, Agg backend).
The needle-in-a-haystack grid, which restores a checkpoint, is :mod:`memjax.train.needle`."""
from memjax.eval.plots import metrics_table_markdown, plot_loss_curves, plot_needle_heatmap

__all__ = ["metrics_table_markdown", "plot_loss_curves", "plot_needle_heatmap"]
