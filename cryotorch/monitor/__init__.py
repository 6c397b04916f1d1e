"""Monitoring: progress bars, TensorBoard scalars and images, PNG plots, phase timings."""

from cryotorch.monitor.plots import save_class_sizes_plot, save_fsc_plot, save_histogram_plot
from cryotorch.monitor.progress import progress, progress_bar
from cryotorch.monitor.tensorboard import log_central_slices, log_curve, log_scalars
from cryotorch.monitor.timing import PhaseTimer

__all__ = ["progress", "progress_bar", "save_fsc_plot", "save_histogram_plot", "save_class_sizes_plot", "log_central_slices", "log_curve", "log_scalars", "PhaseTimer"]
