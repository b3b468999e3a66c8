"""Part compaction at commit: a stage's small parts merged into parts of about `store.target_part_bytes`.

Workers write one part per batch (and a part per batch of rejects), so a million-row stage leaves
thousands of small files, which every later read lists and opens. Before a stage commits, the driver
plans groups of consecutive small parts (name order) of one kind (accepted or rejected) and one
partition, each group up to the target size, from the files' sizes and footers; a Ray task per group
streams its parts' rows into one new part, whose footer carries the group's summed statistics, its
partition and the names of the parts it replaces (`COMPACTED_KEY`), and only then deletes them.

Crash safety: a merged part is complete once it has a footer (a local one is renamed into place, an
upload appears whole), and it names its sources, so a run that resumes after a crash between the write
and the deletes finds the merged part beside some of its sources and deletes those
(`StageStore.begin`): no row is ever counted twice, none lost.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from themis_ray import fs
from themis_ray.executor.plan import LIGHT_CPUS
from themis_ray.store import COMPACTED_KEY, PARTITION_KEY, REJECTS, STATS_KEY, StageStore, merge_stats


@dataclass
class Part:
    path: str  # within the stage's filesystem
    size: int
    key: tuple  # (rejected, partition JSON): only parts of one key are merged together


def plan_groups(parts: list[Part], target_bytes: int) -> list[list[Part]]:
    """Consecutive small parts (under half the target) of one key, grouped greedily up to the target;
    only groups of two or more are worth a merge."""
    groups: list[list[Part]] = []
    open_groups: dict[tuple, list[Part]] = {}
    for part in sorted(parts, key=lambda p: (p.key, p.path)):
        if part.size >= target_bytes // 2:
            continue
        group = open_groups.get(part.key)
        if group is not None and sum(p.size for p in group) + part.size <= target_bytes:
            group.append(part)
            continue
        group = open_groups[part.key] = [part]
        groups.append(group)
    return [g for g in groups if len(g) > 1]


def compact(store: StageStore, target_bytes: int) -> Optional[tuple[int, int]]:
    """Merge `store`'s small parts (see module doc); returns (parts before, parts after) when any were
    merged, else None. The driver reads the parts' sizes and footers only."""
    if target_bytes <= 0:
        return None
    files = store.written_files()  # accepted parts, then rejects
    if len(files) < 2:
        return None
    sizes = {info.path: info.size for info in store.fs.get_file_info(files)}
    parts = []
    for path, meta in zip(files, store.footers(files)):
        partition = (meta.metadata or {}).get(PARTITION_KEY, b"").decode()
        rejected = posixpath.basename(posixpath.dirname(path)) == REJECTS  # rejects lie in `_rejects/`
        parts.append(Part(path, sizes[path], (rejected, partition)))
    groups = plan_groups(parts, target_bytes)
    if not groups:
        return None
    ray.get([_merge.remote(store.uri, [p.path for p in group]) for group in groups])
    store.forget_tally()
    return len(files), len(files) - sum(len(g) - 1 for g in groups)


def merged_name(sources: list[str]) -> str:
    """The merged part's name: a digest of its sources' names (the same group, the same name)."""
    digest = hashlib.sha256("\x1f".join(posixpath.basename(s) for s in sources).encode()).hexdigest()[:32]
    return f"part-c{digest}.parquet"


@ray.remote(num_cpus=LIGHT_CPUS)
def _merge(stage_uri: str, sources: list[str]) -> None:
    filesystem, _ = fs.resolve(stage_uri)
    folder = posixpath.dirname(sources[0])
    path = posixpath.join(folder, merged_name(sources))
    local = isinstance(filesystem, pafs.LocalFileSystem)
    writing = path + ".partial" if local else path
    stats: dict = {}
    writer = None
    partition = None
    for source in sources:  # one source in memory at a time
        parquet = pq.ParquetFile(source, filesystem=filesystem)
        meta = parquet.metadata.metadata or {}
        if STATS_KEY in meta:
            stats = merge_stats(stats, json.loads(meta[STATS_KEY]))
        partition = meta.get(PARTITION_KEY, partition)
        table = parquet.read().replace_schema_metadata(None)
        if writer is None:
            writer = pq.ParquetWriter(writing, table.schema, filesystem=filesystem)
        writer.write_table(table)
    footer = {COMPACTED_KEY.decode(): json.dumps([posixpath.basename(s) for s in sources])}
    if stats:
        footer[STATS_KEY.decode()] = json.dumps(stats)
    if partition:
        footer[PARTITION_KEY.decode()] = partition.decode()
    writer.add_key_value_metadata(footer)
    writer.close()
    if local:
        filesystem.move(writing, path)
    for source in sources:  # only once the merged part is whole
        filesystem.delete_file(source)

