"""Progress bars for long loops, shown on rank 0 only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress", "progress_bar"]


def progress(iterable: Iterable[T], total: int | None, description: str, enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar (a plain pass-through when ``enabled`` is False)."""
    if not enabled:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=1.0)


def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "it") -> tqdm:
    """A tqdm bar of ``total`` steps advanced by hand (``update()``, ``close()``), for loops
    whose steps are not one iterable (a no-op bar when ``enabled`` is False)."""
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=1.0, disable=not enabled)
