"""The executor on a real local Ray: plans that write from the workers (local and on a loopback S3
server), the anti-join that makes a resumed plan skip what is written, map-side aggregation, the
reader of a user's files, and dedup at scale agreeing with dedup in one process."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from themis_ray import fs
from themis_ray.schema import REJECT
from themis_ray.store import StageResult, StageStore

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([("id", pa.string()), ("group", pa.string()), ("x", pa.int64()), (REJECT, pa.string())])


def _rows(n: int, reject_every: int = 0) -> pa.Table:
    return pa.table({"id": [f"r{i:05d}" for i in range(n)], "group": [f"g{i % 3}" for i in range(n)],
                     "x": list(range(n)),
                     REJECT: [("odd one" if reject_every and i % reject_every == 0 else None) for i in range(n)]},
                    schema=SCHEMA)


def count_stats(table: pa.Table, rejected: bool) -> dict:
    return {"x": pc.sum(table["x"]).as_py() or 0}


def _write_stage(ray, run_dir: str, table: pa.Table, blocks: int = 4) -> dict:
    from themis_ray.executor import write

    store = StageStore(run_dir, "stage")
    store.begin({"t": 1})
    written = write(ray.data.from_arrow(table).repartition(blocks), store, SCHEMA, stats=count_stats)
    manifest = store.commit(StageResult(rows_in=table.num_rows), {"t": 1}, 0.0)
    return {"written": written, "manifest": manifest, "store": store}


def test_workers_write_parts_and_rejects_and_the_driver_counts_footers(ray_module, tmp_path):
    out = _write_stage(ray_module, str(tmp_path), _rows(100, reject_every=10))
    manifest, store = out["manifest"], out["store"]
    assert out["written"] == (90, 10)
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (90, 10)
    assert len(manifest["files"]) >= 2  # one part per write task, not one file from the driver
    assert store.tally().stats["x"] == sum(range(100))  # accepted and rejected parts' sums together
    kept = store.dataset().take_all()
    assert len(kept) == 90 and all(REJECT not in r for r in kept)
    assert sorted(r["id"] for r in store.dataset(rejects=True).take_all()) == [f"r{i:05d}" for i in range(0, 100, 10)]


def test_the_same_plan_on_an_s3_bucket(s3_server, ray_module):
    run_dir = f"{s3_server}/runs/executor"
    out = _write_stage(ray_module, run_dir, _rows(40, reject_every=4))
    manifest = out["manifest"]
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (30, 10)
    # Read back with pyarrow alone, from the files the manifest lists.
    filesystem, _ = fs.resolve(run_dir)
    stage = fs.join(run_dir, "stage")
    tables = [pq.read_table(fs.resolve(fs.join(stage, name))[1], filesystem=filesystem) for name in manifest["files"]]
    assert sum(t.num_rows for t in tables) == 30
    assert json.loads(fs.read_text(fs.join(stage, "_manifest.json")))["digest"] == manifest["digest"]


def test_drop_written_sends_only_rows_not_yet_written(ray_module, tmp_path):
    from themis_ray.executor import drop_written
    from themis_ray.executor.sink import StageSink

    store = StageStore(str(tmp_path), "label")
    store.begin({"f": 1})
    # A crashed run wrote r00001 (accepted) and r00003 (rejected) under the output key `source_id`.
    done = pa.table({"id": ["out1", "out3"], "source_id": ["r00001", "r00003"], "responder": ["a", "a"],
                     REJECT: [None, "engine error"]})
    StageSink(store.uri, done.schema, partition={"responder": "a"}).write([done], None)
    left = drop_written(ray_module.data.from_arrow(_rows(6)), store, "id", "source_id")
    assert sorted(r["id"] for r in left.take_all()) == ["r00000", "r00002", "r00004", "r00005"]
    mine = drop_written(ray_module.data.from_arrow(_rows(6)), store, "id", "source_id", partition={"responder": "a"})
    assert sorted(r["id"] for r in mine.take_all()) == ["r00000", "r00002", "r00004", "r00005"]
    # Narrowed to another responder's partition, nothing is written yet.
    everything = drop_written(ray_module.data.from_arrow(_rows(6)), store, "id", "source_id",
                              partition={"responder": "b"})
    assert everything.count() == 6


def test_partials_merges_one_small_summary_per_block(ray_module):
    from themis_ray.executor import partials

    def per_group(batch: pa.Table) -> dict:
        counts = pc.value_counts(batch["group"])
        return {"n": batch.num_rows,
                "by_group": dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))}

    merged = partials(ray_module.data.from_arrow(_rows(300)).repartition(7), per_group)
    assert merged == {"n": 300, "by_group": {"g0": 100, "g1": 100, "g2": 100}}


def test_user_files_are_read_with_file_and_row_numbers(ray_module, tmp_path):
    from themis_ray.records import read_records

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"q": "one"}\n\nnot json\n[1, 2]\n{"q": "four"}\n')
    (folder / "b.csv").write_text('q,a\nx,1\n"multi\nline",2\ny,3,extra\n')
    pq.write_table(pa.table({"q": ["p1", "p2"]}), folder / "c.parquet")
    (folder / "_SUCCESS").write_text("")  # markers are not data
    rows = sorted(read_records(str(folder)).take_all(), key=lambda r: (r["_file"], r["_row"]))
    by = {(r["_file"].rsplit("/", 1)[-1], r["_row"]): r for r in rows}
    assert json.loads(by[("a.jsonl", 1)]["_record"]) == {"q": "one"} and by[("a.jsonl", 1)]["_error"] is None
    assert by[("a.jsonl", 3)]["_error"].startswith("invalid JSON") and by[("a.jsonl", 3)]["_record"] == "not json"
    assert by[("a.jsonl", 4)]["_error"] == "expected a JSON object, got list"
    assert json.loads(by[("a.jsonl", 5)]["_record"]) == {"q": "four"}
    assert ("a.jsonl", 2) not in by  # a blank line is not a record
    assert json.loads(by[("b.csv", 2)]["_record"]) == {"q": "x", "a": "1"}
    assert json.loads(by[("b.csv", 4)]["_record"])["q"] == "multi\nline"  # numbered by the line it ends on
    assert by[("b.csv", 5)]["_error"] == "1 more fields than the header names"
    assert [json.loads(by[("c.parquet", k)]["_record"])["q"] for k in (1, 2)] == ["p1", "p2"]
    assert len(rows) == 4 + 3 + 2
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_dedup_at_scale_matches_dedup_in_one_process(ray_module, monkeypatch):
    from themis_ray.config import DedupConfig
    from themis_ray.executor import plan
    from themis_ray.dedup import find_duplicates, strongest
    from themis_ray.stages.synthesize import duplicate_edges

    rng = random.Random(0)
    words = "python list tuple generator loop function class module error value string dict".split()
    bases = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)]
    texts = []
    for base in bases:
        texts.append(base)
        if rng.random() < 0.5:  # a near twin: one word changed
            tokens = base.split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            texts.append(" ".join(tokens))
        if rng.random() < 0.2:
            texts.append(base.upper() + "!")  # an exact twin after normalisation
    items = sorted((f"i{k:04d}-{rng.random():.6f}", t) for k, t in enumerate(texts))
    expected = find_duplicates(items, 0.7)
    table = pa.table({"id": [i for i, _ in items], "instruction": [t for _, t in items]})
    # Several shuffle partitions, as millions of instructions would get: twins must still meet.
    monkeypatch.setattr(plan, "ROWS_PER_PARTITION", -(-len(items) // 4))
    assert plan.shuffle_partitions(len(items)) == 4 and plan.shuffle_partitions(1) == 1
    assert plan.shuffle_partitions(10**12) == ray_module.data.DataContext.get_current().default_hash_shuffle_parallelism
    edges = duplicate_edges(ray_module.data.from_arrow(table).repartition(5), DedupConfig(), len(items)).take_all()
    found = strongest((e["id"], e["twin"], e["similarity"]) for e in edges)
    assert expected and {k: (d.kept_id, round(d.similarity, 6)) for k, d in found.items()} == {
        k: (d.kept_id, round(d.similarity, 6)) for k, d in expected.items()}


def test_blocks_hold_whole_batches_and_keep_every_concurrent_call_busy():
    from themis_ray.executor.plan import BATCHES_PER_BLOCK, rows_per_block

    assert rows_per_block(64, None, 16) == 64  # rows unknown: one batch per block, as before
    assert rows_per_block(64, 800, 16) == 64  # few rows: small blocks, so 13 of 16 calls get one
    for rows, batch, tasks in [(300_000, 64, 16), (30_000, 64, 16), (54, 8, 1), (10_000, 8, 4), (5_000, 32, 2)]:
        size = rows_per_block(batch, rows, tasks)
        assert size % batch == 0 and batch <= size <= batch * BATCHES_PER_BLOCK
        if size > batch:  # grown only while every task the pool runs at once still gets four blocks
            assert rows // size >= 4 * tasks
    assert rows_per_block(64, 300_000, 16) == 64 * BATCHES_PER_BLOCK


def test_a_pool_that_takes_every_cpu_is_warned_about(ray_module, caplog):
    from themis_ray.config import PoolConfig
    from themis_ray.executor.plan import preflight_step
    from themis_ray.executor.step import Step

    def step(cpus: float) -> Step:
        return Step(name="label", processor=object, args={}, pool=PoolConfig(num_cpus=cpus))

    with caplog.at_level("WARNING", logger="themis_ray.executor.plan"):
        preflight_step(step(1.0))  # leaves a CPU for reads and writes: quiet
        assert not caplog.records
        preflight_step(step(2.0))  # the 2-CPU test cluster's every CPU: the plan would wait forever
    assert len(caplog.records) == 1 and "pool.num_cpus=2" in caplog.records[0].getMessage()

OUT_SCHEMA = pa.schema([("id", pa.string()), ("source_id", pa.string()), ("x", pa.int64()), (REJECT, pa.string())])


class WritesThenDies:
    """A processor whose actor, the first time it gets the batch holding `victim`, writes that batch's
    rows under a part name of its own (as a run of the same rows cut into other batches would have)
    and dies before answering: Ray runs the batch again on a restarted actor, so its rows are written
    twice."""

    stage = "test"
    resume_key = ("id", "source_id")
    one_row_per_input = True

    def __init__(self, output_schema, stage_uri: str, marker: str, victim: str):
        self.schema, self.stage_uri, self.marker, self.victim = output_schema, stage_uri, marker, victim

    def __call__(self, batch: pa.Table) -> pa.Table:
        import os

        from themis_ray.executor.sink import StageSink

        out = pa.table({"id": [f"out-{i}" for i in batch["id"].to_pylist()], "source_id": batch["id"],
                        "x": batch["x"], REJECT: batch[REJECT]}, schema=self.schema)
        if self.victim in batch["id"].to_pylist() and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            StageSink(self.stage_uri, self.schema).write([out], None)  # a random part name
            os._exit(1)
        return out


def test_a_batch_run_twice_writes_its_rows_once(ray_module, tmp_path):
    from themis_ray.config import PoolConfig
    from themis_ray.executor import Step, run_rows

    n = 20
    store = StageStore(str(tmp_path), "stage")
    store.begin({"t": 1})
    marker = tmp_path / "died-once"
    step = Step(name="twice", processor=WritesThenDies, pool=PoolConfig(num_cpus=0, batch_size=5), stats=count_stats,
                args={"stage_uri": store.uri, "marker": str(marker), "victim": "r00007"})
    run_rows(ray_module.data.from_arrow(_rows(n, reject_every=6)), step, store, OUT_SCHEMA, total=n)
    assert marker.exists()  # the batch did run twice
    manifest = store.commit(StageResult(rows_in=n), {"t": 1}, 0.0)  # rows in = out + rejected: none twice
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (16, 4)
    kept, rejects = store.read(), store.read_rejects()
    ids = kept["source_id"].to_pylist() + rejects["source_id"].to_pylist()
    assert sorted(ids) == [f"r{i:05d}" for i in range(n)]
    assert store.tally().stats["x"] == sum(range(n))  # the rewritten parts' footers count their rows once


# --------------------------------------------------------------------------- part compaction at commit


def test_compaction_plans_consecutive_small_parts_of_one_kind_and_partition():
    from themis_ray.executor.compact import Part, plan_groups

    a, b, rejects = (False, '{"j": "a"}'), (False, '{"j": "b"}'), (True, '{"j": "a"}')
    parts = ([Part(f"s/p{i}", 30, a) for i in range(5)] + [Part("s/big", 60, a)]
             + [Part(f"s/q{i}", 10, b) for i in range(2)] + [Part("s/_rejects/r0", 10, rejects)])
    groups = [[p.path for p in g] for g in plan_groups(parts, target_bytes=100)]
    # Up to 100 bytes each, the part at half the target or above left alone, a lone part not merged.
    assert groups == [["s/p0", "s/p1", "s/p2"], ["s/p3", "s/p4"], ["s/q0", "s/q1"]]
    assert plan_groups(parts, target_bytes=20) == []  # nothing is small enough to gain from a merge


def test_small_parts_are_compacted_before_commit_and_a_crash_mid_merge_loses_and_doubles_nothing(
        ray_module, tmp_path):
    import shutil

    from themis_ray.executor.compact import compact
    from themis_ray.executor.sink import StageSink
    from themis_ray.store import COMPACTED_KEY

    store = StageStore(str(tmp_path), "stage")
    store.begin({"t": 1})
    table = _rows(60, reject_every=7)
    for k in range(12):  # 12 batches, each a part (and a reject part), in two partitions
        batch = table.slice(5 * k, 5)
        StageSink(store.uri, SCHEMA, partition={"judge": f"j{k % 2}"}, stats=count_stats).write([batch], None)
    before = store.tally()
    by_partition = {j: store.rows_written({"judge": j}) for j in ("j0", "j1")}
    assert len(before.files) == 12 and len(before.reject_files) == 9
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "stage", saved)

    assert compact(store, target_bytes=64 * 2**20) == (21, 4)  # one part per kind and partition
    after = store.tally()
    assert (after.rows_out, after.rows_rejected, after.stats) == (before.rows_out, before.rows_rejected, before.stats)
    assert {j: store.rows_written({"judge": j}) for j in ("j0", "j1")} == by_partition
    accepted = set(table.filter(pc.is_null(table[REJECT]))["id"].to_pylist())
    for name in after.files:  # each merged part holds its partition's accepted rows, all of them
        part = pq.read_table(tmp_path / "stage" / name)
        k = json.loads(pq.read_metadata(tmp_path / "stage" / name).metadata[b"themis.partition"])["judge"][1]
        assert sorted(part["id"].to_pylist()) == sorted(
            i for i in accepted if (int(i[1:]) // 5) % 2 == int(k))

    # A crash between a merged part's write and its sources' deletes (before the commit): some sources
    # are still beside it.
    merged = tmp_path / "stage" / after.files[0]
    sources = json.loads(pq.read_metadata(merged).metadata[COMPACTED_KEY])
    for name in sources[:3]:
        shutil.copy(saved / name, tmp_path / "stage" / name)
    store.begin({"t": 1})  # the run resumes: the merged part is whole, so its leftover sources go
    resumed = store.tally()
    assert (resumed.rows_out, resumed.rows_rejected, resumed.files) == (after.rows_out, after.rows_rejected, after.files)
    manifest = store.commit(StageResult(rows_in=60), {"t": 1}, 0.0)
    ids = [r["id"] for r in store.dataset().union(store.dataset(rejects=True)).take_all()]
    assert sorted(ids) == table["id"].to_pylist() and len(manifest["files"]) == 2
