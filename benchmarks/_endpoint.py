"""What the endpoint benchmarks share: the OpenAI-compatible test server in a process of its own, the
openai engine alone in this process (the fair peer: same client, same prompts, no Ray), a command's
peak driver memory, and the machine's description."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from openai_server import start_process  # noqa: E402

THEMIS = str(Path(sys.executable).with_name("themis-ray"))


def emit(results: dict, out: str | None = None) -> None:
    """Print a benchmark's results as JSON, and write them to `out` too (its raw output file)."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """The test server in its own process; `paid()` counts its answered requests per prompt digest."""

    def __init__(self, folder: Path, latency_s: float, cap: int | None = None, **faults):
        self.port, self.log = free_port(), folder / f"requests-{time.time_ns()}.log"
        self.process = start_process(self.port, self.log, latency_s=latency_s, max_concurrency=cap, **faults)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def paid(self) -> Counter:
        return Counter(self.log.read_text().split()) if self.log.exists() else Counter()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def digest(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()


def engine_alone(base_url: str, conversations: list, concurrency: int, max_tokens: int, threads: int = 0,
                 batch: int = 64) -> dict:
    """The openai engine called once with every conversation, in this process: the best this client
    does on this machine, the peer the stage is measured against. With `threads`, it is called the way
    an actor calls it instead: that many threads, each with one batch of `batch` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from themis_ray.config import EngineConfig, SamplingConfig
    from themis_ray.engines.openai_engine import OpenAIEngine

    engine = OpenAIEngine(EngineConfig(kind="openai", base_url=base_url, model="teacher", max_concurrency=concurrency,
                                       api_key_env="THEMIS_BENCH_UNUSED_KEY"))
    sampling = SamplingConfig(max_tokens=max_tokens)
    start = time.perf_counter()
    if threads:
        with ThreadPoolExecutor(threads) as pool:
            batches = [conversations[i:i + batch] for i in range(0, len(conversations), batch)]
            done = [d for answers in pool.map(lambda b: engine.generate(b, sampling), batches) for d in answers]
    else:
        done = engine.generate(conversations, sampling)
    wall = time.perf_counter() - start
    engine.close()
    out = {"records": len(conversations), "errors": sum(1 for d in done if d.error), "wall_s": round(wall, 2),
           "records_per_s": round(len(conversations) / wall, 2)}
    return {**out, "threads": threads, "batch": batch} if threads else out


def _engine_alone_share(args: tuple) -> dict:
    return engine_alone(*args)


def engine_alone_processes(base_url: str, conversations: list, concurrency: int, max_tokens: int,
                           processes: int) -> dict:
    """The engine alone in `processes` processes at once, each with its share of the conversations (the
    like-for-like peer of a stage whose pool runs that many actors): records/s over the slowest share."""
    if processes == 1:
        return engine_alone(base_url, conversations, concurrency, max_tokens)
    import multiprocessing

    shares = [conversations[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_engine_alone_share, [(base_url, share[:32], concurrency, max_tokens) for share in shares])  # imports
        start = time.perf_counter()
        each = pool.map(_engine_alone_share, [(base_url, share, concurrency, max_tokens) for share in shares])
        wall = time.perf_counter() - start
    return {"records": len(conversations), "processes": processes, "errors": sum(e["errors"] for e in each),
            "wall_s": round(wall, 2), "records_per_s": round(len(conversations) / wall, 2),
            "each_records_per_s": [e["records_per_s"] for e in each]}


def run_measured(argv: list[str], timeout: float = 7200) -> dict:
    """Run a command; its wall time and the peak RSS of the driver process itself (not its Ray children),
    sampled every 0.2 s."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc, peak = psutil.Process(child.pid), 0
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if time.perf_counter() - start > timeout:
            child.kill()
        time.sleep(0.2)
    reader.join(timeout=5)
    if child.returncode:
        raise RuntimeError(f"{argv[:3]} failed ({child.returncode}):\n{''.join(output[-40:])}")
    return {"wall_s": round(time.perf_counter() - start, 2), "driver_peak_rss_mb": round(peak / 2**20, 1)}


def machine() -> dict:
    import ray

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "ray": ray.__version__, "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
