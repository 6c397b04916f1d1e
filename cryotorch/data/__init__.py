"""Particle data: typed tables to tensors, half-set splits, sharding and batching."""

from cryotorch.data.particles import ParticleBatch, ctf_parameters, half_set_labels, iterate_batches, tree_leaves

__all__ = ["ParticleBatch", "ctf_parameters", "half_set_labels", "iterate_batches", "tree_leaves"]
