"""Resuming an interrupted stage: finished blocks are kept and only the missing rows run again."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from themis_ray.config import EngineConfig, PoolConfig
from themis_ray.schema import REJECT, output_schema, to_table
from themis_ray.store import PARTIAL, StageStore

INPUT = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("scenario", pa.string())])


def test_staging_keeps_partial_blocks_only_for_the_same_fingerprint(tmp_path):
    store = StageStore(tmp_path, "label")
    staging = store.staging_dir({"config": "a"})
    (staging / PARTIAL / "part-1.parquet").write_bytes(b"finished block")
    (staging / "stray.txt").write_text("left by the crashed run")
    again = store.staging_dir({"config": "a"})
    assert (again / PARTIAL / "part-1.parquet").is_file()
    assert not (again / "stray.txt").exists()
    changed = store.staging_dir({"config": "b"})  # another config: old answers do not apply
    assert not (changed / PARTIAL / "part-1.parquet").exists()


@pytest.mark.integration
def test_map_rows_skips_rows_a_previous_run_accepted(tmp_path):
    import ray

    from themis_ray.stages import map_rows
    from themis_ray.stages.classify import Classifier

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rows = [{"id": i, "instruction": text, "scenario": "open_qa"} for i, text in
                [("a", "Translate 'cat' into French."), ("b", "What is 3+4?"), ("c", "Write a limerick.")]]
        table = pa.Table.from_pylist(rows, schema=INPUT)
        schema = output_schema("classify", INPUT)
        checkpoint = tmp_path / "ckpt"
        checkpoint.mkdir()
        # A crashed run had finished "a" (with a value no classifier produces) and rejected "b".
        earlier = [{**rows[0], "predicted_scenario": "SENTINEL", "scenario_confidence": 1.0, REJECT: None},
                   {**rows[1], REJECT: "engine error: timeout"}]
        pq.write_table(to_table(earlier, schema, "classify"), checkpoint / "part-old.parquet")

        out = map_rows(table, Classifier, PoolConfig(batch_size=1, num_cpus=1), checkpoint=checkpoint,
                       engine_cfg=EngineConfig(num_threads=1), route_by="synthesis", scenarios_dir=None)
        by_id = {r["id"]: r for r in out.to_pylist()}
        assert sorted(by_id) == ["a", "b", "c"] and out.num_rows == 3  # each row exactly once
        assert by_id["a"]["predicted_scenario"] == "SENTINEL"  # not asked again
        for i in ("b", "c"):  # the reject is retried, the missing row is run
            assert by_id[i][REJECT] is None and by_id[i]["predicted_scenario"] not in (None, "SENTINEL")
        written = pa.concat_tables([pq.read_table(p) for p in checkpoint.glob("part-*.parquet")])
        assert sorted(written["id"].to_pylist()) == ["a", "b", "b", "c"]  # new blocks landed on disk
    finally:
        ray.shutdown()
