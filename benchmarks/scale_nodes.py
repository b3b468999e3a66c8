"""`themis-ray judge` across labeler nodes of a local multi-node Ray cluster, and through the loss of one.

Everything runs on this machine: `tests/openai_server.py` in a process of its own (latency-bound:
`--latency` seconds per answer, no concurrency cap), and a Ray cluster of a head (reads, writes, light
maps) plus labeler nodes, each a raylet of its own offering one `labeler` resource and no CPU, so the
judge's pool (`judge.pool.resources.labeler=1`, one actor per node) runs one actor on each
(`tests/multinode.py`). The job is the judge job a user runs, in this process as its driver.

1. nodes: records/s (the manifest's wall time) at each node count of `--nodes`, the same rows and
   endpoint, a fresh output and cache each time. The endpoint allows `concurrency / latency` requests/s
   per actor; on a 2-core machine the bound is the client's CPU (every actor, the server and the driver
   share the cores), which the `machine` block's load average shows.
2. node loss: on 2 labeler nodes, one is removed without a drain once `--kill-at` of the rows are
   answered, and another added (the autoscaler bringing a node back). `duplicate_ids` (ids written
   twice in output + rejects), `rows_reconcile` (rows in = out + rejected) and `paid_twice` (requests
   the endpoint answered more than once for the same prompt, from its log; at most what was in flight
   on the lost node) are reported.
3. driver kill (`--driver-kill`, or alone with `--only driver-kill`): `themis-ray judge` in a process of
   its own on 2 labeler nodes, its driver SIGKILLed at `--kill-at` and the command run again: the same
   figures, `paid_twice` bounded by the requests in flight when the driver died.

    python benchmarks/scale_nodes.py [--rows 20000] [--nodes 1,2,4] [--latency 0.2] [--concurrency 16]
                                     [--kill-at 0.4] [--driver-kill | --only driver-kill]
                                     [--out benchmarks/results/scale_nodes.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _endpoint import THEMIS, Endpoint, emit, machine

from multinode import local_cluster
from themis_ray.config import load
from themis_ray.store import StageStore


def write_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"What is {i} + {i}? Show the steps.", "completion": f"It is {2 * i}."}) + "\n")


def judge_cfg(data: Path, output: Path, endpoint: Endpoint, actors: int, concurrency: int, batch: int):
    return load(None, judge_overrides(data, output, endpoint, actors, concurrency, batch))


def judge_overrides(data: Path, output: Path, endpoint: Endpoint, actors: int, concurrency: int, batch: int) -> list:
    return [f"input={data}", f"output={output}", "judge.engine.kind=openai",
                       f"judge.engine.base_url={endpoint.base_url}", "judge.engine.model=teacher",
                       f"judge.engine.max_concurrency={concurrency}", "judge.scenario=open_qa",
                       "judge.columns.instruction=prompt", "judge.columns.response=completion",
                       "judge.pool.num_cpus=0", f"judge.pool.min_size={actors}", f"judge.pool.max_size={actors}",
                       f"judge.pool.batch_size={batch}", "judge.pool.resources.labeler=1",
                       "judge.sampling.logprobs=0", "judge.sampling.max_tokens=32"]


def duplicate_ids(store: StageStore) -> int:
    """Ids written more than once among the listed parts and rejects, counted by a Ray task (not here)."""
    import ray

    @ray.remote(num_cpus=0.25)
    def count(files: list[str]) -> int:
        import pyarrow.parquet as pq

        ids = Counter(i for path in files for i in pq.read_table(path, filesystem=store.fs, columns=["id"])["id"].to_pylist())
        return sum(n - 1 for n in ids.values())

    return ray.get(count.remote(store.files() + store.reject_files()))


def reconcile(output: Path, manifest: dict, endpoint: Endpoint) -> dict:
    store = StageStore.at(str(output))
    paid = endpoint.paid()
    return {"rows_in": manifest["rows_in"], "rows_out": manifest["rows_out"], "rows_rejected": manifest["rows_rejected"],
            "rows_reconcile": manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"],
            "duplicate_ids": duplicate_ids(store), "paid": sum(paid.values()),
            "paid_twice": sum(n - 1 for n in paid.values()), "wall_s": manifest["wall_s"],
            "records_per_s": round(manifest["rows_in"] / manifest["wall_s"], 2)}


def run_nodes(folder: Path, data: Path, rows: int, nodes: int, args) -> dict:
    import ray

    from themis_ray.judge_job import judge_dataset

    endpoint = Endpoint(folder, args.latency)
    try:
        with local_cluster(workers=nodes):
            ray.data.DataContext.get_current().enable_progress_bars = False
            output = folder / f"judged-{nodes}"
            manifest = judge_dataset(judge_cfg(data, output, endpoint, nodes, args.concurrency, args.batch))
            return {"nodes": nodes, **reconcile(output, manifest, endpoint)}
    finally:
        endpoint.close()


def run_node_loss(folder: Path, data: Path, rows: int, args) -> dict:
    import ray

    from themis_ray.judge_job import judge_dataset

    endpoint = Endpoint(folder, args.latency)
    events: dict = {}
    try:
        with local_cluster(workers=2) as cluster:
            ray.data.DataContext.get_current().enable_progress_bars = False
            output = folder / "judged-loss"

            result: dict = {}

            def job():  # the driver's plan on a thread: Ray adds nodes from the main thread only
                try:
                    result["manifest"] = judge_dataset(judge_cfg(data, output, endpoint, 2, args.concurrency, args.batch))
                except BaseException as err:  # noqa: BLE001 - raised again below
                    result["error"] = err

            running = threading.Thread(target=job, daemon=True)
            running.start()
            while sum(endpoint.paid().values()) < args.kill_at * rows and running.is_alive():
                time.sleep(0.2)
            events["removed_at_answered"] = sum(endpoint.paid().values())
            start = time.perf_counter()
            cluster.remove_worker(cluster.workers[0])
            cluster.add_worker()
            events["replacement_up_s"] = round(time.perf_counter() - start, 2)
            running.join()
            if "error" in result:
                raise result["error"]
            return {"nodes": 2, **events, **reconcile(output, result["manifest"], endpoint)}
    finally:
        endpoint.close()


def run_driver_kill(folder: Path, data: Path, rows: int, args) -> dict:
    """`themis-ray judge` as a user runs it, on 2 labeler nodes: its driver process group SIGKILLed once
    `--kill-at` of the rows are answered, then the same command again. The request cache (in the
    output's `_cache/`) holds every answer that came back before the kill; what the killed actors had in
    flight (at most `concurrency` per actor) is all that can be paid twice."""
    import os
    import signal
    import subprocess

    endpoint = Endpoint(folder, args.latency)
    try:
        with local_cluster(workers=2) as cluster:
            output = folder / "judged-driver-kill"
            command = [THEMIS, "judge", *judge_overrides(data, output, endpoint, 2, args.concurrency, args.batch),
                       f"ray.address={cluster.cluster.address}"]
            env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
            start = time.perf_counter()
            first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            while sum(endpoint.paid().values()) < args.kill_at * rows and first.poll() is None:
                time.sleep(0.2)
            if first.poll() is not None:
                raise RuntimeError("the first run ended before it could be killed")
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            killed_at = sum(endpoint.paid().values())
            time.sleep(2)  # answers to requests in flight at the kill still arrive at the server
            answered_by_kill = sum(endpoint.paid().values())
            second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
            if second.returncode:
                raise RuntimeError(second.stderr[-3000:])
            manifest = StageStore.at(str(output)).manifest()
            return {"nodes": 2, "killed_at_answered": killed_at, "answered_by_restart": answered_by_kill,
                    "in_flight_bound": 2 * args.concurrency, "resumed": "resuming" in second.stdout,
                    "kill_to_end_s": round(time.perf_counter() - start, 1),
                    **reconcile(output, manifest, endpoint)}
    finally:
        endpoint.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kill-at", type=float, default=0.4)
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--driver-kill", action="store_true", help="also kill the judge job's driver and rerun it")
    parser.add_argument("--only", choices=["driver-kill"], help="run this part alone")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-nodes-") as tmp:
        folder = Path(tmp)
        data = folder / "answers.jsonl"
        write_input(data, args.rows)
        if args.only == "driver-kill":
            emit({"rows": args.rows, "latency_s": args.latency, "concurrency_per_actor": args.concurrency,
                  "driver_kill": run_driver_kill(folder, data, args.rows, args), "machine": machine()}, args.out)
            return
        by_nodes = [run_nodes(folder, data, args.rows, int(n), args) for n in args.nodes.split(",")]
        base = by_nodes[0]["records_per_s"]
        results = {
            "rows": args.rows, "latency_s": args.latency, "concurrency_per_actor": args.concurrency,
            "endpoint_ceiling_per_actor_rps": round(args.concurrency / args.latency, 1),
            "records_per_s_by_nodes": {str(r["nodes"]): r["records_per_s"] for r in by_nodes},
            "speedup_by_nodes": {str(r["nodes"]): round(r["records_per_s"] / base, 2) for r in by_nodes},
            "runs": by_nodes,
            "node_loss": None if args.skip_loss else run_node_loss(folder, data, args.rows, args),
            "driver_kill": run_driver_kill(folder, data, args.rows, args) if args.driver_kill else None,
            "machine": machine(),
        }
    emit(results, args.out)


if __name__ == "__main__":
    main()
