"""Tune's and Trainable's paths with RLlib on ckptable: ``algo.save()`` /
``algo.restore()``, and a ``tune.Tuner(PPO, ...)`` run interrupted and resumed with
``Tuner.restore``, on local storage and on the S3 server. The trials run in Ray workers
of a job that ``ckptable.rllib.enable()`` set up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest

import ckptable
import ckptable.rllib
from ckptable._manifest import MANIFEST_FILE
from rllib_ppo import fail_once_at_iteration, ray_job, tiny_ppo_config, weights

pytestmark = pytest.mark.rllib


@pytest.fixture
def rllib_job(ray_cluster: Any) -> Iterator[None]:
    ckptable.rllib.disable()
    with ray_job(ray_cluster, enabled=True):
        yield


def test_trainable_save_and_restore_write_and_read_ckptable_checkpoints(
    rllib_job: None, states_equal: Any
) -> None:
    config = tiny_ppo_config()
    algo = config.build_algo()
    try:
        algo.train()
        checkpoint = algo.save()  # Trainable's path: save_checkpoint -> save_to_path
        path = checkpoint.checkpoint.path
        assert (Path(path) / MANIFEST_FILE).is_file()
        ckptable.verify_checkpoint(path)
        trained = weights(algo)
        algo.train()
        algo.restore(checkpoint.checkpoint)  # load_checkpoint -> restore_from_path
        states_equal(weights(algo), trained)
        assert algo.iteration == 1
    finally:
        algo.stop()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_interrupted_tuner_run_resumes_from_its_ckptable_checkpoint(
    where: str, rllib_job: None, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from ray import tune
    from ray.rllib.algorithms.ppo import PPO

    if where == "s3":
        filesystem = request.getfixturevalue("pyarrow_s3")
        storage = request.getfixturevalue("s3_prefix")
    else:
        filesystem, storage = None, str(tmp_path / "results")
    marker = tmp_path / "interrupted"
    config = tiny_ppo_config().callbacks(fail_once_at_iteration(2, str(marker)))
    run_config = tune.RunConfig(
        name="ppo",
        storage_path=storage,
        storage_filesystem=filesystem,
        stop={"training_iteration": 3},
        checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1),
        verbose=0,
    )
    first = tune.Tuner(PPO, param_space=config, run_config=run_config).fit()
    assert marker.exists() and first[0].error is not None

    experiment = f"{storage}/ppo"
    resumed = tune.Tuner.restore(
        experiment, trainable=PPO, resume_errored=True, storage_filesystem=filesystem
    ).fit()
    result = resumed[0]
    assert result.error is None
    assert result.metrics["training_iteration"] == 3
    assert result.metrics["iterations_since_restore"] == 2  # resumed at iteration 1
    checkpoint = result.checkpoint
    assert checkpoint is not None
    assert ckptable.verify_checkpoint(checkpoint.path, filesystem=checkpoint.filesystem).levels > 1
    listing = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(checkpoint.path))
    assert MANIFEST_FILE in {info.base_name for info in listing}
