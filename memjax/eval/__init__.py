"""Evaluation reports: figures and tables from run directories, and the needle-in-a-haystack grid."""
from memjax.eval.needle import needle_grid, save_needle_grid
from memjax.eval.plots import metrics_table_markdown, plot_loss_curves, plot_needle_heatmap

__all__ = ["metrics_table_markdown", "needle_grid", "plot_loss_curves", "plot_needle_heatmap", "save_needle_grid"]
