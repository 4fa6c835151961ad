"""Node identity: Ray node ids, never IPs (all nodes of one machine share an IP)."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["current_node_id", "pinned_to"]


def current_node_id() -> str:
    """The Ray node id (hex) of the node this process runs on (driver, task or actor)."""
    return str(ray.get_runtime_context().get_node_id())


def pinned_to(node_id: str) -> Any:
    """A scheduling strategy that runs a task on ``node_id`` and nowhere else (it fails
    rather than run elsewhere if that node is gone)."""
    return NodeAffinitySchedulingStrategy(node_id, soft=False)
