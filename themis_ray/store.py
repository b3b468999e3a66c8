"""A stage's output on any filesystem: `<run_dir>/<stage>/` with Parquet parts, `_rejects/` and `_manifest.json`.

Workers write the parts (`executor.StageSink`); the driver only lists them and reads their footers.
Object stores have no atomic rename, so a stage is done when its manifest exists, and the manifest
lists the files that make up the stage: a reader trusts nothing else. The manifest is deleted first
when a stage starts again and written last when it ends.

A folder is the store's once it holds `_stage.json` (or, from older runs, a manifest or an attempt
marker): `begin` refuses to clear a non-empty folder without one, so a mistyped output path never
empties a folder of someone's data.

A fresh start keeps `_cache/` (the answers an endpoint was paid for, `engines.cache`): only their
requests decide them, never the run that asked.

`_attempt.json` holds the fingerprint of a run in progress: a run with the same fingerprint (after a
crash or an interrupt) keeps what the workers already wrote and sends only the rows that are not yet
written; any other run clears the folder. Row counts and the sums a stage reports (tokens, cost,
histograms) come from the parts' footers, where each write task puts the statistics of its file, and
the partition its rows belong to: a stage selects its parts by partition, never by file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from themis_ray import fs

MANIFEST = "_manifest.json"
ATTEMPT = "_attempt.json"
MARKER = "_stage.json"  # written when the store first takes a folder, kept across runs
REJECTS = "_rejects"
WORK = "_work"  # a stage's intermediate data (kept for a resume, never read by another stage)
CACHE = "_cache"  # a judge job's request cache (`engines.cache`): kept when the folder starts afresh
STATS_KEY = b"themis.stats"  # footer key of a part's summable statistics (JSON)
PARTITION_KEY = b"themis.partition"  # footer key of the partition a part's rows belong to ({column: value}, JSON)
COMPACTED_KEY = b"themis.compacted_from"  # footer key of a merged part: the names of the parts it replaces
FOOTERS_AT_ONCE = 256  # footers read in parallel (and held) at a time while tallying


@dataclass
class StageResult:
    """What a stage reports beside the parts its workers wrote."""

    rows_in: int
    # For fan-out stages (one input unit -> several rows): how many input units succeeded.
    units_ok: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """Intermediate data of a stage under `_work/<name>`, filled once per key and kept for a resume."""

    store: "StageStore"
    done: bool  # an earlier run of this stage finished it with the same key: nothing to fill
    resume: bool  # an interrupted fill with the same key left parts to keep
    # What the filling block knows: the commit checks rows in = units ok + rejected against the tally.
    rows_in: Optional[int] = None  # None: the rows the tally counts (nothing to check)
    units_ok: Optional[int] = None


@dataclass
class Tally:
    """What the workers wrote: the parts, their row counts and their summed statistics."""

    files: list[str]  # names relative to the stage folder
    reject_files: list[str]
    rows_out: int
    rows_rejected: int
    stats: dict[str, Any]


def merge_stats(a: dict, b: dict) -> dict:
    """Summable statistics: numbers add, nested dicts merge key by key."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            out[key] = merge_stats(out.get(key) or {}, value)
        else:
            out[key] = (out.get(key) or 0) + value
    return out


def partition_of(partition: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """A partition as footers hold it: {column: value} as strings; None for none."""
    return {str(k): str(v) for k, v in partition.items()} if partition else None


def footer_partition(meta: pq.FileMetaData) -> Optional[dict]:
    """The partition a part's footer records, or None."""
    blob = (meta.metadata or {}).get(PARTITION_KEY)
    return json.loads(blob) if blob else None


class StageStore:
    def __init__(self, run_dir: str, stage: str):
        self._open(fs.join(str(run_dir), stage), stage)

    @classmethod
    def at(cls, uri: str) -> "StageStore":
        """A store whose folder is `uri` itself (a job's output folder, say)."""
        store = cls.__new__(cls)
        uri = str(uri).rstrip("/") if fs.is_uri(uri) else fs.join(uri)
        store._open(uri, posixpath.basename(uri.rstrip("/")))
        return store

    def _open(self, uri: str, stage: str) -> None:
        self.stage, self.uri = stage, uri
        self.fs, self.path = fs.resolve(uri)
        self._tally: Optional[Tally] = None

    def file(self, *parts: str) -> str:
        """A path (or URI) inside the stage folder."""
        return fs.join(self.uri, *parts)

    @contextmanager
    def local_folder(self, *parts: str) -> Iterator[str]:
        """A local folder whose files end up at `parts` inside the stage folder: the folder itself on a
        local filesystem, a temporary one uploaded on exit when the stage is on object storage (for
        libraries that write only local files: plots, reports, model folders)."""
        if not fs.is_uri(self.uri):
            folder = self.file(*parts)
            os.makedirs(folder, exist_ok=True)
            yield folder
            return
        with tempfile.TemporaryDirectory(prefix="themis-out-") as folder:
            yield folder
            fs.upload_dir(folder, self.file(*parts))

    @contextmanager
    def checkpoint(self, name: str, key: dict, resume: bool, resumable: bool = True) -> Iterator[Checkpoint]:
        """A sub-store `_work/<name>` of this stage: begun on entry unless a resumed stage (`resume`)
        finished it with the same `key` (`done`), committed from its tally when the block ends. A
        `resumable` fill keeps what an interrupted fill of the same key wrote; any other starts afresh."""
        work = StageStore(self.uri, posixpath.join(WORK, name))
        done = resume and work.is_done(key)
        point = Checkpoint(work, done=done, resume=False if done else work.begin(key, force=not resumable))
        yield point
        if not point.done:
            tally = work.tally()
            rows_in = point.rows_in if point.rows_in is not None else tally.rows_out + tally.rows_rejected
            work.commit(StageResult(rows_in=rows_in, units_ok=point.units_ok), key, 0.0)

    # -- reading ---------------------------------------------------------------------------------
    def manifest(self) -> Optional[dict]:
        return fs.read_json(self.file(MANIFEST))

    def is_done(self, fingerprint: dict) -> bool:
        m = self.manifest()
        return m is not None and m.get("fingerprint") == fingerprint

    def _listed(self, key: str) -> list[str]:
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"stage {self.stage!r} has no finished output in {self.uri}; run it first")
        return [posixpath.join(self.path, name) for name in m.get(key, [])]

    def files(self, partition: Optional[Mapping[str, Any]] = None) -> list[str]:
        """The stage's accepted parts, as the manifest lists them (paths within `self.fs`); with
        `partition`, those whose footer records exactly that partition."""
        return self._in_partition(self._listed("files"), partition)

    def reject_files(self) -> list[str]:
        return self._listed("rejects")

    def dataset(self, columns: Optional[list[str]] = None, rejects: bool = False):
        """The finished stage as a Ray Dataset over its listed parts (empty when it wrote none)."""
        import ray

        files = self.reject_files() if rejects else self.files()
        if not files:
            schema = self.schema(rejects)
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return ray.data.from_arrow(schema.empty_table())
        ds = ray.data.read_parquet(files, filesystem=self.fs)
        return ds.select_columns(columns) if columns else ds  # projected into the read by Ray Data

    def schema(self, rejects: bool = False) -> pa.Schema:
        m = self.manifest() or {}
        blob = m.get("reject_schema" if rejects else "schema")
        return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(blob))) if blob else pa.schema([])

    def read(self, columns: Optional[list[str]] = None) -> pa.Table:
        """The whole accepted table in this process: for tests and small outputs only."""
        return _concat([pq.read_table(f, filesystem=self.fs, columns=columns) for f in self.files()], self.schema())

    def read_rejects(self) -> pa.Table:
        return _concat([pq.read_table(f, filesystem=self.fs) for f in self.reject_files()], self.schema(True))

    def num_rows(self) -> int:
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"stage {self.stage!r} has no finished output in {self.uri}; run it first")
        return int(m["rows_out"])

    # -- writing ---------------------------------------------------------------------------------
    def begin(self, fingerprint: dict, force: bool = False) -> bool:
        """Make the folder ready for a run; True when it resumes an interrupted run of the same
        fingerprint (whose written parts are kept), False when it starts afresh."""
        self.claim()
        fs.delete(self.file(MANIFEST))  # from now on the stage is not done
        self._tally = None
        resume = not force and fs.read_json(self.file(ATTEMPT)) == fingerprint
        if resume:
            self._drop_unreadable()
            return True
        for name in fs.children(self.uri):
            if name not in (MARKER, CACHE):
                fs.delete(self.file(name))
        fs.write_json(self.file(ATTEMPT), fingerprint)
        return False

    def claim(self) -> None:
        """Mark the folder as this store's, or refuse it: a file, or a non-empty folder the store did not
        make (begin would delete everything in it)."""
        filesystem, path = fs.resolve(self.uri)
        if filesystem.get_file_info(path).type == pafs.FileType.File:
            raise FileExistsError(f"{self.uri} is a file, not a folder for a stage's output")
        names = set(fs.children(self.uri))
        if names and not names & {MARKER, MANIFEST, ATTEMPT}:
            shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
            raise FileExistsError(
                f"{self.uri} is not empty ({shown}) and is not a themis-ray stage folder (no {MARKER} or "
                f"{MANIFEST}): refusing to write there, since a run first deletes what the folder holds; "
                f"name a new or empty folder")
        if MARKER not in names:
            fs.write_json(self.file(MARKER), {"stage": self.stage})

    def _drop_unreadable(self) -> None:
        """A part cut short by a crash (no footer) is deleted: its rows are simply not written yet; so
        is a part a whole merged part replaces (`executor.compact`)."""
        top = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        paths = [i.path for i in top if i.type == pafs.FileType.File]
        for folder in (i for i in top if i.type == pafs.FileType.Directory and posixpath.basename(i.path) != CACHE):
            paths += fs.list_files(self.file(posixpath.basename(folder.path)), recursive=True)  # never the cache
        broken = [p for p in paths if not p.endswith(".parquet") and posixpath.basename(p).startswith("part-")]
        parts = [p for p in paths if p.endswith(".parquet")]
        replaced = set()
        with ThreadPoolExecutor(16) as pool:
            for path, meta in zip(parts, pool.map(self._footer_or_none, parts)):
                if meta is None:
                    broken.append(path)
                elif COMPACTED_KEY in (meta.metadata or {}):
                    # A merged part is whole: the parts it replaces go, if a crash left any behind.
                    folder = posixpath.dirname(path)
                    replaced.update(posixpath.join(folder, name) for name in json.loads(meta.metadata[COMPACTED_KEY]))
        for path in broken + sorted(replaced & set(parts)):
            self.fs.delete_file(path)

    def _footer_or_none(self, path: str) -> Optional[pq.FileMetaData]:
        try:
            return pq.read_metadata(path, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid):
            return None

    def clear_parts(self) -> None:
        """Delete the parts (and rejects) written so far, keeping `_work/` and the attempt marker."""
        for path in self.written_files():
            self.fs.delete_file(path)
        self._tally = None

    def written_files(self, rejects: bool = True, partition: Optional[Mapping[str, Any]] = None) -> list[str]:
        """Parts the workers have written so far (paths within `self.fs`), rejects included; with
        `partition`, those whose footer records exactly that partition."""
        files = fs.list_files(self.uri, ".parquet")
        return self._in_partition(files + (fs.list_files(self.file(REJECTS), ".parquet") if rejects else []), partition)

    def reject_files_written(self, partition: Optional[Mapping[str, Any]] = None) -> list[str]:
        """The reject parts written so far (paths within `self.fs`), of `partition` if given."""
        return self._in_partition(fs.list_files(self.file(REJECTS), ".parquet"), partition)

    def forget_tally(self) -> None:
        """Count again on the next `tally` (parts were rewritten)."""
        self._tally = None

    def rows_written(self, partition: Mapping[str, Any]) -> int:
        """Rows in the parts of `partition` written so far (accepted and rejected), from their footers."""
        return sum(meta.num_rows for meta in self.footers(self.written_files(partition=partition)))

    def _in_partition(self, paths: list[str], partition: Optional[Mapping[str, Any]]) -> list[str]:
        if not partition:
            return paths
        wanted = partition_of(partition)
        return [path for path, meta in zip(paths, self.footers(paths)) if footer_partition(meta) == wanted]

    def footers(self, paths: list[str]):
        """The parts' Parquet footers in order, read in parallel, `FOOTERS_AT_ONCE` held at a time."""
        with ThreadPoolExecutor(16) as pool:
            for start in range(0, len(paths), FOOTERS_AT_ONCE):
                yield from pool.map(lambda path: pq.read_metadata(path, filesystem=self.fs),
                                    paths[start:start + FOOTERS_AT_ONCE])

    def tally(self) -> Tally:
        """Counts and summed statistics of the written parts, from their footers. A footer is dropped
        as soon as it is counted: a stage of a million rows has thousands of parts, and their footers
        held together would grow the driver with rows."""
        if self._tally is None:
            files, rejects = fs.list_files(self.uri, ".parquet"), fs.list_files(self.file(REJECTS), ".parquet")
            counts, stats, schemas = {False: 0, True: 0}, {}, {}
            for i, meta in enumerate(self.footers(files + rejects)):
                rejected = i >= len(files)
                counts[rejected] += meta.num_rows
                blob = (meta.metadata or {}).get(STATS_KEY)
                if blob:
                    stats = merge_stats(stats, json.loads(blob))
                if rejected not in schemas:
                    schemas[rejected] = _schema_hex(meta)
            relative = [posixpath.relpath(p, self.path) for p in files + rejects]
            self._tally = Tally(files=relative[:len(files)], reject_files=relative[len(files):],
                                rows_out=counts[False], rows_rejected=counts[True], stats=stats)
            self._schema_blobs = {"schema": schemas.get(False), "reject_schema": schemas.get(True)}
        return self._tally

    def commit(self, result: StageResult, fingerprint: dict, wall_s: float) -> dict:
        """Check rows in = rows out + rows rejected, then write the manifest (last) listing the parts."""
        tally = self.tally()
        units_ok = result.units_ok if result.units_ok is not None else tally.rows_out
        if result.rows_in != units_ok + tally.rows_rejected:
            what = "lost rows" if result.rows_in > units_ok + tally.rows_rejected else "has rows written twice"
            raise RuntimeError(
                f"stage {self.stage!r} {what}: {result.rows_in} in, {units_ok} out, {tally.rows_rejected} rejected"
            )
        manifest = {
            "stage": self.stage,
            "fingerprint": fingerprint,
            "rows_in": result.rows_in,
            "rows_out": tally.rows_out,
            "units_ok": units_ok,
            "rows_rejected": tally.rows_rejected,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **result.extra,
            "files": tally.files,
            "rejects": tally.reject_files,
            **{k: v for k, v in self._schema_blobs.items() if v},
        }
        manifest["digest"] = hashlib.sha256(
            json.dumps([fingerprint, tally.rows_out, tally.rows_rejected, tally.files], sort_keys=True).encode()
        ).hexdigest()[:16]
        fs.write_json(self.file(MANIFEST), manifest)
        fs.delete(self.file(ATTEMPT))
        return manifest


def _schema_hex(meta: pq.FileMetaData) -> str:
    return meta.schema.to_arrow_schema().remove_metadata().serialize().to_pybytes().hex()


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
