"""Resume after a crash: the driver of a label run is killed with SIGKILL mid-stage, the same command
runs again, and the endpoint's own request log shows what was paid for twice.

The OpenAI-compatible server runs in its own process, so it outlives the killed driver; the stage runs
as a user runs it, `themis-ray label --config ...`, on a local Ray the driver starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from local_ray import free_ports  # noqa: E402
from openai_server import start_process  # noqa: E402
from stage_io import finished_stage  # noqa: E402

from themis_ray.store import StageStore  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 800, 32


def _label(config: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([str(Path(sys.executable).with_name("themis-ray")), "label", "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_killed_driver_resumes_without_paying_twice_for_written_rows(tmp_path):
    (port,) = free_ports(1)
    log = tmp_path / "requests.log"
    server = start_process(port, log)
    run_dir = tmp_path / "run"
    responses = pa.Table.from_pylist([{"id": f"r{i:04d}", "instruction": f"What is {i} + {i}?", "scenario": "open_qa",
                                       "reference": None, "response": f"It is {2 * i}."} for i in range(N)])
    finished_stage(run_dir, "respond", responses)
    pool = {"num_cpus": 0, "min_size": 1, "max_size": 1, "batch_size": BATCH}
    config = tmp_path / "label.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "ray": {"num_cpus": 2}, "label": {
        "engine": {"kind": "openai", "model": "teacher", "base_url": f"http://127.0.0.1:{port}/v1",
                   "max_concurrency": 16},
        "sampling": {"max_tokens": 32, "logprobs": 0}, "score_by": "text", "prefill_score": False, "pool": pool}}))
    label = StageStore(str(run_dir), "label")
    try:
        first = _label(config)
        deadline = time.time() + 300
        while len(label.written_files()) < 4 and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything in its session, at once
        first.wait()
        time.sleep(2)  # answers already on the wire land in the log
        before = Counter(log.read_text().split())
        written = len(label.written_files())
        assert 0 < sum(before.values()) < N and written >= 4

        second = _label(config)
        assert second.wait(timeout=600) == 0
    finally:
        server.kill()
    manifest = label.manifest()
    paid = Counter(log.read_text().split())
    assert manifest["rows_in"] == N == manifest["rows_out"] + manifest["rows_rejected"]
    assert len(paid) == N  # every record answered
    twice = sum(n - 1 for n in paid.values())
    # Only answers that were in flight when the driver died may be paid again: at most the batches the
    # one actor was running at once. Everything written is never asked again.
    in_flight_bound = 8 * BATCH
    assert twice <= in_flight_bound, f"{twice} records answered twice"
    kept = label.read(columns=["response_id"])["response_id"].to_pylist()
    rejected = label.read_rejects()
    ids = kept + (rejected["response_id"].to_pylist() if rejected.num_rows else [])
    assert sorted(ids) == sorted(responses["id"].to_pylist())  # none lost, none written twice
