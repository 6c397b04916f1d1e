"""Sums over particles that processes add in a fixed order: dataclasses of tensor sums, and
the summation tree over the batches of an iteration (:func:`~cryotorch.data.particles.tree_leaves`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Generic, Self, TypeVar

import torch

__all__ = ["TensorSums", "SumTree"]


class TensorSums:
    """Base of the dataclasses whose fields are sums of tensors, added, scaled and zeroed
    field by field; one whose sums are held in other :class:`TensorSums` lists them in
    :meth:`tensors`."""

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, in a fixed order, for summation across processes."""
        return [getattr(self, field.name) for field in fields(self)]  # type: ignore[arg-type]

    def add_(self, other: Self) -> Self:
        """Add ``other``'s sums in place."""
        for tensor, addend in zip(self.tensors(), other.tensors(), strict=True):
            tensor.add_(addend)
        return self

    def mul_(self, factor: float) -> Self:
        """Scale every sum in place (decay of running statistics)."""
        for tensor in self.tensors():
            tensor.mul_(factor)
        return self

    def zero_(self) -> Self:
        """Set every sum to zero in place (a buffer for reuse)."""
        for tensor in self.tensors():
            tensor.zero_()
        return self


_Sums = TypeVar("_Sums", bound=TensorSums)


class SumTree(Generic[_Sums]):
    """Sums of the leaves of a fixed binary tree, added in the tree's order: leaves 2j and
    2j + 1 make node j of the level above, and so on up to the root.

    Leaves arrive left to right (a rank's consecutive run of them,
    :func:`~cryotorch.data.particles.tree_leaves`), and two siblings are added as soon as
    both are there, so that at most one node per level is held. A run of 2^m leaves that
    starts at a multiple of 2^m ends as one node, with the same bits whichever process
    summed it.
    """

    def __init__(self) -> None:
        self.nodes: list[tuple[int, int, _Sums]] = []  # (level, index, sums), left to right

    def add_leaf(self, index: int, sums: _Sums) -> list[_Sums]:
        """Take the sums of leaf ``index``; returns the sums this added into their left
        siblings, whose memory the caller may reuse."""
        level = 0
        added = []
        while index % 2 == 1 and self.nodes and self.nodes[-1][:2] == (level, index - 1):
            added.append(sums)
            sums = self.nodes.pop()[2].add_(sums)
            level, index = level + 1, index // 2
        self.nodes.append((level, index, sums))
        return added

    def total(self) -> _Sums | None:
        """The nodes held, added left to right (None for none); the tree empties."""
        nodes, self.nodes = self.nodes, []
        if not nodes:
            return None
        total = nodes[0][2]
        for _, _, sums in nodes[1:]:
            total.add_(sums)
        return total
