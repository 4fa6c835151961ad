"""ckptable's pytest plugin: fixtures for testing checkpointable classes.

Registered through the ``pytest11`` entry point ``ckptable``, so it loads in every pytest
session of every project that installs ckptable; importing it must stay cheap: Ray,
numpy and the rest of ckptable are imported only by the fixtures that need them.

Fixtures:

- ``ckpt_dir``: a fresh, empty directory for a checkpoint (``pathlib.Path``).
- ``ckpt_roundtrip``: ``ckpt_roundtrip(obj, **options)`` runs
  ``ckptable.testing.roundtrip`` into a fresh directory and returns the new object.
- ``ray_cluster`` (session): a small real multi-node Ray cluster
  (``ray.cluster_utils.Cluster``), sized by the ``--ckptable-ray-*`` options or the
  ``ckptable_ray_*`` ini settings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CheckpointRoundtrip", "RayCluster"]

#: (ini name, command-line option, default, help) of the ``ray_cluster`` settings.
_RAY_OPTIONS = (
    ("ckptable_ray_workers", "--ckptable-ray-workers", "2", "worker nodes of ray_cluster"),
    ("ckptable_ray_cpus", "--ckptable-ray-cpus", "1", "CPUs of each ray_cluster worker node"),
    (
        "ckptable_ray_head_cpus",
        "--ckptable-ray-head-cpus",
        "0",
        "CPUs of the ray_cluster head node (the test process is its driver)",
    ),
    (
        "ckptable_ray_object_store",
        "--ckptable-ray-object-store",
        "256MiB",
        "object store of each ray_cluster node, in bytes or with a unit (256MiB, 1GiB)",
    ),
)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``ray_cluster`` settings, as options and as ini values."""
    group = parser.getgroup("ckptable", "ckptable fixtures (ray_cluster)")
    for ini_name, option, default, help_text in _RAY_OPTIONS:
        group.addoption(
            option,
            dest=ini_name,
            default=None,
            help=f"{help_text} (default: ini {ini_name}, else {default})",
        )
        parser.addini(ini_name, f"{help_text} (default {default})", default=default)


@dataclasses.dataclass(frozen=True)
class _RaySettings:
    workers: int
    cpus: int
    head_cpus: int
    object_store: int


_RAY_SETTINGS = pytest.StashKey[_RaySettings]()


def pytest_configure(config: pytest.Config) -> None:
    """Check the ``ray_cluster`` settings when the session starts, not at first use."""
    config.stash[_RAY_SETTINGS] = _RaySettings(
        workers=_count(config, "ckptable_ray_workers", 1),
        cpus=_count(config, "ckptable_ray_cpus", 1),
        head_cpus=_count(config, "ckptable_ray_head_cpus", 0),
        object_store=_size(config, "ckptable_ray_object_store"),
    )


def _setting(config: pytest.Config, name: str) -> str:
    value = config.getoption(name)
    return str(value if value is not None else config.getini(name))


def _names(name: str) -> str:
    """``--ckptable-ray-x / ckptable_ray_x``: how a setting is spelled in messages."""
    return f"{'--' + name.replace('_', '-')} (ini {name})"


def _count(config: pytest.Config, name: str, minimum: int) -> int:
    text = _setting(config, name)
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise pytest.UsageError(
            f"{_names(name)} must be a whole number of at least {minimum}, not {text!r}"
        )
    return value


def _size(config: pytest.Config, name: str) -> int:
    text = _setting(config, name)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise pytest.UsageError(
            f"{_names(name)} must be a size in bytes, or with a unit (KiB, MiB, GiB, KB, MB, GB), "
            f"such as 256MiB; not {text!r}"
        )
    return int(float(match.group(1)) * unit)


@dataclasses.dataclass(frozen=True)
class RayCluster:
    """What the ``ray_cluster`` fixture yields: the cluster and the ids of its nodes.

    All nodes run on this machine and share its IP address: tell them apart by node id.

    Attributes:
        cluster: The ``ray.cluster_utils.Cluster``.
        address: The address ``ray.init`` connected to.
        head_node_id: Node id of the head (the test process is its driver).
        worker_node_ids: Node ids of the worker nodes, in the order they were added.
    """

    cluster: Any
    address: str
    head_node_id: str
    worker_node_ids: list[str]

    def on_node(self, node_id: str) -> Any:
        """A scheduling strategy that pins a task or actor to ``node_id``
        (``.options(scheduling_strategy=cluster.on_node(node_id))``)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id, soft=False)


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A fresh, empty directory to save a checkpoint into."""
    path = tmp_path / "checkpoint"
    path.mkdir()
    return path


class CheckpointRoundtrip:
    """The ``ckpt_roundtrip`` fixture: ``ckptable.testing.roundtrip`` into a fresh
    directory under ``base`` on every call.

    Attributes:
        paths: The checkpoint directories written so far, in order.
    """

    def __init__(self, base: Path) -> None:
        self._base = base
        self.paths: list[Path] = []

    def __call__(self, obj: Any, **options: Any) -> Any:
        """Save ``obj``, rebuild it from the checkpoint, compare, return the new object.

        Args:
            obj: A ``Checkpointable`` (ckptable's or one written for RLlib's).
            **options: Those of ``ckptable.testing.roundtrip``: ``format``,
                ``components``, ``compare``, ``same_types``, ``rtol``, ``atol``,
                ``restore_kwargs`` and ``save_to_path`` keywords.

        Raises:
            AssertionError: the restored state differs from ``obj``'s.
        """
        __tracebackhide__ = True
        from ckptable.testing import roundtrip

        path = self._base / f"roundtrip-{len(self.paths)}"
        self.paths.append(path)
        return roundtrip(obj, path, **options)


@pytest.fixture
def ckpt_roundtrip(tmp_path: Path) -> CheckpointRoundtrip:
    """``ckpt_roundtrip(obj, format=..., components=..., ...)``: save ``obj``, rebuild it
    with ``from_checkpoint`` (or restore only ``components`` into a fresh one), assert
    that the state survived, return the new object."""
    return CheckpointRoundtrip(tmp_path)


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig: pytest.Config) -> Iterator[RayCluster]:
    """A real multi-node Ray cluster for the session, and this process its driver.

    A head node (0 CPUs by default, so that tasks and actors run on the workers) and 2
    worker nodes of 1 CPU, each with a 256 MiB object store; change them with
    ``--ckptable-ray-workers``, ``--ckptable-ray-cpus``, ``--ckptable-ray-head-cpus``
    and ``--ckptable-ray-object-store`` (or the ``ckptable_ray_*`` ini settings).
    Ray hands this process's ``sys.path`` to the workers, so actor classes defined in
    test modules import there. Shut down at the end of the session.
    """
    settings = pytestconfig.stash[_RAY_SETTINGS]
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError as error:
        missing = str(error)
    else:
        missing = ""
    if missing:  # failed outside the except block: no chained traceback in the report
        pytest.fail(
            f"The ray_cluster fixture needs Ray ({missing}): pip install 'ckptable[ray]'",
            pytrace=False,
        )
    if ray.is_initialized():
        pytest.fail(
            "The ray_cluster fixture starts its own cluster, but Ray is already "
            "initialized in this process: call ray.shutdown() first.",
            pytrace=False,
        )
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": settings.head_cpus,
            "object_store_memory": settings.object_store,
        },
    )
    try:
        nodes = [
            cluster.add_node(num_cpus=settings.cpus, object_store_memory=settings.object_store)
            for _ in range(settings.workers)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False)
    except BaseException:
        ray.shutdown()
        cluster.shutdown()
        raise
    try:
        yield RayCluster(
            cluster=cluster,
            address=cluster.address,
            head_node_id=cluster.head_node.node_id,
            worker_node_ids=[node.node_id for node in nodes],
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
