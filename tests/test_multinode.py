"""A judge job on a three-node local Ray cluster (a head and two labeler nodes), one labeler node lost
mid-run and another brought up in its place: the job finishes, rows in = rows out + rows rejected, no
row id is written twice, and the endpoint's log shows at most the requests in flight on the lost node
paid for twice."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from multinode import local_cluster  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

from themis_ray.config import load  # noqa: E402
from themis_ray.store import StageStore  # noqa: E402

pytestmark = pytest.mark.integration

N, BATCH, CONCURRENCY = 240, 4, 4


def labeler_node(cluster):
    """A worker node that runs one of the pool's actors now (the first worker if none is found)."""
    import ray

    alive = {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
             if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]}
    return next((node for node in cluster.workers if node.node_id in alive), cluster.workers[0])


def test_a_node_lost_mid_run_loses_and_duplicates_nothing(tmp_path):
    import ray

    data = tmp_path / "answers.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."})
                              for i in range(N)))
    output = tmp_path / "judged"
    log = tmp_path / "requests.log"
    with OpenAIServer(latency_s=0.1, log_path=str(log)) as server, local_cluster(workers=2) as cluster:
        cfg = load(None, [f"input={data}", f"output={output}", "judge.engine.kind=openai",
                          f"judge.engine.base_url={server.base_url}", "judge.engine.model=teacher",
                          f"judge.engine.max_concurrency={CONCURRENCY}", "judge.scenario=open_qa",
                          "judge.columns.instruction=prompt", "judge.columns.response=completion",
                          "judge.pool.num_cpus=0", "judge.pool.min_size=2", "judge.pool.max_size=2",
                          f"judge.pool.batch_size={BATCH}", "judge.pool.resources.labeler=1",
                          "judge.sampling.logprobs=0", "judge.sampling.max_tokens=32"])
        ray.data.DataContext.get_current().enable_progress_bars = False
        store, lost, result = StageStore.at(str(output)), [], {}
        from themis_ray.judge_job import judge_dataset

        def job():  # the driver's plan on a thread: nodes are added from the main thread only (Ray's rule)
            try:
                result["manifest"] = judge_dataset(cfg)
            except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
                result["error"] = err

        running = threading.Thread(target=job, daemon=True)
        running.start()
        deadline = time.time() + 300  # once a few batches are written, a labeler node dies; another comes up
        while len(store.written_files()) < 6 and time.time() < deadline and running.is_alive():
            time.sleep(0.1)
        lost.append(server.total_requests)
        cluster.remove_worker(labeler_node(cluster))
        cluster.add_worker()
        running.join(timeout=600)
        if "error" in result:
            raise result["error"]
        manifest = result["manifest"]
    assert lost and 0 < lost[0] < N, lost  # the node went while the job ran
    assert manifest["rows_in"] == N == manifest["rows_out"] + manifest["rows_rejected"]
    rejects = store.read_rejects()
    ids = store.read()["id"].to_pylist() + (rejects["id"].to_pylist() if rejects.num_rows else [])
    assert len(ids) == len(set(ids)) == N  # no id twice
    paid = Counter(log.read_text().split())
    assert len(paid) == N  # every row answered
    twice = sum(n - 1 for n in paid.values())
    # Paid twice at most: what was in flight on the lost node (its actor's requests; answers that
    # arrived are in the request cache and never asked again).
    assert twice <= CONCURRENCY, f"{twice} requests paid twice"
