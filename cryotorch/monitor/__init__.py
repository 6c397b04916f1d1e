"""Monitoring: progress bars, TensorBoard scalars and images, PNG plots."""

from cryotorch.monitor.plots import save_fsc_plot
from cryotorch.monitor.progress import progress
from cryotorch.monitor.tensorboard import log_central_slices, log_curve, log_scalars

__all__ = ["progress", "save_fsc_plot", "log_central_slices", "log_curve", "log_scalars"]
