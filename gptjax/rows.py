"""Row readers for task files (evaluation tasks, fine-tuning data): JSONL, CSV and TSV
as (line number, dict) pairs; a row that cannot be read is one error naming file:line.

The caller passes the error class its own users catch (`error=`), so a bad row reads
as an evaluation or a fine-tuning input error without wrapping.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

Rows = Iterator[tuple[int, dict]]


class RowError(ValueError):
    """A row that cannot be read; the message starts with file:line."""


def read_jsonl(path: Path, error: type[Exception] = RowError) -> Rows:
    """One JSON object a line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(doc, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(doc).__name__}")
            yield n, doc


def read_csv(path: Path, delimiter: str = ",", error: type[Exception] = RowError) -> Rows:
    """A CSV file with a header row; quotes group fields (Python's csv, QUOTE_MINIMAL)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise error(
                    f"{path}:{reader.line_num}: row does not have the header's "
                    f"{len(reader.fieldnames or [])} columns"
                )
            yield reader.line_num, row


def read_tsv(
    path: Path, columns: Sequence[str] | None = None, error: type[Exception] = RowError
) -> Rows:
    """GLUE-style TSV: split on tabs with no quote handling (GLUE texts hold stray
    quotes); the first line is the header unless `columns` names them."""
    with open(path, encoding="utf-8") as f:
        header = list(columns) if columns else None
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cells = line.split("\t")
            if header is None:
                header = cells
                continue
            if len(cells) != len(header):
                raise error(
                    f"{path}:{n}: {len(cells)} tab-separated columns, expected {len(header)} "
                    f"({', '.join(header)})"
                )
            yield n, dict(zip(header, cells, strict=True))


def read_rows(path: Path, error: type[Exception] = RowError, quoted_tsv: bool = True) -> Rows:
    """Rows of a .csv, .tsv or (any other suffix) .jsonl file. quoted_tsv: a .tsv is
    CSV with tabs (evaluation tasks); False: GLUE's layout, read by read_tsv."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, ",", error)
    if suffix == ".tsv":
        return read_csv(path, "\t", error) if quoted_tsv else read_tsv(path, error=error)
    return read_jsonl(path, error)
