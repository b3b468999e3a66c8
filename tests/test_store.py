"""The stage store and the write end of a stage (unit tests: a write task's code called in this process,
no cluster): parts and rejects written apart, counts and statistics from the footers, manifests that
list their parts, resume markers, parts cut short by a crash."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from themis_ray.executor.plan import ProcessorActor
from themis_ray.executor.processor import RowProcessor
from themis_ray.executor.sink import StageSink
from themis_ray.executor.step import Step
from themis_ray.schema import REJECT
from themis_ray.store import ATTEMPT, MANIFEST, REJECTS, StageResult, StageStore, merge_stats

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.int64()), (REJECT, pa.string())])


def _table(ids, reasons):
    return pa.table({"id": pa.array(ids, pa.string()), "x": pa.array(range(len(ids)), pa.int64()),
                     REJECT: pa.array(reasons, pa.string())}, schema=SCHEMA)


def x_stats(table: pa.Table, rejected: bool) -> dict:
    return {"x_sum": pc.sum(table["x"]).as_py() or 0, "by": {"rejected" if rejected else "kept": table.num_rows}}


def _write(store: StageStore, *tables: pa.Table, partition: dict | None = None) -> dict:
    """What one write task does with its blocks (StageSink.write), run here."""
    return StageSink(store.uri, SCHEMA, partition=partition, stats=x_stats).write(list(tables), None)


def test_a_write_task_splits_rows_and_rejects_and_the_commit_lists_its_parts(tmp_path):
    store = StageStore(tmp_path, "label")
    assert store.begin({"cfg": "1"}) is False  # a fresh start
    returned = _write(store, _table(["a", "b"], [None, "bad parse"]), _table(["c", "d"], [None, "engine error: x"]))
    assert returned == {"rows": 2, "rejected": 2}
    manifest = store.commit(StageResult(rows_in=4, extra={"engine": "hf:m"}), {"cfg": "1"}, 1.23456)

    kept, rejects = store.read(), store.read_rejects()
    assert sorted(kept["id"].to_pylist()) == ["a", "c"] and REJECT not in kept.column_names
    assert sorted(zip(rejects["id"].to_pylist(), rejects[REJECT].to_pylist())) == [
        ("b", "bad parse"), ("d", "engine error: x")]
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"], manifest["units_ok"]) == (4, 2, 2, 2)
    assert len(manifest["files"]) == 1 and manifest["rejects"] == [f"{REJECTS}/{manifest['files'][0]}"]
    assert manifest["engine"] == "hf:m" and manifest["wall_s"] == 1.235
    assert json.loads((tmp_path / "label" / MANIFEST).read_text()) == manifest
    assert not (tmp_path / "label" / ATTEMPT).exists()  # the run is over
    assert not list((tmp_path / "label").rglob("*.partial"))  # renamed into place
    # The footers' statistics add up across parts, rejected rows under their own key.
    _write(store, _table(["e"], [None]))
    # x is 0, 1 in each table: kept rows a, c, e add 0; rejects b, d add 1 each.
    assert StageStore(tmp_path, "label").tally().stats == {"x_sum": 2, "by": {"kept": 3, "rejected": 2}}


def test_parts_are_selected_by_the_partition_their_footers_record(tmp_path):
    store = StageStore(tmp_path, "evaluate")
    store.begin({"f": 1})
    _write(store, _table(["a", "b"], [None, "bad"]), partition={"benchmark": "val", "judge": "mine"})
    _write(store, _table(["c"], [None]), partition={"benchmark": "val", "judge": "base"})
    _write(store, _table(["d"], ["no prompt"]), partition={"benchmark": "val"})
    _write(store, _table(["e"], [None]))
    mine = {"benchmark": "val", "judge": "mine"}

    def ids(paths):
        return sorted(i for p in paths for i in pq.read_table(p, filesystem=store.fs)["id"].to_pylist())

    assert ids(store.written_files(partition=mine)) == ["a", "b"]
    assert ids(store.written_files(rejects=False, partition=mine)) == ["a"]
    assert ids(store.written_files(partition={"benchmark": "val"})) == ["d"]  # exactly that partition
    assert ids(store.written_files()) == ["a", "b", "c", "d", "e"]  # no partition: every part
    assert store.rows_written(mine) == 2 and store.rows_written({"judge": "mine"}) == 0
    # File names carry no partition: it is data in the footer, beside the statistics.
    names = [p.rsplit("/", 1)[-1] for p in store.written_files()]
    assert all(n.startswith("part-") and "val" not in n and "mine" not in n for n in names)
    store.commit(StageResult(rows_in=5), {"f": 1}, 0.0)
    assert ids(store.files(partition={"benchmark": "val", "judge": "base"})) == ["c"]


def test_a_reader_trusts_only_the_manifest(tmp_path):
    store = StageStore(tmp_path, "respond")
    store.begin({"f": 1})
    _write(store, _table(["a"], [None]))
    store.commit(StageResult(rows_in=1), {"f": 1}, 0.0)
    _write(store, _table(["stray"], [None]))  # a part no manifest lists (a later crashed run, say)
    assert store.read()["id"].to_pylist() == ["a"]
    assert store.num_rows() == 1


def test_lost_rows_raise_and_leave_nothing_that_looks_done(tmp_path):
    store = StageStore(tmp_path, "label")
    store.begin({"f": 1})
    _write(store, _table(["a", "b", "c"], [None, None, "r"]))
    with pytest.raises(RuntimeError, match="lost rows: 5 in, 2 out, 1 rejected"):
        store.commit(StageResult(rows_in=5), {"f": 1}, 0.0)
    assert store.manifest() is None and not store.is_done({"f": 1})
    with pytest.raises(FileNotFoundError, match="label"):
        store.read()


def test_fan_out_counts_units(tmp_path):
    # 3 input units: 2 succeeded and fanned out into 5 rows, 1 was rejected
    store = StageStore(tmp_path, "synthesize")
    store.begin({})
    _write(store, _table(["a1", "a2", "a3", "b1", "b2", "c"], [None] * 5 + ["no instruction"]))
    manifest = store.commit(StageResult(rows_in=3, units_ok=2), {}, 0.0)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["units_ok"], manifest["rows_rejected"]) == (3, 5, 2, 1)


def test_same_fingerprint_resumes_and_keeps_parts_another_clears_them(tmp_path):
    store = StageStore(tmp_path, "label")
    store.begin({"cfg": "a"})
    _write(store, _table(["a"], [None]))
    (tmp_path / "label" / "_work").mkdir()
    (tmp_path / "label" / "_work" / "pairs.txt").write_text("intermediate data")
    # The run died here. The same run again resumes: what was written stays.
    assert store.begin({"cfg": "a"}) is True
    assert len(store.written_files()) == 1 and (tmp_path / "label" / "_work" / "pairs.txt").exists()
    # --force, or another config, starts afresh: the old answers do not apply.
    assert store.begin({"cfg": "a"}, force=True) is False
    assert store.written_files() == [] and not (tmp_path / "label" / "_work").exists()
    _write(store, _table(["b"], [None]))
    assert store.begin({"cfg": "b"}) is False and store.written_files() == []


def test_restarting_a_finished_stage_first_makes_it_not_done(tmp_path):
    store = StageStore(tmp_path, "ifd")
    store.begin({"v": 1})
    _write(store, _table(["a"], [None]))
    store.commit(StageResult(rows_in=1), {"v": 1}, 0.0)
    assert store.is_done({"v": 1})
    store.begin({"v": 2})
    assert store.manifest() is None and not store.is_done({"v": 1})


def test_a_part_cut_short_by_a_crash_is_dropped_on_resume(tmp_path):
    store = StageStore(tmp_path, "label")
    store.begin({"cfg": "a"})
    _write(store, _table(["a", "b"], [None, "r"]))
    folder = tmp_path / "label"
    (folder / "part-cut.parquet").write_bytes(b"PAR1 half a row group")  # no footer
    (folder / "part-writing.parquet.partial").write_bytes(b"PAR1")  # a write task killed mid-file
    assert store.begin({"cfg": "a"}) is True
    names = sorted(p.name for p in folder.rglob("part-*"))
    assert len(names) == 2 and not any("cut" in n or n.endswith(".partial") for n in names)
    store.commit(StageResult(rows_in=2), {"cfg": "a"}, 0.0)  # the intact parts still add up


def test_a_stage_that_wrote_nothing_reads_back_empty(tmp_path):
    store = StageStore(tmp_path, "curate")
    store.begin({})
    manifest = store.commit(StageResult(rows_in=0), {}, 0.0)
    assert manifest["files"] == [] and store.read().num_rows == 0


def test_merge_stats_adds_numbers_and_merges_nested_counts():
    merged = merge_stats({"n": 1, "h": {"a": 1}}, {"n": 2.5, "h": {"a": 1, "b": 3}, "new": 4})
    assert merged == {"n": 3.5, "h": {"a": 2, "b": 3}, "new": 4}


def test_a_folder_the_store_did_not_make_is_refused_and_left_as_it_was(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "answers.jsonl").write_text('{"prompt": "Q?"}\n')
    store = StageStore.at(str(data))
    with pytest.raises(FileExistsError, match=f"{data} is not empty \\(answers.jsonl\\) and is not a themis-ray"):
        store.begin({"f": 1})
    assert (data / "answers.jsonl").read_text() == '{"prompt": "Q?"}\n' and sorted(p.name for p in data.iterdir()) == [
        "answers.jsonl"]
    with pytest.raises(FileExistsError, match="is a file"):
        StageStore.at(str(data / "answers.jsonl")).begin({"f": 1})
    # An empty or new folder becomes the store's; a later run with another fingerprint may clear it.
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new"):
        fresh = StageStore.at(str(tmp_path / name))
        assert fresh.begin({"f": 1}) is False
        _write(fresh, _table(["a"], [None]))
        fresh.commit(StageResult(rows_in=1), {"f": 1}, 0.0)
        assert fresh.begin({"f": 2}) is False and fresh.written_files() == []


def test_a_stage_folder_from_before_the_marker_is_still_the_stores(tmp_path):
    store = StageStore(tmp_path, "label")
    store.begin({"f": 1})
    _write(store, _table(["a"], [None]))
    store.commit(StageResult(rows_in=1), {"f": 1}, 0.0)
    (tmp_path / "label" / "_stage.json").unlink()  # a folder written before the marker existed
    assert store.begin({"f": 2}) is False and store.written_files() == []


class Flaky(RowProcessor):
    """Accepts a row unless its id is in `reject` (a retried batch may judge a row otherwise)."""

    stage = "label"
    resume_key = ("id", "id")

    def __init__(self, output_schema, reject=()):
        super().__init__(output_schema)
        self.reject = set(reject)

    def process(self, rows):
        return [{**r, "x": 1, REJECT: "engine error: x" if r["id"] in self.reject else None} for r in rows]


def test_a_batch_written_twice_replaces_its_parts_and_the_stage_still_commits(tmp_path):
    store = StageStore(tmp_path, "label")
    store.begin({"f": 1})
    sink = StageSink(store.uri, SCHEMA)
    first, second = pa.table({"id": ["a", "b", "c"]}), pa.table({"id": ["d", "e"]})
    def actor(reject=()):
        return ProcessorActor(Step(name="label", processor=Flaky, args={"reject": reject}, pool=None), SCHEMA, sink)

    actor(reject={"b"})(first)
    actor()(second)
    # The actor that wrote `first` died before returning; Ray runs the same batch again on another
    # actor, which judges row b otherwise this time.
    actor(reject={"c"})(first)
    manifest = store.commit(StageResult(rows_in=5), {"f": 1}, 0.0)
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (4, 1)
    assert sorted(store.read()["id"].to_pylist()) == ["a", "b", "d", "e"]
    assert store.read_rejects()["id"].to_pylist() == ["c"]
    # Written under random names (as before), the same batch twice could never commit again.
    store.begin({"f": 2})
    for _ in range(2):
        _write(store, _table(["a", "b"], [None, None]))
    with pytest.raises(RuntimeError, match="has rows written twice: 2 in, 4 out"):
        store.commit(StageResult(rows_in=2), {"f": 2}, 0.0)


def test_a_checkpoint_is_filled_once_and_a_resumed_stage_skips_it(tmp_path):
    store = StageStore(tmp_path, "synthesize")
    store.begin({"f": 1})
    with store.checkpoint("generated", {"tasks": 3}, resume=False) as point:
        assert not point.done and not point.resume
        _write(point.store, _table(["a", "b", "c"], [None, None, "engine error: x"]))
        point.rows_in = 3
    assert point.store.manifest()["rows_out"] == 2 and point.store.uri.endswith("synthesize/_work/generated")
    with store.checkpoint("generated", {"tasks": 3}, resume=True) as again:
        assert again.done  # nothing to fill: the finished sub-store is read as it is
    assert again.store.read()["id"].to_pylist() in (["a", "b"], ["b", "a"])
    with store.checkpoint("generated", {"tasks": 4}, resume=True) as changed:
        assert not changed.done and changed.store.written_files() == []  # another key starts afresh


def test_a_checkpoint_that_lost_rows_is_not_committed(tmp_path):
    store = StageStore(tmp_path, "label")
    store.begin({"f": 1})
    with pytest.raises(RuntimeError, match="lost rows: 5 in, 1 out, 0 rejected"):
        with store.checkpoint("pairs", {"pairs": 1}, resume=False, resumable=False) as point:
            _write(point.store, _table(["a"], [None]))
            point.rows_in = 5
    # An interrupted fill that cannot resume is started afresh, its parts gone.
    with store.checkpoint("pairs", {"pairs": 1}, resume=True, resumable=False) as point:
        assert not point.done and not point.resume and point.store.written_files() == []
