"""A Ray cluster of several nodes on this machine, for tests and benchmarks.

`ray.cluster_utils.Cluster` starts a head and worker nodes, each a raylet of its own with its own CPUs,
object store and custom resources, all on loopback; this process connects to it as the driver. A
pool that asks for a resource only the worker nodes offer (`labeler` here) runs its actors there, one
per node when each node offers one, so removing a node takes its actors and whatever they had in
flight with it, as losing a machine does; adding one is the autoscaler bringing a node back.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


class LocalCluster:
    def __init__(self, cluster, resource: str):
        self.cluster, self.resource = cluster, resource
        self.workers: list = []

    def add_worker(self, cpus: float = 0, amount: float = 1):
        """One more worker node offering `amount` of the resource (and `cpus` CPUs), once it is up."""
        node = self.cluster.add_node(num_cpus=cpus, resources={self.resource: amount})
        self.cluster.wait_for_nodes()
        self.workers.append(node)
        return node

    def remove_worker(self, node) -> None:
        """The node gone at once, as a machine that died (no graceful drain)."""
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)


@contextmanager
def local_cluster(workers: int = 2, head_cpus: int = 2, worker_cpus: float = 0,
                  resource: str = "labeler") -> Iterator[LocalCluster]:
    """A head with `head_cpus` CPUs (reads, writes and light maps run there) and `workers` worker nodes
    each offering one `resource` and `worker_cpus` CPUs, this process connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="tmn-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": head_cpus, "include_dashboard": False, "temp_dir": temp_dir})
    local = LocalCluster(cluster, resource)
    try:
        for _ in range(workers):
            local.add_worker(worker_cpus)
        ray.init(address=cluster.address)
        yield local
    finally:
        ray.shutdown()
        cluster.shutdown()
