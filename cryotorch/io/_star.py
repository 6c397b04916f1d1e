"""Generic STAR file reading and writing (the subset RELION reads and writes).

A STAR file is a sequence of ``data_<name>`` blocks. Each block holds either ``_key value``
pairs or one ``loop_`` table (``_label`` lines, then one whitespace-separated row per line).
Values are bare words or quoted with ``"`` or ``'``; ``#`` starts a comment. Blocks are
returned as ``{name: DataFrame}`` for loops and ``{name: {key: value}}`` for pairs, with the
leading ``data_`` and ``_`` removed (``data_optics`` → ``"optics"``, ``_rlnVoltage`` →
``"rlnVoltage"``). Numeric columns become int64 or float64; others stay strings.

The parser is written here rather than delegated to a CSV reader so that every malformed
file is reported with its line number and what is wrong (a row with too many or too few
values, a second loop in one block, a value outside any block ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cryotorch.errors import InputError
from cryotorch.io._atomic import atomic_output_path

__all__ = ["read_star", "write_star", "StarBlock"]

StarBlock = pd.DataFrame | dict[str, object]

# A quote opens a value only at the start of a token and closes it only before whitespace,
# so apostrophes inside words ("5'-end") stay part of the word, as the STAR grammar says.
_TOKEN = re.compile(r"\"(.*?)\"(?=\s|$)|'(.*?)'(?=\s|$)|(\S+)")


def _tokenize(line: str) -> list[str]:
    """Split one line into values, dropping a trailing ``#`` comment."""
    if '"' not in line and "'" not in line:
        # Fast path for the millions of unquoted rows in particle files.
        tokens = line.split()
        for position, token in enumerate(tokens):
            if token.startswith("#"):
                return tokens[:position]
        return tokens
    tokens = []
    for match in _TOKEN.finditer(line):
        bare = match.group(3)
        if bare is not None and bare.startswith("#"):
            break
        tokens.append(bare if bare is not None else match.group(1) if match.group(1) is not None else match.group(2))
    return tokens


def _convert_scalar(value: str) -> object:
    """Return ``value`` as int, float or the original string, whichever parses first."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def _convert_column(values: list[str]) -> pd.Series:
    """Return a column as int64 or float64 when every value is numeric, else as strings."""
    series = pd.Series(values)
    if "" in values:
        # pandas would turn an empty string into NaN; keep the text as written.
        return series
    try:
        return pd.to_numeric(series)
    except (ValueError, TypeError):
        return series


class _BlockBuilder:
    """Accumulates one ``data_`` block while the parser walks the lines."""

    def __init__(self, name: str, line_number: int) -> None:
        self.name = name
        self.line_number = line_number
        self.pairs: dict[str, object] = {}
        self.columns: list[str] | None = None
        self.rows: list[list[str]] = []

    def to_block(self) -> StarBlock:
        if self.columns is None:
            return self.pairs
        by_column = zip(*self.rows) if self.rows else ([] for _ in self.columns)
        return pd.DataFrame(
            {column: _convert_column(list(values)) for column, values in zip(self.columns, by_column)}
        )


def read_star(path: str | os.PathLike[str]) -> dict[str, StarBlock]:
    """Read every block of a STAR file.

    Parameters
    ----------
    path
        STAR file.

    Returns
    -------
    dict[str, pandas.DataFrame | dict[str, object]]
        Blocks in file order, keyed by name without ``data_``: a DataFrame (one column per
        label, without the leading ``_``) for a loop, a dict for ``_key value`` pairs.

    Raises
    ------
    InputError
        If the file is missing or malformed; the message names the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read STAR file {path}: {error}; check the path") from error

    def fail(line_number: int, problem: str, fix: str) -> InputError:
        return InputError(f"malformed STAR file {path}, line {line_number}: {problem}; {fix}")

    blocks: dict[str, StarBlock] = {}
    current: _BlockBuilder | None = None
    in_loop_header = False  # between ``loop_`` and the first row of that loop

    def finish(block: _BlockBuilder | None) -> None:
        if block is None:
            return
        if block.name in blocks:
            raise fail(block.line_number, f"block data_{block.name} appears twice", "rename or remove one")
        blocks[block.name] = block.to_block()

    for line_number, line in enumerate(text.splitlines(), start=1):
        tokens = _tokenize(line)
        if not tokens:
            continue
        first = tokens[0]
        if first.startswith("data_"):
            if len(tokens) > 1:
                raise fail(line_number, f"unexpected text after {first}", "put each block name on its own line")
            finish(current)
            current = _BlockBuilder(first[len("data_"):], line_number)
            in_loop_header = False
        elif current is None:
            raise fail(line_number, f"'{first}' appears before any data_ block", "start the file with a data_ line")
        elif first == "loop_":
            if current.columns is not None:
                raise fail(
                    line_number,
                    f"a second loop_ in block data_{current.name}",
                    "give each table its own data_ block",
                )
            if current.pairs:
                raise fail(
                    line_number,
                    f"block data_{current.name} mixes _key value pairs with a loop_",
                    "move the pairs or the loop into a block of its own",
                )
            current.columns = []
            in_loop_header = True
        elif first.startswith("_") and in_loop_header and not current.rows:
            if len(tokens) > 1:
                raise fail(line_number, f"unexpected value after loop label {first}", "put one label per line")
            current.columns.append(first[1:])
        elif first.startswith("_"):
            if current.columns is not None:
                raise fail(
                    line_number,
                    f"label {first} after the rows of the loop in block data_{current.name}",
                    "give each table its own data_ block",
                )
            if len(tokens) != 2:
                raise fail(line_number, f"{first} needs exactly one value, found {len(tokens) - 1}", "quote values with spaces")
            current.pairs[first[1:]] = _convert_scalar(tokens[1])
        elif first.startswith(";"):
            raise fail(line_number, "multi-line ';' text fields are not supported", "write the value on one line, quoted")
        elif current.columns is None:
            raise fail(line_number, f"value '{first}' outside any loop_ or _key", "check the block structure")
        else:
            if len(tokens) != len(current.columns):
                raise fail(
                    line_number,
                    f"row {len(current.rows) + 1} of the loop in block data_{current.name} has "
                    f"{len(tokens)} values but the loop declares {len(current.columns)} columns "
                    f"({', '.join(current.columns)})",
                    "give every row one value per column (quote values containing spaces, write \"\" for empty ones)",
                )
            in_loop_header = False
            current.rows.append(tokens)
    finish(current)
    if not blocks:
        raise InputError(f"STAR file {path} holds no data_ block; check that it is a STAR file")
    return blocks


def _format_value(value: object) -> str:
    """STAR text for one value: shortest round-tripping numbers, quoted strings where needed."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    text = str(value)
    if text == "":
        return '""'
    if any(character.isspace() for character in text) or text.startswith(("#", "_", "data_", "loop_")):
        return "'" + text + "'" if '"' in text else '"' + text + '"'
    return text


#: text that :func:`_format_value` would quote: empty, with white space, or read as a STAR keyword
_NEEDS_QUOTES = re.compile(r"\A\Z|\s|\A(?:#|_|data_|loop_)")


def _format_column(column: pd.Series) -> list[str]:
    if pd.api.types.is_float_dtype(column.dtype):
        return [repr(value) for value in column.astype(np.float64).tolist()]
    if pd.api.types.is_integer_dtype(column.dtype):
        return [str(value) for value in column.tolist()]
    # plain strings (image names: one per particle) as they are, the rest value by value
    needs_quotes = _NEEDS_QUOTES.search
    return [value if type(value) is str and not needs_quotes(value) else _format_value(value) for value in column.tolist()]


def write_star(
    path: str | os.PathLike[str],
    blocks: dict[str, StarBlock],
    *,
    relion_version: int | None = None,
) -> None:
    """Write STAR blocks atomically (temporary file in the same folder, then ``os.replace``).

    Parameters
    ----------
    path
        Destination STAR file.
    blocks
        ``{name: DataFrame}`` for loops and ``{name: {key: value}}`` for pairs, names without
        ``data_`` and labels without ``_``, as :func:`read_star` returns them.
    relion_version
        When given (``30001`` for RELION 3.1/4, ``50001`` for RELION 5), a
        ``# version <n>`` line precedes each block, as RELION writes it.
    """
    chunks: list[str] = []
    for name, block in blocks.items():
        if relion_version is not None:
            chunks.append(f"\n# version {relion_version}\n")
        chunks.append(f"\ndata_{name}\n\n")
        if isinstance(block, pd.DataFrame):
            chunks.append("loop_\n")
            chunks.extend(f"_{column} #{index}\n" for index, column in enumerate(block.columns, start=1))
            formatted = [_format_column(block[column]) for column in block.columns]
            chunks.extend(" ".join(row) + "\n" for row in zip(*formatted))
        else:
            width = max((len(key) for key in block), default=0) + 1
            chunks.extend(f"_{key:<{width}} {_format_value(value)}\n" for key, value in block.items())
        chunks.append("\n")
    with atomic_output_path(path) as temp_path:
        temp_path.write_text("".join(chunks))
