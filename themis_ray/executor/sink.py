"""The write end of every stage: workers write accepted rows and rejects as Parquet parts.

Each write task splits its blocks on `reject_reason` and writes one part per kind, `<stage>/part-*.parquet`
(without the reject column) and `<stage>/_rejects/part-*.parquet`, straight from the worker to the
stage's filesystem. The statistics of each part (row counts are in every Parquet footer; a stage adds
summable figures such as tokens, cost or histograms through `stats`) go into the part's footer, so the
driver tallies a stage from footers and never reads its rows; so does the partition its rows belong to
(one responder's answers, one judge's grades of one benchmark), which the store selects parts by. On a local filesystem a part is written
under a temporary name and renamed, on object storage an upload appears whole or not at all.

A part's name is random, or given by the caller as a digest of the rows' keys (`part_name`): a batch
that runs again (its actor died after writing it, and Ray ran it elsewhere) then replaces its own
parts instead of adding a second copy of its rows, which would break rows in = out + rejected. A
batch run again but cut otherwise is caught after the plan (`plan.drop_duplicates`, which rewrites a
part without its second copies through `rewrite_part`).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from typing import Iterable, Mapping, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource.datasink import Datasink

from themis_ray import fs
from themis_ray.executor.step import Stats
from themis_ray.schema import REJECT, REJECT_COLUMNS
from themis_ray.store import PARTITION_KEY, REJECTS, STATS_KEY, merge_stats, partition_of


class _Part:
    """One Parquet part being written by a write task."""

    def __init__(self, folder: str, name: str, schema: pa.Schema, partition: Optional[dict]):
        filesystem, folder_path = fs.resolve(folder)
        self._open(filesystem, folder_path, name, schema, partition)

    @classmethod
    def within(cls, filesystem: pafs.FileSystem, folder_path: str, name: str, schema: pa.Schema,
               partition: Optional[dict]) -> "_Part":
        """A part at a path within `filesystem` (a part rewritten where it lies)."""
        part = cls.__new__(cls)
        part._open(filesystem, folder_path, name, schema, partition)
        return part

    def _open(self, filesystem, folder_path: str, name: str, schema: pa.Schema, partition: Optional[dict]) -> None:
        self.filesystem = filesystem
        self.filesystem.create_dir(folder_path, recursive=True)
        self.path = posixpath.join(folder_path, name)
        self.local = isinstance(self.filesystem, pafs.LocalFileSystem)
        self.writing = self.path + ".partial" if self.local else self.path
        self.writer = pq.ParquetWriter(self.writing, schema, filesystem=self.filesystem)
        self.rows, self.stats, self.partition = 0, {}, partition

    def write(self, table: pa.Table, stats: dict) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows
        self.stats = merge_stats(self.stats, stats)

    def close(self) -> None:
        if self.stats:
            self.writer.add_key_value_metadata({STATS_KEY.decode(): json.dumps(self.stats)})
        if self.partition:
            self.writer.add_key_value_metadata({PARTITION_KEY.decode(): json.dumps(self.partition, sort_keys=True)})
        self.writer.close()
        if self.local:
            self.filesystem.move(self.writing, self.path)


def part_name(keys: pa.ChunkedArray | pa.Array, partition: Optional[Mapping[str, str]] = None) -> str:
    """A part's name from the keys of the rows it holds and its partition: the same rows of the same
    partition, the same name (one responder's answers to a batch never replace another's)."""
    values = [json.dumps(sorted((partition or {}).items()))] + keys.cast(pa.string()).fill_null("").to_pylist()
    return hashlib.sha256("\x1f".join(values).encode()).hexdigest()[:32]


def _split_rejects(table: pa.Table) -> list[tuple[bool, pa.Table]]:
    """[(rejected, rows)] for the kinds present; a batch of one kind (the usual case) is not copied."""
    flags = table[REJECT]
    if flags.null_count == table.num_rows:
        return [(False, table)]
    if flags.null_count == 0:
        return [(True, table)]
    flagged = pc.is_valid(flags)
    return [(False, table.filter(pc.invert(flagged))), (True, table.filter(flagged))]


class StageSink(Datasink):
    def __init__(self, stage_uri: str, schema: pa.Schema, partition: Optional[Mapping[str, str]] = None,
                 stats: Optional[Stats] = None):
        self.stage_uri, self.schema, self.stats = stage_uri, schema, stats
        self.partition = partition_of(partition)
        self.accepted_schema = pa.schema([f for f in schema if f.name not in REJECT_COLUMNS])
        self.rows_out = self.rows_rejected = 0

    def get_name(self) -> str:
        return "WriteStage"

    def write(self, blocks: Iterable, ctx, name: Optional[str] = None) -> dict:
        """Write the blocks as one part per kind; `name` (see `part_name`) replaces the parts a
        previous run of the same rows wrote, of either kind."""
        fixed, name = name is not None, f"part-{name or uuid.uuid4().hex}.parquet"
        parts: dict[bool, _Part] = {}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if not table.num_rows:
                continue
            table = table.select(self.schema.names)
            if table.schema != self.schema:
                table = table.cast(self.schema)
            for rejected, rows in _split_rejects(table):
                if rejected not in parts:
                    folder = fs.join(self.stage_uri, REJECTS) if rejected else self.stage_uri
                    parts[rejected] = _Part(folder, name, self.schema if rejected else self.accepted_schema,
                                            self.partition)
                stats = self.stats(rows, rejected) if self.stats else {}
                parts[rejected].write(rows if rejected else rows.select(self.accepted_schema.names), stats)
        for part in parts.values():
            part.close()
        for rejected in {False, True} - set(parts) if fixed else ():
            # That run split its rows otherwise (a row accepted then, rejected now): its part goes.
            fs.delete(fs.join(self.stage_uri, REJECTS, name) if rejected else fs.join(self.stage_uri, name))
        return {"rows": parts[False].rows if False in parts else 0,
                "rejected": parts[True].rows if True in parts else 0}

    def on_write_complete(self, write_result) -> None:
        self.rows_out = sum(r["rows"] for r in write_result.write_returns)
        self.rows_rejected = sum(r["rejected"] for r in write_result.write_returns)


def rewrite_part(filesystem: pafs.FileSystem, path: str, keep: pa.Array, rejected: bool,
                 stats: Optional[Stats] = None) -> None:
    """A written part again with only its rows where `keep` is true (deleted when none is left), its
    partition kept and its statistics recomputed with `stats` (over those rows, `rejected` saying
    which kind they are)."""
    table = pq.read_table(path, filesystem=filesystem).filter(keep)
    if not table.num_rows:
        filesystem.delete_file(path)
        return
    meta = pq.read_metadata(path, filesystem=filesystem).metadata or {}
    partition = json.loads(meta[PARTITION_KEY]) if PARTITION_KEY in meta else None
    folder = posixpath.dirname(path)
    part = _Part.within(filesystem, folder, posixpath.basename(path), table.schema.remove_metadata(), partition)
    part.write(table.replace_schema_metadata(None), stats(table, rejected) if stats else {})
    part.close()
