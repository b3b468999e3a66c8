"""The stage store: kept rows and rejects on disk, manifest counts, fingerprints, atomic replace."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from themis_ray.schema import REJECT
from themis_ray.store import MANIFEST, REJECTS, StageResult, StageStore


def _table(ids, reasons):
    return pa.table({"id": pa.array(ids, pa.string()), "x": pa.array(range(len(ids)), pa.int64()),
                     REJECT: pa.array(reasons, pa.string())})


def test_commit_writes_kept_rows_rejects_and_manifest(tmp_path):
    store = StageStore(tmp_path, "label")
    table = _table(["a", "b", "c", "d"], [None, "bad parse", None, "engine error: x"])
    manifest = store.commit(StageResult(table, rows_in=4, extra={"engine": "hf:m"}), {"cfg": "1"}, 1.23456)

    kept = store.read()
    assert kept.column("id").to_pylist() == ["a", "c"]
    assert REJECT not in kept.column_names
    assert kept.column("x").to_pylist() == [0, 2]
    rejects = store.read_rejects()
    assert rejects.column("id").to_pylist() == ["b", "d"]
    assert rejects.column(REJECT).to_pylist() == ["bad parse", "engine error: x"]
    assert (tmp_path / "label" / REJECTS).is_dir()

    on_disk = json.loads((tmp_path / "label" / MANIFEST).read_text())
    assert on_disk == manifest
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"], manifest["units_ok"]) == (4, 2, 2, 2)
    assert manifest["stage"] == "label"
    assert manifest["fingerprint"] == {"cfg": "1"}
    assert manifest["engine"] == "hf:m"
    assert manifest["wall_s"] == 1.235
    assert not (tmp_path / "label.tmp").exists()


def test_lost_rows_raise_and_leave_nothing_that_looks_done(tmp_path):
    store = StageStore(tmp_path, "label")
    with pytest.raises(RuntimeError, match="lost rows: 5 in, 2 out, 1 rejected"):
        store.commit(StageResult(_table(["a", "b", "c"], [None, None, "r"]), rows_in=5), {"f": 1}, 0.0)
    assert store.manifest() is None
    assert not store.is_done({"f": 1})
    with pytest.raises(FileNotFoundError, match="label"):
        store.read()


def test_fan_out_counts_units(tmp_path):
    # 3 input units: 2 succeeded and fanned out into 5 rows, 1 was rejected
    store = StageStore(tmp_path, "synthesize")
    table = _table(["a1", "a2", "a3", "b1", "b2", "c"], [None] * 5 + ["no instruction"])
    manifest = store.commit(StageResult(table, rows_in=3, units_ok=2), {}, 0.0)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["units_ok"], manifest["rows_rejected"]) == (3, 5, 2, 1)
    # without units_ok the 5 rows out would not add up
    other = StageStore(tmp_path, "synthesize2")
    with pytest.raises(RuntimeError, match="lost rows"):
        other.commit(StageResult(table, rows_in=3), {}, 0.0)


def test_is_done_compares_fingerprints(tmp_path):
    store = StageStore(tmp_path, "ifd")
    fp = {"config": "abc", "inputs": {"label": "d1"}}
    assert not store.is_done(fp)
    store.commit(StageResult(_table(["a"], [None]), rows_in=1), fp, 0.0)
    assert store.is_done({"config": "abc", "inputs": {"label": "d1"}})
    assert not store.is_done({"config": "abd", "inputs": {"label": "d1"}})
    assert not store.is_done({"config": "abc", "inputs": {"label": "d2"}})
    assert not store.is_done({})


def test_recommit_replaces_the_folder(tmp_path):
    store = StageStore(tmp_path, "curate")
    staging = store.staging_dir()
    (staging / "distributions.png").write_bytes(b"png")
    first = store.commit(StageResult(_table(["a", "b"], [None, None]), rows_in=2), {"v": 1}, 0.0, staging)
    assert (tmp_path / "curate" / "distributions.png").is_file()
    assert first["rows_out"] == 2

    second = store.commit(StageResult(_table(["z"], ["dropped"]), rows_in=1), {"v": 2}, 0.0)
    assert second["rows_out"] == 0 and second["rows_rejected"] == 1
    assert not (tmp_path / "curate" / "distributions.png").exists()  # the old folder is gone
    assert store.read().num_rows == 0
    assert store.read_rejects().column("id").to_pylist() == ["z"]
    assert store.is_done({"v": 2}) and not store.is_done({"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curate"]  # no .tmp left behind
    assert first["digest"] != second["digest"]


def test_stale_staging_folder_is_cleared(tmp_path):
    store = StageStore(tmp_path, "respond")
    stale = tmp_path / "respond.tmp"
    stale.mkdir()
    (stale / "junk.parquet").write_bytes(b"not parquet")
    store.commit(StageResult(_table(["a"], [None]), rows_in=1), {}, 0.0)
    assert store.parquet_files() == [str(tmp_path / "respond" / "part-00000.parquet")]
    assert not stale.exists()


def test_no_table_stage(tmp_path):
    store = StageStore(tmp_path, "train")
    manifest = store.commit(StageResult(None, rows_in=8, extra={"loss": 1.5}), {"t": 1}, 2.0)
    assert (manifest["rows_out"], manifest["rows_rejected"], manifest["units_ok"]) == (0, 0, 0)
    assert manifest["loss"] == 1.5
    assert store.is_done({"t": 1})
    assert store.parquet_files() == []


def test_written_parquet_keeps_schema(tmp_path):
    store = StageStore(tmp_path, "s")
    store.commit(StageResult(_table(["a"], ["r"]), rows_in=1), {}, 0.0)
    kept = pq.read_table(tmp_path / "s" / "part-00000.parquet")
    assert kept.schema.names == ["id", "x"] and kept.num_rows == 0
    rej = pq.read_table(tmp_path / "s" / REJECTS / "part-00000.parquet")
    assert rej.schema.names == ["id", "x", REJECT]


def test_recommit_never_deletes_the_old_stage_in_place(tmp_path, monkeypatch):
    # A delete that dies half-way (parts gone, manifest still there) must not leave a stage that
    # looks done with the old fingerprint and has no data.
    import shutil

    from themis_ray import store as store_mod

    store = StageStore(tmp_path, "label")
    store.commit(StageResult(_table(["a"], [None]), rows_in=1), {"v": 1}, 0.0)
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, ignore_errors=False, **kw):
        for part in sorted(Path(path).rglob("*.parquet")):  # the parts go first, then it dies
            part.unlink()
        if not ignore_errors:
            raise OSError("crash during delete")

    store.commit(StageResult(_table(["b", "c"], [None, None]), rows_in=2), {"v": 2}, 0.0)  # warm path
    monkeypatch.setattr(store_mod.shutil, "rmtree", dying_rmtree)
    try:
        store.commit(StageResult(_table(["d"], [None]), rows_in=1), {"v": 3}, 0.0)
    except OSError:
        pass
    monkeypatch.setattr(store_mod.shutil, "rmtree", real_rmtree)
    if store.is_done({"v": 2}):
        pytest.fail("the old stage still looks done although its parts were deleted")
    assert store.is_done({"v": 3})
    assert store.read().column("id").to_pylist() == ["d"]


# ------------------------------------------------------------------------------------ schema helpers


def test_output_schema_keeps_inputs_adds_stage_columns_and_one_reject_column():
    from themis_ray.schema import output_schema

    first = output_schema("synthesize")
    assert first.names[0] == "id" and first.names[-1] == REJECT
    nxt = output_schema("classify", first)
    assert nxt.names == first.names[:-1] + ["synthesis_scenario", "predicted_scenario", "scenario_confidence", REJECT]
    assert nxt.field("scenario_confidence").type == pa.float64()
    # a column the input already has is not added twice
    again = output_schema("classify", nxt)
    assert again.names == nxt.names


def test_to_table_names_the_bad_row_and_field():
    from themis_ray.schema import to_table

    schema = pa.schema([("id", pa.string()), ("score", pa.float64()), (REJECT, pa.string())])
    table = to_table([{"id": "a", "score": 4.0}, {"id": "b", "score": None, REJECT: "r"}], schema, "label")
    assert table.schema == schema and table.column("score").to_pylist() == [4.0, None]
    with pytest.raises(ValueError, match=r"label: row 'b' field 'score'"):
        to_table([{"id": "a", "score": 4.0}, {"id": "b", "score": "four"}], schema, "label")


def test_stable_id_is_deterministic_and_separates_parts():
    from themis_ray.schema import stable_id

    assert stable_id("a", 1) == stable_id("a", 1)
    assert len(stable_id("x")) == 20
    assert stable_id("ab", "c") != stable_id("a", "bc")
    assert stable_id("a", 1) != stable_id("a", 2)
