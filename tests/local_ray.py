"""A real Ray head on loopback for tests, started with `ray start --head --block` and stopped by its pid.

Every port the head listens on is picked free, and its temp dir is private, so the cluster never
collides with another Ray on the machine. `ray start` runs in a new session: everything it starts
(GCS, raylet, dashboard and its agents, the autoscaler, the fake provider's worker nodes, every
worker process) stays in that session, and `stop()` ends exactly that session's processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


@contextmanager
def judge_server(cfg, keys: Optional[str] = None):
    """The judge's Ray Serve app from `cfg` (a ServeConfig) on a local Ray of its own; yields its URL.
    `keys` go into `cfg.api_keys_env` after Ray started, so the replicas never see them: only their
    digests travel."""
    import ray
    from ray import serve

    from themis_ray.serve import run_server

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop(cfg.api_keys_env, None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if keys:
        os.environ[cfg.api_keys_env] = keys
    try:
        yield run_server(cfg, blocking=False)
    finally:
        os.environ.pop(cfg.api_keys_env, None)
        serve.shutdown()
        ray.shutdown()


def free_port_range(width: int = 200) -> int:
    """The first port of `width` consecutive ports that are free now (for Ray's worker ports)."""
    for _ in range(50):
        (start,) = free_ports(1)
        start = start - start % width
        if start < 20000 or start + width > 60000:
            continue
        taken = False
        for port in range(start, start + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return start
    raise RuntimeError("no free port range")


def base_env() -> dict:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster: no token to distribute
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    return env


class LocalRayHead:
    def __init__(self, num_cpus: int = 2, autoscaling_config: Optional[dict] = None, env: Optional[dict] = None):
        self.num_cpus = num_cpus
        self.autoscaling_config = autoscaling_config
        self.env = {**base_env(), **(env or {})}
        self.worker_ports = free_port_range()
        ports = [p for p in free_ports(20) if not self.worker_ports <= p < self.worker_ports + 200]
        (self.gcs_port, self.dashboard_port, self.client_port, self.node_manager_port, self.object_manager_port,
         self.agent_listen_port, self.agent_grpc_port, self.metrics_port, self.runtime_env_port) = ports[:9]
        # Unix socket paths must stay short: a short temp dir under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
        self.process: Optional[subprocess.Popen] = None
        self.log_path = Path(self.temp_dir) / "ray-start.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 180) -> "LocalRayHead":
        cmd = [
            RAY, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--dashboard-agent-listen-port={self.agent_listen_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}", f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--min-worker-port={self.worker_ports}", f"--max-worker-port={self.worker_ports + 199}",
            f"--temp-dir={self.temp_dir}",
        ]
        if self.autoscaling_config is not None:
            config_path = Path(self.temp_dir) / "autoscaling.json"
            config_path.write_text(json.dumps(self.autoscaling_config))
            cmd.append(f"--autoscaling-config={config_path}")
        log = self.log_path.open("w")
        self.process = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"the Ray head did not come up in {timeout_s:.0f} s:\n{self.log_tail()}")

    def connect(self, timeout_s: float = 60, **kwargs) -> None:
        """`ray.init` this process to the head. Ray resolves 127.0.0.1 to the machine's own address and
        looks the head up by it; until the head has registered its node that lookup can fail ("No node
        info found"), so the connection is retried until `timeout_s`."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.init(address=self.address, **kwargs)
                return
            except (ConnectionError, RuntimeError):
                ray.shutdown()
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def session_log(self, prefix: str, chars: int = 4000) -> str:
        """The tail of this cluster's log files whose names start with `prefix` (e.g. "monitor")."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        parts = []
        for path in sorted(logs.glob(f"{prefix}*")) if logs.exists() else []:
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def _session_processes(self) -> list[psutil.Process]:
        """The live processes of this head's session (zombies are already dead)."""
        if self.process is None:
            return []
        found = []
        for proc in psutil.process_iter():
            try:
                if (proc.pid != os.getpid() and os.getsid(proc.pid) == self.process.pid
                        and proc.status() != psutil.STATUS_ZOMBIE):
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def stop(self, grace_s: float = 10) -> None:
        """Stop this head: SIGTERM `ray start --block` (it stops what it started), then SIGKILL
        whatever of its session is still alive."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            leftovers = self._session_processes()
            if not leftovers:
                break
            for proc in leftovers:
                try:
                    proc.send_signal(signal.SIGKILL if time.monotonic() > deadline - 8 else signal.SIGTERM)
                except psutil.Error:
                    pass
            time.sleep(0.5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def kill_at_checkpoint_then_rerun(command: list[str], run_dir: Path, stage: str, tmp_path: Path,
                                  step: int) -> subprocess.CompletedProcess:
    """A training stage's driver SIGKILLed once it has recorded the checkpoint of optimizer step `step`
    (the recipe hangs there: HANG_ENV), then the same command run again to its end. Asserts the killed
    run committed nothing and the second one succeeded; returns the second run."""
    from themis_ray.train.recipe import HANG_ENV, recorded_checkpoints

    marker = tmp_path / "hung"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, env={**base_env(), HANG_ENV: f"{step}:{marker}"}, stdout=log,
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900  # a guard against hanging forever, not a timing assertion
        ray_run = str(run_dir / stage / "_work" / "ray_train" / "train")
        while not (marker.is_file() and recorded_checkpoints(ray_run) >= 1):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)  # the driver dies; its train workers die with its job
        first.wait()
    assert not (run_dir / stage / "_manifest.json").exists()
    second = subprocess.run(command, env=base_env(), capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return second
