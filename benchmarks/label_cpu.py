"""Where the label stage's CPU goes, against the openai engine alone: CPU seconds per 1,000 records.

On a machine the client saturates, records/s is set by CPU per record, so this splits it:
1. the engine alone in this process (one `generate` call over `--alone` records), and the same engine
   called the way an actor calls it (`--threads` threads, one batch of 64 each at a time);
2. the label stage (`themis-ray label`, one actor, as in scale_label.py) over `--rows` records, with the
   CPU of every process on the machine sampled while it runs (the actor, the driver, Ray's own
   processes, the server), and inside the actor the engine's event-loop thread apart from the threads
   that run the batches (render, parse, write).

    python benchmarks/label_cpu.py [--rows 30000] [--out benchmarks/results/label_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from _endpoint import Endpoint, engine_alone, machine, write_json
from scale_label import conversations, label_run

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _group(proc: psutil.Process) -> str:
    """A process's role: Ray names its workers `ray::<what>`; the rest by their command line."""
    name = proc.name()
    if name.startswith("ray::"):
        return "actor" if name.startswith("ray::MapWorker") else "ray workers (reads, Ray Data's actors)"
    command = " ".join(proc.cmdline())
    for key, group in (("label_cpu.py", "benchmark process (the engine alone runs here)"), ("openai_server", "server"),
                       ("themis-ray", "driver"), ("raylet", "ray system"), ("gcs_server", "ray system"), ("dashboard", "ray system"), ("log_monitor", "ray system"),
                       ("monitor.py", "ray system"), ("runtime_env", "ray system")):
        if key in command:
            return group
    return "other"


class CpuSampler:
    """CPU seconds per process group between start and `stop()`, sampled every second so that processes
    which exit before the end (Ray's, when the stage is done) are counted up to their last sample."""

    def __init__(self):
        self.first = {pid: cpu for pid, (_, cpu) in self._snapshot().items()}
        self.last: dict[int, tuple[str, float]] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        out = {}
        for proc in psutil.process_iter():
            try:
                out[proc.pid] = (_group(proc), _cpu(proc))
            except psutil.Error:
                pass  # gone, or not ours to read
        return out

    def _run(self) -> None:
        while not self.done.wait(1.0):
            self.last.update(self._snapshot())

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        self.last.update(self._snapshot())
        groups: dict[str, float] = {}
        for pid, (group, cpu) in self.last.items():
            groups[group] = groups.get(group, 0.0) + cpu - self.first.get(pid, 0.0)
        return {g: round(s, 2) for g, s in sorted(groups.items(), key=lambda kv: -kv[1]) if s > 0.05}


def actor_threads(seconds: float, after: float) -> dict:
    """Inside the labelling actor: CPU cores used by its engine's event-loop thread and by its other
    threads over `seconds`, `after` seconds after the actor appears."""
    deadline = time.time() + 120
    while time.time() < deadline:
        actors = [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("ray::MapWorker")]
        if actors:
            break
        time.sleep(0.5)
    else:
        return {}
    time.sleep(after)
    actor = actors[0]

    def per_thread() -> dict:
        out = {}
        try:
            tids = os.listdir(f"/proc/{actor.pid}/task")
        except OSError:
            return out  # the actor is gone: the stage ended first
        for tid in tids:
            try:
                fields = Path(f"/proc/{actor.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
            except OSError:
                pass
        return out

    before, start = per_thread(), time.time()
    time.sleep(seconds)
    after_, wall = per_thread(), time.time() - start
    if not before or not after_:
        return {}  # too short a run to watch the actor for `seconds`
    used = {tid: after_[tid] - before.get(tid, 0.0) for tid in after_}
    # The engine's loop is the busiest thread by far (every request's client work runs on it).
    loop = max(used, key=used.get)
    return {"seconds": round(wall, 1), "engine_loop_thread_cores": round(used[loop] / wall, 3),
            "other_threads_cores": round(sum(v for t, v in used.items() if t != loop) / wall, 3),
            "threads": len(used)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--alone", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=16, help="batches an actor runs at once (16 at 32 requests)")
    parser.add_argument("--out", default="benchmarks/results/label_cpu.json")
    args = parser.parse_args()
    doc: dict = {"command": "python benchmarks/label_cpu.py " + " ".join(sys.argv[1:]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="label-cpu-") as tmp:
        endpoint = Endpoint(Path(tmp), latency_s=0.02)
        try:
            peer = conversations(args.alone)
            sampler = CpuSampler()
            alone = engine_alone(endpoint.base_url, peer, 32, 32)
            alone["cpu_s_per_1k"] = {g: round(s * 1000 / args.alone, 3) for g, s in sampler.stop().items()}
            doc["engine_alone"] = alone
            doc["engine_in_threads"] = engine_alone(endpoint.base_url, peer, 32, 32, threads=args.threads)
            doc["engine_alone_again"] = engine_alone(endpoint.base_url, peer, 32, 32)
            print(json.dumps({k: doc[k] for k in ("engine_alone", "engine_in_threads", "engine_alone_again")}), flush=True)
            inside: dict = {}
            watcher = threading.Thread(target=lambda: inside.update(actor_threads(40, 15)), daemon=True)
            watcher.start()
            sampler = CpuSampler()
            stage = label_run(Path(tmp), args.rows, endpoint, concurrency=32)
            stage["cpu_s_per_1k"] = {g: round(s * 1000 / args.rows, 3) for g, s in sampler.stop().items()}
            watcher.join(timeout=5)
            stage["actor_threads"] = inside
            doc["stage"] = stage
            print(json.dumps({"stage": stage}), flush=True)
        finally:
            endpoint.close()
    write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
