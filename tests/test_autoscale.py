"""Autoscaled batch labeling, on Ray's own autoscaler with its fake multi-node provider.

A head with no workers; worker nodes of type `labeler` are the only ones offering the `labeler`
resource. The label stage's processor runs through `map_processor` on an actor pool (min 1, max 3 actors,
no CPU, `labeler: 1` each) against a real OpenAI-compatible HTTP server on 127.0.0.1. The autoscaler
must add labeler nodes as the pool asks for actors and remove them once the pool is gone; every
record must be labelled exactly once.
"""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pytest

from local_ray import LocalRayHead
from openai_server import OpenAIServer
from themis_ray.config import EngineConfig, PoolConfig, SamplingConfig
from themis_ray.schema import REJECT, output_schema

pytestmark = pytest.mark.integration

RECORDS = 36
MAX_WORKERS = 3


def autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "themis-autoscale-test",
        "max_workers": MAX_WORKERS,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # worker nodes join this head, not the default port
            "use_node_id_as_ip": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "ray.worker.labeler": {
                "resources": {"CPU": 0, "labeler": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_WORKERS,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class NodeCounter:
    """Samples the number of alive nodes twice a second, in a thread."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def alive(self) -> int:
        import ray

        return sum(1 for node in ray.nodes() if node["Alive"])

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.alive()))
            self._stop.wait(0.5)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1][1] == count:
                return True
            time.sleep(0.5)
        return False

    def counts(self) -> list[int]:
        """The node count over time, repeated values collapsed."""
        out: list[int] = []
        for _, n in self.samples:
            if not out or out[-1] != n:
                out.append(n)
        return out


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head = LocalRayHead(num_cpus=2, env=env)
    head.autoscaling_config = autoscaling_config(head.address)
    head.start()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        head.connect(log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        head.stop()


def records(n: int) -> pa.Table:
    rows = [{"id": f"r{i:03d}", "instruction": f"What is {i} + {i}?", "scenario": "math_qa",
             "reference": str(2 * i), "response": f"{i} + {i} = {2 * i}."} for i in range(n)]
    return pa.Table.from_pylist(rows)


def test_labeling_scales_workers_up_then_down_and_labels_every_record_once(autoscaling_cluster):
    import ray

    from themis_ray.executor import Step, StepEngine, map_processor
    from themis_ray.stages.label import Labeler

    head = autoscaling_cluster
    table = records(RECORDS)
    pool = PoolConfig(min_size=1, max_size=MAX_WORKERS, num_cpus=0, batch_size=2, resources={"labeler": 1})
    counter = NodeCounter().start()
    try:
        assert counter.wait_for(1, 30), f"the cluster should start with the head alone: {counter.counts()}"
        with OpenAIServer(latency_s=1.0) as server:
            engine = EngineConfig(kind="openai", base_url=server.base_url, model="teacher",
                                  max_concurrency=4, timeout_s=30, max_retries=3)
            step = Step(name="label", processor=Labeler, pool=pool, engine=StepEngine(engine, "label.engine"),
                        args={"engine_cfg": engine, "sampling": SamplingConfig(max_tokens=64), "score_by": "text",
                              "calibrate": False, "prefill": False, "max_attempts": 1, "retry_temperature": 0.7,
                              "scenarios_dir": None})
            rows = map_processor(ray.data.from_arrow(table), step, output_schema("label", table.schema)).take_all()
        scaled_down = counter.wait_for(1, 120)
    finally:
        counter.stop()
    counts = counter.counts()
    print(f"alive nodes over time: {counts}")
    monitor = "" if scaled_down and max(counts) > 1 else head.session_log("monitor")

    # The pool's demand for `labeler` slots grew the cluster beyond the head, and it shrank back.
    assert max(counts) >= 2, f"no worker node was added: {counts}\n{monitor}"
    assert scaled_down, f"the workers were not removed when idle: {counts}\n{monitor}"
    assert counts[0] == 1 and counts[-1] == 1

    # Every record labelled, each exactly once, by the real HTTP endpoint.
    assert len(rows) == RECORDS
    assert sorted(r["response_id"] for r in rows) == sorted(table["id"].to_pylist())
    assert all(r[REJECT] is None and r["score"] == 4 for r in rows), [r[REJECT] for r in rows if r[REJECT]]
    assert len(server.answered) == RECORDS
    assert set(server.answered.values()) == {1}
    assert set(server.requests.values()) == {1}
