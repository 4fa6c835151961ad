"""Components held by Ray actors on other nodes, on a real multi-node cluster.

The cluster (tests/ray_cluster.py) has a CPU-less head, where this process is the driver,
and two worker nodes; all share one IP, so only node ids tell them apart. Actors are
pinned to nodes; their restored state is checked inside them.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

import ckptable
from ckptable.errors import ActorCheckpointError, TransferError
from ckptable.ray import LocalCopyTransfer, RecordingTransfer
from ray_actors import Algo, foreach, make_manager, make_runners
from ray_cluster import RayCluster

KINDS = ["ckptable", "rllib"]  # RayActorManager, RLlib's FaultTolerantActorManager


def temp_dirs_left() -> set[str]:
    """Temporary directories ckptable made on the nodes (all on this machine)."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ckptable-actor-*")))


@pytest.fixture
def algos() -> Iterator[list[Algo]]:
    """Algos the test makes; their actors are killed afterwards."""
    made: list[Algo] = []
    yield made
    for algo in made:
        algo.kill_actors()


def summaries(algo: Algo) -> list[dict[str, Any]]:
    return foreach(algo.runners, lambda actor: actor.summary())


def setup_runners(algo: Algo, counter: int, payload: Any = b"") -> None:
    """Give every actor a state of its own: counter + its seed, weights = seed."""
    foreach(
        algo.runners,
        lambda actor, c=counter, p=payload: actor.setup(
            c + actor.seed, p, np.full(4, float(actor.seed))
        ),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_actors_on_other_nodes_are_saved_and_restored(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path, kind: str
) -> None:
    worker_a, worker_b = ray_cluster.worker_node_ids
    algo = Algo(kind, (worker_a, worker_a, worker_b))
    algos.append(algo)
    algo.step, algo.local.value = 7, 70
    setup_runners(algo, 100, b"saved payload")
    before = temp_dirs_left()
    recorder = RecordingTransfer()

    algo.save_to_path(tmp_path / "ckpt", transfer=recorder)

    # The first healthy actor (seed 1, on worker a) saved, on its node; moved to the head.
    assert [(c.src_node_id, c.dst_node_id) for c in recorder.calls] == [
        (worker_a, ray_cluster.head_node_id)
    ]
    report = ckptable.verify_checkpoint(tmp_path / "ckpt")
    assert report.verified and report.levels == 4  # root, runners, runners/module, local
    info = ckptable.get_checkpoint_info(tmp_path / "ckpt")
    assert info["components"]["runners"]["class"].endswith("ray_actors.Runner")
    assert temp_dirs_left() == before

    setup_runners(algo, 0, b"changed")
    algo.step, algo.local.value = 0, 0
    recorder.calls.clear()

    algo.restore_from_path(tmp_path / "ckpt", transfer=recorder)

    # One move per node that holds actors (worker a holds two), none for the head.
    assert sorted((c.src_node_id, c.dst_node_id) for c in recorder.calls) == sorted(
        [(ray_cluster.head_node_id, worker_a), (ray_cluster.head_node_id, worker_b)]
    )
    for summary in summaries(algo):
        # Every actor holds the saved actor's state, its sub-component included.
        assert summary["counter"] == 101
        assert summary["payload_head"] == b"saved payload"
        assert summary["weights"] == [1.0] * 4
    assert {s["node"] for s in summaries(algo)} == {worker_a, worker_b}
    assert (algo.step, algo.local.value) == (7, 70)
    assert temp_dirs_left() == before


@pytest.mark.parametrize("kind", KINDS)
def test_from_checkpoint_builds_the_actors_and_restores_them(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path, kind: str
) -> None:
    nodes = tuple(ray_cluster.worker_node_ids)
    algo = Algo(kind, nodes)
    algos.append(algo)
    setup_runners(algo, 40)
    algo.save_to_path(tmp_path / "ckpt")

    restored = Algo.from_checkpoint(tmp_path / "ckpt")
    algos.append(restored)

    assert [s["counter"] for s in summaries(restored)] == [41, 41]
    assert [s["node"] for s in summaries(restored)] == list(nodes)


def test_an_actor_on_the_saving_node_writes_in_place(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path
) -> None:
    algo = Algo("ckptable", (ray_cluster.head_node_id, ray_cluster.worker_node_ids[0]))
    algos.append(algo)
    setup_runners(algo, 5)
    recorder = RecordingTransfer()

    algo.save_to_path(tmp_path / "ckpt", transfer=recorder)
    assert recorder.calls == []  # the first actor runs on the head, where the driver is
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no private directory left
    algo.restore_from_path(tmp_path / "ckpt", transfer=recorder)
    assert [(c.dst_node_id) for c in recorder.calls] == [ray_cluster.worker_node_ids[0]]
    assert [s["counter"] for s in summaries(algo)] == [6, 6]


@pytest.mark.parametrize("kind", KINDS)
def test_a_chosen_actor_that_is_dead_is_replaced_by_the_next(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path, kind: str
) -> None:
    worker_a, worker_b = ray_cluster.worker_node_ids
    algo = Algo(kind, (worker_a, worker_b))
    algos.append(algo)
    setup_runners(algo, 10)
    first = next(iter(_handles(algo)))
    ray.kill(first)  # its manager still counts it healthy

    algo.save_to_path(tmp_path / "ckpt")

    assert algo.runners.healthy_actor_ids() == [_ids(algo)[1]]  # marked unhealthy
    probe = Algo(kind, (worker_b,))
    algos.append(probe)
    probe.restore_from_path(tmp_path / "ckpt")
    assert summaries(probe)[0]["counter"] == 12  # the second actor's (seed 2) state


@pytest.mark.parametrize("fault", ["kill", "raise"])
def test_an_actor_that_dies_or_fails_during_its_save_is_replaced(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path, fault: str
) -> None:
    worker_a, worker_b = ray_cluster.worker_node_ids
    algo = Algo("ckptable", (worker_a, worker_b))
    algos.append(algo)
    setup_runners(algo, 20)
    algo.runners.foreach_actor(
        lambda actor, f=fault: setattr(actor, "fault", f) if actor.seed == 1 else None
    )
    before = temp_dirs_left()

    algo.save_to_path(tmp_path / "ckpt")

    assert temp_dirs_left() == before  # the first actor's temporary directory too
    probe = Algo("ckptable", (worker_a,))
    algos.append(probe)
    probe.restore_from_path(tmp_path / "ckpt")
    assert summaries(probe)[0]["counter"] == 22


@pytest.mark.parametrize("kind", KINDS)
def test_no_healthy_actor_fails_the_save_and_publishes_nothing(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path, kind: str
) -> None:
    algo = Algo(kind, tuple(ray_cluster.worker_node_ids))
    algos.append(algo)
    setup_runners(algo, 1)
    algo.save_to_path(tmp_path / "ckpt")
    old = ckptable.verify_checkpoint(tmp_path / "ckpt")
    algo.kill_actors()

    with pytest.raises(ActorCheckpointError) as raised:
        algo.save_to_path(tmp_path / "ckpt")
    # Every actor was tried and is named with its reason; the component is named.
    assert raised.value.component == "runners"
    assert "'runners'" in str(raised.value)
    assert str(raised.value).count("the actor died") == 2

    with pytest.raises(ActorCheckpointError, match="no healthy actor"):
        algo.save_to_path(tmp_path / "ckpt")  # all are marked unhealthy now
    assert ckptable.verify_checkpoint(tmp_path / "ckpt") == old  # the old one, whole
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("kind", KINDS)
def test_actors_that_fail_to_restore_are_listed_or_marked_unhealthy(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path, kind: str
) -> None:
    worker_a, worker_b = ray_cluster.worker_node_ids
    algo = Algo(kind, (worker_a, worker_b, worker_b))
    algos.append(algo)
    setup_runners(algo, 30)
    algo.step = 3
    algo.save_to_path(tmp_path / "ckpt")
    setup_runners(algo, 0)
    algo.step = 0
    ids = _ids(algo)
    algo.runners.foreach_actor(
        lambda actor: setattr(actor, "fault", "raise_on_restore") if actor.seed == 2 else None
    )
    ray.kill(_handles(algo)[2])

    with pytest.raises(ActorCheckpointError) as raised:
        algo.restore_from_path(tmp_path / "ckpt")
    message = str(raised.value)
    # The actor's set_state raised: named as such, with the user's exception.
    assert f"actor {ids[1]}: SetStateError: " in message
    assert "RuntimeError: injected failure in actor 2" in message
    assert f"actor {ids[2]}: the actor died" in message
    assert f"actor {ids[0]}" not in message
    assert "2 of 3" in message
    # The healthy actor was restored; the local objects were not touched (actors first).
    assert [s["counter"] for s in summaries(algo) if s["counter"] == 31] == [31]
    assert algo.step == 0

    # Asked to, the restore marks failed actors unhealthy and goes on.
    algo.runners.foreach_actor(lambda actor: setattr(actor, "fault", "raise_on_restore"))
    algo.restore_from_path(tmp_path / "ckpt", on_actor_failure="mark_unhealthy")
    assert algo.runners.healthy_actor_ids() == []
    assert algo.step == 3


def test_one_component_of_the_actors_alone(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path
) -> None:
    algo = Algo("ckptable", tuple(ray_cluster.worker_node_ids))
    algos.append(algo)
    setup_runners(algo, 50)
    algo.save_to_path(tmp_path / "ckpt")
    setup_runners(algo, 0)  # weights = seed, counter = seed
    foreach(algo.runners, lambda actor: actor.setup(-1, b"", np.zeros(4)))

    # "runners/module": every actor restores its module alone, from the module's own
    # directory (RLlib's convention for component=).
    algo.restore_from_path(tmp_path / "ckpt" / "runners" / "module", component="runners/module")

    for summary in summaries(algo):
        assert summary["weights"] == [1.0] * 4
        assert summary["counter"] == -1


def test_a_custom_transfer_hook_is_used_per_call_and_by_default(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path
) -> None:
    """Nodes that share a filesystem (here: one machine) can move directories with a
    plain copy; the hook set as default is used when no call names one."""
    algo = Algo("ckptable", tuple(ray_cluster.worker_node_ids))
    algos.append(algo)
    setup_runners(algo, 60)
    recorder = RecordingTransfer(LocalCopyTransfer())
    previous = ckptable.ray.get_default_transfer()
    ckptable.ray.set_default_transfer(recorder)
    try:
        algo.save_to_path(tmp_path / "ckpt")
        algo.restore_from_path(tmp_path / "ckpt")
    finally:
        ckptable.ray.set_default_transfer(previous)
    assert len(recorder.calls) == 3  # one in, one out to each worker node
    assert [s["counter"] for s in summaries(algo)] == [61, 61]

    with pytest.raises(TypeError):
        algo.save_to_path(tmp_path / "other", transfer=object())


def test_a_transfer_that_breaks_fails_over_and_finally_fails_the_save(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path
) -> None:
    algo = Algo("ckptable", tuple(ray_cluster.worker_node_ids))
    algos.append(algo)
    setup_runners(algo, 1)
    broken = RecordingTransfer(fail=OSError("link down"))
    before = temp_dirs_left()

    with pytest.raises(ActorCheckpointError, match="link down") as raised:
        algo.save_to_path(tmp_path / "ckpt", transfer=broken)

    assert len(broken.calls) == 2  # each actor was tried
    assert isinstance(raised.value, ckptable.CheckpointError)
    assert not (tmp_path / "ckpt").exists() and os.listdir(tmp_path) == []
    assert temp_dirs_left() == before
    assert issubclass(TransferError, ckptable.CheckpointError)


def _handles(algo: Algo) -> list[Any]:
    actors = algo.runners.actors
    actors = actors() if callable(actors) else actors
    return [actors[i] for i in sorted(actors)]


def _ids(algo: Algo) -> list[int]:
    actors = algo.runners.actors
    actors = actors() if callable(actors) else actors
    return sorted(actors)


def test_rllib_actors_are_saved_by_rllib_code_and_sealed(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """An actor written for RLlib saves with RLlib's code; ckptable checksums its files
    into the manifests, and restores them into every actor."""
    actors = make_runners(list(ray_cluster.worker_node_ids), rllib_actor=True)
    try:
        manager = make_manager("rllib", actors)
        holder = _Holder(manager)
        foreach(manager, lambda actor: setattr(actor, "counter", 9))
        holder.save_to_path(tmp_path / "ckpt")
        assert ckptable.verify_checkpoint(tmp_path / "ckpt").verified
        foreach(manager, lambda actor: setattr(actor, "counter", 0))
        holder.restore_from_path(tmp_path / "ckpt")
        assert foreach(manager, lambda actor: actor.counter) == [9, 9]
        with pytest.raises(ActorCheckpointError, match="safe=True"):
            holder.restore_from_path(tmp_path / "ckpt", safe=True)
    finally:
        for actor in actors:
            ray.kill(actor)


class _Holder(ckptable.Checkpointable):
    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return {}

    def set_state(self, state: Any) -> None:
        pass

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return [("runners", self.manager)]

    def get_ctor_args_and_kwargs(self) -> Any:
        return (), {}


@pytest.mark.parametrize("backend", ["pyarrow_s3", "s3fs_s3"])
def test_on_shared_storage_the_actors_write_and_read_it_directly(
    ray_cluster: RayCluster,
    algos: list[Algo],
    s3_prefix: str,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    filesystem = request.getfixturevalue(backend)
    algo = Algo("ckptable", tuple(ray_cluster.worker_node_ids))
    algos.append(algo)
    setup_runners(algo, 70, b"on s3")
    recorder = RecordingTransfer()
    path = f"{s3_prefix}/ckpt"

    algo.save_to_path(path, filesystem=filesystem, transfer=recorder)
    assert ckptable.verify_checkpoint(path, filesystem=filesystem).levels == 4
    setup_runners(algo, 0)
    algo.restore_from_path(path, filesystem=filesystem, transfer=recorder)

    assert recorder.calls == []  # nothing moved between nodes
    assert [(s["counter"], s["payload_head"]) for s in summaries(algo)] == [(71, b"on s3")] * 2


def test_a_component_of_over_a_gib_moves_between_nodes_in_bounded_memory(
    ray_cluster: RayCluster, algos: list[Algo], tmp_path: Path
) -> None:
    """Saved from a worker node to the driver's node and restored onto both worker
    nodes, through the default hook: no size limit (RLlib refuses 1 GiB), and the object
    stores (256 MiB each) never hold more than a few chunks of it."""
    from ray_cluster import ObjectStoreSampler, peak_rss_increase, reset_peak_rss

    worker_a, worker_b = ray_cluster.worker_node_ids
    nodes = [ray_cluster.head_node_id, worker_a, worker_b]
    algo = Algo("ckptable", (worker_a, worker_b))
    algos.append(algo)
    size = (1 << 30) + (64 << 20) + 12_345
    digest = foreach(algo.runners, lambda actor, n=size: actor.fill_payload(n))[0]
    hook = ckptable.ray.RayObjectStoreTransfer()
    bound = (hook.max_chunks_in_flight + 3) * hook.chunk_bytes + (8 << 20)
    figures = []

    for step in ("save", "restore"):
        baseline = reset_peak_rss()
        with ObjectStoreSampler(nodes) as store:
            if step == "save":
                algo.save_to_path(tmp_path / "ckpt", transfer=hook)
                foreach(algo.runners, lambda actor: actor.setup(0, b""))
            else:
                algo.restore_from_path(tmp_path / "ckpt", transfer=hook)
        driver = peak_rss_increase(baseline)
        figures.append(
            f"{step}: driver peak RSS +{driver / 2**20:.0f} MiB; object store peaks "
            + ", ".join(f"{store.peak_bytes[n] / 2**20:.0f} MiB" for n in nodes)
        )
        for node in nodes:
            assert store.peak_bytes[node] < bound, figures
        assert driver < 256 << 20, figures  # the driver never holds the component

    assert (tmp_path / "ckpt" / "runners" / "state.pkl").stat().st_size > size
    assert foreach(algo.runners, lambda actor: actor.payload_digest()) == [digest, digest]
    print("\n".join(figures))
