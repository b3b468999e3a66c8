"""A user's records as a Ray Dataset: Parquet, JSONL or CSV files or folders, local or on any filesystem.

Each record keeps where it came from, so a bad one can be named: `_file` (its path), `_row` (1-based:
the line number in a JSONL or CSV file, the row's position in a Parquet file), `_record` (the row as
a JSON object, its column names as the file has them) or `_error` (why the row could not be read, e.g.
a JSONL line that is not JSON, with the raw line in `_record`). Files are read by Ray tasks, one file
per task, streaming their rows in batches: the driver only lists the files.

The one parser of users' files that the judge job and evaluate's labelled file both use: `user_rows`
turns a batch of those records into `UserRow`s, and `UserColumns` maps our field names onto the
file's columns (`<section>.columns`) and reads a field's text, raising `RowError` naming the column.
A rejected row's reason starts with `UserRow.where` (file:row), so every error names file, row and
column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from themis_ray import fs

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".csv": "csv", ".arrow": "arrow"}  # .arrow: the files of a `datasets` save_to_disk folder
SCHEMA = pa.schema([("_file", pa.string()), ("_row", pa.int64()), ("_record", pa.string()), ("_error", pa.string())])
BATCH_ROWS = 1024


def record_files(uri: str) -> list[str]:
    """The readable files at `uri` (a file, or a folder searched recursively), as paths or URIs."""
    filesystem, path = fs.resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type == pa.fs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    if info.type == pa.fs.FileType.File:
        files = [path]
    else:
        files = [p for p in fs.list_files(uri, recursive=True)
                 if not posixpath.basename(p).startswith(("_", ".")) and _format(p, strict=False)]
        if not files:
            raise FileNotFoundError(f"{uri}: no .parquet, .jsonl or .csv files in this folder")
    _format(files[0])  # a lone file of another kind is a clear error now, not a failed task later
    prefix = uri.split("://", 1)[0] + "://" if fs.is_uri(uri) else ""
    return [prefix + f for f in files]


def _format(path: str, strict: bool = True):
    for suffix, kind in FORMATS.items():
        if path.lower().endswith(suffix):
            return kind
    if strict:
        raise ValueError(f"{path}: not Parquet (.parquet), JSONL (.jsonl), CSV (.csv) or Arrow (.arrow)")
    return None


def _json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _rows(uri: str) -> Iterator[tuple[int, str, str | None]]:
    """(row number, record JSON or raw text, error) for every row of one file."""
    filesystem, path = fs.resolve(uri)
    kind = _format(path)
    if kind in ("parquet", "arrow"):
        number = 0
        for batch in _batches(filesystem, path, kind):
            for record in batch.to_pylist():
                number += 1
                yield number, _json(record), None
        return
    with filesystem.open_input_stream(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        if kind == "jsonl":
            for number, line in enumerate(text, start=1):
                if not line.strip():
                    continue  # blank lines are not records
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, line.rstrip("\r\n"), f"invalid JSON: {err.msg}"
                    continue
                if isinstance(record, dict):
                    yield number, _json(record), None
                else:
                    yield number, line.rstrip("\r\n"), f"expected a JSON object, got {type(record).__name__}"
        else:
            reader = csv.DictReader(text)
            for record in reader:
                # The header is line 1; a record's number is the line it ends on.
                extra = record.pop(None, None)
                if extra:
                    yield reader.line_num, _json(record), f"{len(extra)} more fields than the header names"
                else:
                    yield reader.line_num, _json(record), None


def _batches(filesystem, path: str, kind: str) -> Iterator[pa.RecordBatch]:
    if kind == "parquet":
        yield from pq.ParquetFile(filesystem.open_input_file(path)).iter_batches(batch_size=BATCH_ROWS)
        return
    # `datasets` writes the Arrow IPC stream format; a file written as an IPC file reads too.
    try:
        with filesystem.open_input_stream(path) as raw:
            yield from pa.ipc.open_stream(raw)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(filesystem.open_input_file(path))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def read_file_batches(batch: pa.Table) -> Iterator[pa.Table]:
    """Map function: a batch of file URIs -> their records, in batches of BATCH_ROWS."""
    for uri in batch["file"].to_pylist():
        rows: list = []
        for number, record, error in _rows(uri):
            rows.append((uri, number, record, error))
            if len(rows) == BATCH_ROWS:
                yield _table(rows)
                rows = []
        if rows:
            yield _table(rows)


def _table(rows: list) -> pa.Table:
    return pa.table([pa.array(col, type=f.type) for col, f in zip(zip(*rows), SCHEMA)], schema=SCHEMA)


def read_records(uri: str):
    """A Ray Dataset of every record under `uri` (columns: `SCHEMA`), one read task per file."""
    import ray

    from themis_ray.executor import map_tasks

    files = record_files(uri)
    return map_tasks(ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)),
                     read_file_batches)


# ------------------------------------------------------------------------------ parsing the rows


@dataclass(frozen=True)
class UserRow:
    file: Optional[str]
    row: int  # 1-based, as `_row`
    record: Any  # the row's JSON object (None where it could not be read)
    raw: str  # the row as read: its JSON, or the raw line that was not
    error: Optional[str] = None  # why the row could not be read

    @property
    def where(self) -> str:
        """How an error names the row: file:row (row N where the row has no file)."""
        return f"{self.file}:{self.row}" if self.file else f"row {self.row}"


def user_rows(batch: pa.Table) -> list[UserRow]:
    """A batch of `read_records` rows as `UserRow`s."""
    return [UserRow(path, number, None if error else json.loads(record), record, error)
            for path, number, record, error in zip(batch["_file"].to_pylist(), batch["_row"].to_pylist(),
                                                   batch["_record"].to_pylist(), batch["_error"].to_pylist())]


def numbered_rows(records: list[dict], start: int = 1, file: Optional[str] = None) -> list[UserRow]:
    """Records already in memory as `UserRow`s, numbered from `start`."""
    return [UserRow(file, number, record, _json(record)) for number, record in enumerate(records, start=start)]


class RowError(ValueError):
    """A row that cannot be used; the message names the column and why."""


def as_text(value: Any) -> Optional[str]:
    """A user's value as text: strings as they are, other values as JSON; None (or NaN) stays None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class UserColumns:
    """Our `fields` in a user's file: `<section>.columns` maps a field to the file's column for it
    (unmapped fields are read from the column of their own name)."""

    def __init__(self, section: str, fields: tuple[str, ...], columns: Optional[dict] = None):
        columns = dict(columns or {})
        unknown = sorted(set(columns) - set(fields))
        if unknown:
            raise ValueError(f"{section}.columns: unknown fields {unknown}; fields: {', '.join(fields)}")
        self.section = section
        self.column = {f: columns.get(f, f) for f in fields}

    def name(self, field: str) -> str:
        """How errors name a field: the file's column, then our field."""
        return f"column {self.column[field]!r} ({field})"

    def get(self, record: dict, field: str) -> Any:
        return record.get(self.column[field])

    def text(self, record: dict, field: str) -> Optional[str]:
        return as_text(self.get(record, field))

    def optional(self, record: dict, field: str) -> Optional[str]:
        """The field's text, None when missing or blank."""
        value = self.text(record, field)
        return value if value and value.strip() else None

    def required(self, record: dict, field: str) -> str:
        """The field's text; a RowError naming the column when it is missing or blank."""
        value = self.text(record, field)
        if value is None:
            raise RowError(f"{self.name(field)} is missing")
        if not value.strip():
            raise RowError(f"{self.name(field)} is empty")
        return value

    def check_present(self, present: set[str], needed: tuple[str, ...]) -> None:
        """A needed column absent from every row of the file is a mapping error, not bad rows."""
        missing = [f"{f} (column {self.column[f]!r})" for f in needed if self.column[f] not in present]
        if present and missing:
            raise ValueError(f"{self.section}: the file has no column for {', '.join(missing)}; "
                             f"its columns: {', '.join(sorted(present))}; map them with {self.section}.columns")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str" if isinstance(value, str) or value is None else "json"


def column_kinds(batch: pa.Table) -> dict:
    """For `executor.partials`, per batch of records: the rows, and each column with the kinds of value
    it holds."""
    kinds: dict = {}
    for row in user_rows(batch):
        for key, value in (row.record or {}).items():
            seen = kinds.setdefault(key, {})
            if value is not None:
                seen[_kind(value)] = 1
    return {"rows": batch.num_rows, "columns": kinds}
