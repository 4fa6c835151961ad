"""ckptable's pytest plugin, run inside pytest sessions of its own (``pytester``).

The plugin is found through its ``pytest11`` entry point, as in any project that installs
ckptable: the inner sessions have no conftest that loads it.
"""

from __future__ import annotations

import textwrap

# Inline runs (``pytester.runpytest``) drop the modules they imported when they end, and
# numpy cannot be imported twice in one process: import it here, outside them.
import numpy  # noqa: F401
import pytest

#: A small checkpointable tree for the inner test files. ``forget`` names a key that
#: ``set_state`` drops, the bug ``ckpt_roundtrip`` exists to catch.
CLASSES = textwrap.dedent(
    """
    import numpy as np
    from ckptable import Checkpointable

    class Module(Checkpointable):
        def __init__(self, forget=None):
            self.forget = forget
            self.weights = np.zeros(4, dtype=np.float32)
            self.optimizer = {"lr": 0.1, "moments": (0.9, 0.99)}

        def get_state(self, components=None, *, not_components=None, **kwargs):
            return {"weights": self.weights.copy(), "optimizer": dict(self.optimizer)}

        def set_state(self, state):
            self.weights = np.array(state["weights"])
            if self.forget != "optimizer":
                self.optimizer = dict(state["optimizer"])

        def get_ctor_args_and_kwargs(self):
            return (), {"forget": self.forget}

    class Learner(Checkpointable):
        def __init__(self, forget=None):
            self.forget = forget
            self.module = Module(forget)
            self.updates = 0

        def get_checkpointable_components(self):
            return [("module", self.module)]

        def get_state(self, components=None, *, not_components=None, **kwargs):
            return {"updates": self.updates, "module": self.module.get_state()}

        def set_state(self, state):
            self.updates = state.get("updates", self.updates)
            if "module" in state:
                self.module.set_state(state["module"])

        def get_ctor_args_and_kwargs(self):
            return (), {"forget": self.forget}

    def trained(forget=None):
        learner = Learner(forget)
        learner.updates = 12
        learner.module.weights[:] = [1, 2, 3, 4]
        learner.module.optimizer = {"lr": 0.01, "moments": (0.5, 0.75)}
        return learner
    """
)


def test_ckpt_dir_is_a_fresh_empty_directory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pathlib

            seen = []

            def test_first(ckpt_dir, tmp_path):
                assert isinstance(ckpt_dir, pathlib.Path)
                assert ckpt_dir.is_dir() and not any(ckpt_dir.iterdir())
                assert tmp_path in ckpt_dir.parents
                seen.append(ckpt_dir)

            def test_second(ckpt_dir):
                assert ckpt_dir.is_dir() and not any(ckpt_dir.iterdir())
                assert ckpt_dir != seen[0]
            """
        )
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_ckpt_dir_takes_a_checkpoint(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        CLASSES
        + textwrap.dedent(
            """
            def test_save(ckpt_dir):
                path = trained().save_to_path(ckpt_dir)
                assert Learner.from_checkpoint(path).updates == 12
                assert (ckpt_dir / "module" / "state.pkl").is_file()
            """
        )
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_ckpt_roundtrip_passes_for_a_correct_class(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        CLASSES
        + textwrap.dedent(
            """
            def test_roundtrip(ckpt_roundtrip):
                original = trained()
                new = ckpt_roundtrip(original)
                assert new is not original
                assert new.updates == 12
                assert new.module.weights.tolist() == [1, 2, 3, 4]

            def test_every_call_saves_into_a_new_directory(ckpt_roundtrip, tmp_path):
                ckpt_roundtrip(trained())
                ckpt_roundtrip(trained())
                first, second = ckpt_roundtrip.paths
                assert first != second
                assert tmp_path in first.parents and (first / "state.pkl").is_file()
                assert (second / "module" / "state.pkl").is_file()
            """
        )
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_ckpt_roundtrip_fails_naming_the_lost_key(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        CLASSES
        + textwrap.dedent(
            """
            def test_roundtrip(ckpt_roundtrip):
                ckpt_roundtrip(trained(forget="optimizer"))
            """
        )
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert (
        "AssertionError: Roundtrip of test_ckpt_roundtrip_fails_naming_the_lost_key.Learner"
        in output
    )
    assert "(format: default): the restored state is not the saved one." in output
    assert "E       state differs from the expected state in 3 places:" in output
    assert "E         state['module']['optimizer']['lr']: 0.1 != 0.01 (abs diff 0.09)" in output
    assert "E         state['module']['optimizer']['moments'][0]: 0.9 != 0.5" in output


def test_ckpt_roundtrip_in_msgpack(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        CLASSES
        + textwrap.dedent(
            """
            import pytest

            def test_msgpack(ckpt_roundtrip):
                new = ckpt_roundtrip(trained(), format="msgpack")
                assert (ckpt_roundtrip.paths[0] / "module" / "state.msgpack").is_file()
                assert new.module.optimizer["moments"] == [0.5, 0.75]

            def test_msgpack_same_types(ckpt_roundtrip):
                ckpt_roundtrip(trained(), format="msgpack", same_types=True)
            """
        )
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert "E         state['module']['optimizer']['moments']: type list != tuple" in output


def test_ckpt_roundtrip_of_one_component(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        CLASSES
        + textwrap.dedent(
            """
            def test_module_alone(ckpt_roundtrip):
                new = ckpt_roundtrip(trained(), components="module")
                assert new.module.weights.tolist() == [1, 2, 3, 4]
                assert new.updates == 0  # the learner's own state stays as built

            def test_module_alone_forgetting(ckpt_roundtrip):
                ckpt_roundtrip(trained(forget="optimizer"), components=["module"])
            """
        )
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert "(format: default, components: module): the restored state is not" in output
    assert "E       state['module'] differs from the expected state in 3 places:" in output
    assert "E         state['module']['optimizer']['lr']: 0.1 != 0.01 (abs diff 0.09)" in output


def test_loading_the_plugin_imports_neither_ray_nor_numpy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import sys

            def test_modules(request):
                assert request.config.pluginmanager.has_plugin("ckptable")
                assert "ckptable.pytest_plugin" in sys.modules
                heavy = {"ray", "numpy", "ckptable.testing"} & set(sys.modules)
                assert not heavy, heavy
            """
        )
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_bad_ray_settings_stop_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--ckptable-ray-workers=two")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--ckptable-ray-workers (ini ckptable_ray_workers) must be a whole number*'two'*"]
    )
    pytester.makeini("[pytest]\nckptable_ray_object_store = lots\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ckptable_ray_object_store) must be a size in bytes*'lots'*"])


def test_ray_cluster_without_ray_says_what_to_install(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("import sys\nsys.modules['ray'] = None  # as if Ray were missing\n")
    pytester.makepyfile("def test_needs_ray(ray_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*The ray_cluster fixture needs Ray*pip install 'ckptable?ray?'*"])


def test_ray_cluster_refuses_to_replace_a_running_ray(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import ray\nray.is_initialized = lambda: True  # as if the session had called ray.init()\n"
    )
    pytester.makepyfile("def test_needs_ray(ray_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Ray is already initialized*call ray.shutdown() first*"])


def test_ray_cluster_is_a_real_multi_node_cluster(pytester: pytest.Pytester) -> None:
    # One real cluster, set up by options: 2 workers of 2 CPUs, 200 MiB object stores.
    pytester.makeini("[pytest]\nckptable_ray_object_store = 200MiB\n")
    pytester.makeconftest(
        textwrap.dedent(
            """
            import json
            import pathlib

            import ray

            seen = {}

            def pytest_sessionfinish(session):
                cluster = seen.get("cluster")
                report = {
                    "ray_initialized": ray.is_initialized(),
                    "nodes_left": None if cluster is None else len(cluster.list_all_nodes()),
                }
                pathlib.Path("after_session.json").write_text(json.dumps(report))
            """
        )
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            import ray
            from conftest import seen

            @ray.remote(num_cpus=1)
            class WhereAmI:  # defined in the test module: the workers must import it
                def node_id(self):
                    return ray.get_runtime_context().get_node_id()

            def test_one_actor_on_each_worker_node(ray_cluster):
                seen["cluster"] = ray_cluster.cluster
                workers = ray_cluster.worker_node_ids
                assert len(workers) == 2 and len(set(workers)) == 2
                assert ray_cluster.head_node_id not in workers
                assert ray.get_runtime_context().get_node_id() == ray_cluster.head_node_id
                actors = [
                    WhereAmI.options(scheduling_strategy=ray_cluster.on_node(node)).remote()
                    for node in workers
                ]
                assert ray.get([actor.node_id.remote() for actor in actors]) == workers

            def test_nodes_as_configured(ray_cluster):
                nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
                assert set(nodes) == {ray_cluster.head_node_id, *ray_cluster.worker_node_ids}
                assert nodes[ray_cluster.head_node_id]["Resources"].get("CPU", 0) == 0
                for node in ray_cluster.worker_node_ids:
                    assert nodes[node]["Resources"]["CPU"] == 2
                for node in nodes.values():
                    assert node["Resources"]["object_store_memory"] == 200 * 2**20
            """
        )
    )
    result = pytester.runpytest_subprocess("--ckptable-ray-cpus=2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    after = (pytester.path / "after_session.json").read_text()
    assert after == '{"ray_initialized": false, "nodes_left": 0}'
