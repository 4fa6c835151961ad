"""A small real multi-node Ray cluster for the tests (``ray.cluster_utils.Cluster``).

A head node with no CPUs (the test process, the driver, connects to it) and two worker
nodes with one CPU each. All nodes share this machine's IP, so anything that tells nodes
apart by IP sees one node: ckptable must use node ids. Objects stores are kept small
(the transfers must not need room for a whole directory).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

#: Object store of each node: far below the 1 GiB moved between nodes in the tests.
OBJECT_STORE_BYTES = 256 << 20


@dataclasses.dataclass
class RayCluster:
    cluster: Any
    head_node_id: str
    #: Node ids of the two worker nodes, in the order they were added.
    worker_node_ids: list[str]

    def on_node(self, node_id: str) -> Any:
        """A scheduling strategy that pins a task or actor to ``node_id``."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id, soft=False)


def start_cluster() -> RayCluster:
    import ray
    from ray.cluster_utils import Cluster

    # The actor classes of the tests live in tests/ (ray_actors.py): every worker process
    # of every node must import them by name, so the nodes start with tests/ on the path.
    tests = str(Path(__file__).resolve().parent)
    path = os.environ.get("PYTHONPATH", "")
    if tests not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, path) if p)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES},
    )
    try:
        workers = [
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(2)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        head = ray.get_runtime_context().get_node_id()
        return RayCluster(cluster, head, [node.node_id for node in workers])
    except BaseException:
        ray.shutdown()
        cluster.shutdown()
        raise


def stop_cluster(ray_cluster: RayCluster) -> None:
    import ray

    ray.shutdown()
    ray_cluster.cluster.shutdown()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset this process's RSS high-water mark (``VmHWM``) to its current RSS (Linux
    4.0+); returns that RSS, the baseline for :func:`peak_rss_increase`."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def peak_rss_increase(baseline: int) -> int:
    """How far this process's RSS rose above ``baseline`` at its peak since the reset."""
    return _status_bytes("VmHWM") - baseline


class ObjectStoreSampler:
    """Samples the object-store use of some nodes from a thread (what ``ray status``
    shows: the raylets report it to the GCS several times a second)."""

    def __init__(self, node_ids: list[str]) -> None:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        self._status = get_cluster_status
        self._gcs_address = ray.get_runtime_context().gcs_address
        self.peak_bytes = dict.fromkeys(node_ids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        status = self._status(self._gcs_address)
        for node in [*status.active_nodes, *status.idle_nodes]:
            if node.node_id not in self.peak_bytes:
                continue
            for usage in node.resource_usage.usage:
                if usage.resource_name == "object_store_memory":
                    used = int(usage.used)
                    self.peak_bytes[node.node_id] = max(self.peak_bytes[node.node_id], used)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> ObjectStoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
