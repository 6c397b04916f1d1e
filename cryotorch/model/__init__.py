"""Stateful model parts as torch modules: class volumes, noise, priors."""

from cryotorch.model.class_model import ClassModel

__all__ = ["ClassModel"]
