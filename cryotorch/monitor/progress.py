"""Progress bars for long loops, shown on rank 0 only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress"]


def progress(iterable: Iterable[T], total: int | None, description: str, enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar (a plain pass-through when ``enabled`` is False)."""
    if not enabled:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=1.0)
