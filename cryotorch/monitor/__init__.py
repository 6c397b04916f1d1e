"""Monitoring: progress bars, TensorBoard scalars and images, phase timings; PNG plots in
:mod:`cryotorch.monitor.plots`, imported by the jobs that write them (Matplotlib takes half a
second to import, which every other job would pay at start-up)."""

from cryotorch.monitor.progress import progress, progress_bar
from cryotorch.monitor.tensorboard import log_central_slices, log_curve, log_scalars
from cryotorch.monitor.timing import PhaseTimer

__all__ = ["progress", "progress_bar", "log_central_slices", "log_curve", "log_scalars", "PhaseTimer"]
