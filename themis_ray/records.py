"""A user's records as a Ray Dataset: Parquet, JSONL or CSV files or folders, local or on any filesystem.

Each record keeps where it came from, so a bad one can be named: `_file` (its path), `_row` (1-based:
the line number in a JSONL or CSV file, the row's position in a Parquet file), `_record` (the row as
a JSON object, its column names as the file has them) or `_error` (why the row could not be read, e.g.
a JSONL line that is not JSON, with the raw line in `_record`). Files are read by Ray tasks, one file
per task, streaming their rows in batches: the driver only lists the files.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from themis_ray import fs

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".csv": "csv"}
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
        raise ValueError(f"{path}: not Parquet (.parquet), JSONL (.jsonl) or CSV (.csv)")
    return None


def _json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _rows(uri: str) -> Iterator[tuple[int, str, str | None]]:
    """(row number, record JSON or raw text, error) for every row of one file."""
    filesystem, path = fs.resolve(uri)
    kind = _format(path)
    if kind == "parquet":
        number = 0
        for batch in pq.ParquetFile(filesystem.open_input_file(path)).iter_batches(batch_size=BATCH_ROWS):
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
