"""Remote storage: real round trips through S3 and fsspec filesystems.

Every entry point takes a local path, a URI or an explicit ``filesystem=`` (pyarrow's or
fsspec's). The S3 backends talk to a local moto server (``s3_server.py``); the memory
backends to fsspec's in-process memory filesystem. What is stored is checked through a
second client that is not ckptable's (boto3 for S3, the memory filesystem's own store).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from ckptable import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    get_checkpoint_info,
    verify_checkpoint,
)
from ckptable._manifest import MANIFEST_FILE
from ckptable._storage import FsspecStorage, LocalStorage, PyArrowStorage, resolve_storage
from s3_server import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, S3Server
from trees import Leaf, Model, Node, trained_model

#: Levels of ``trained_model()``: the model, layer0, layer1, optimizer, moments.
MODEL_LEVELS = 5


# --------------------------------------------------------------------------- backends


class S3Objects:
    """The bucket as boto3 sees it: the ground truth, independent of ckptable."""

    def __init__(self, server: S3Server) -> None:
        import boto3

        self.client = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def keys(self, prefix: str) -> list[str]:
        bucket, _, key = prefix.partition("/")
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=key + "/"
        )
        found = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        return sorted(k[len(key) + 1 :] for k in found)

    def get(self, path: str) -> bytes:
        bucket, _, key = path.partition("/")
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]

    def put(self, path: str, data: bytes) -> None:
        bucket, _, key = path.partition("/")
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, path: str) -> None:
        bucket, _, key = path.partition("/")
        self.client.delete_object(Bucket=bucket, Key=key)


class MemoryObjects:
    """fsspec's memory filesystem, read from its store directly."""

    def __init__(self) -> None:
        self.fs = MemoryFileSystem()

    def keys(self, prefix: str) -> list[str]:
        return sorted(p[len(prefix) + 1 :] for p in self.fs.store if p.startswith(prefix + "/"))

    def get(self, path: str) -> bytes:
        return bytes(self.fs.store[path].getvalue())

    def put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def delete(self, path: str) -> None:
        del self.fs.store[path]


@dataclasses.dataclass
class Backend:
    """One way to reach remote storage, and the objects it stores seen from outside."""

    name: str
    #: The test's own prefix, in the store's terms (``bucket/<uuid>`` or ``/<uuid>``).
    root: str
    #: ``filesystem=`` for every call (None: the path is a URI).
    filesystem: Any
    #: Store path → what the test passes as ``path``.
    to_path: Callable[[str], str]
    objects: S3Objects | MemoryObjects

    def at(self, *names: str) -> str:
        """Store path of ``names`` below the test's prefix."""
        return "/".join([self.root, *names])

    def path(self, *names: str) -> str:
        """What to pass as ``path`` for ``names`` below the test's prefix."""
        return self.to_path(self.at(*names))

    def files(self, *names: str) -> list[str]:
        """Files below ``names``, relative, as the store lists them (pyarrow's empty
        ``dir/`` marker objects left out: they are not files)."""
        return [k for k in self.objects.keys(self.at(*names)) if k and not k.endswith("/")]

    @property
    def kw(self) -> dict[str, Any]:
        return {"filesystem": self.filesystem}


S3_BACKENDS = ["pyarrow-s3", "pyarrow-s3-uri", "s3fs"]
MEMORY_BACKENDS = ["fsspec-memory", "fsspec-memory-uri"]


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"/{uuid.uuid4().hex}"
    yield root
    fs = MemoryFileSystem()
    for path in [p for p in fs.store if p.startswith(root + "/")]:
        del fs.store[path]
    fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if not d.startswith(root)]


def make_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    if name in MEMORY_BACKENDS:
        root = request.getfixturevalue("memory_root")
        if name == "fsspec-memory":
            return Backend(name, root, MemoryFileSystem(), str, MemoryObjects())
        return Backend(name, root, None, lambda p: "memory://" + p, MemoryObjects())
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = request.getfixturevalue("s3_prefix")
    objects = S3Objects(server)
    if name == "pyarrow-s3":
        return Backend(name, prefix, request.getfixturevalue("pyarrow_s3"), str, objects)
    if name == "pyarrow-s3-uri":
        return Backend(name, prefix, None, server.uri, objects)
    return Backend(name, prefix, request.getfixturevalue("s3fs_s3"), str, objects)


@pytest.fixture(params=S3_BACKENDS + MEMORY_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)


@pytest.fixture(params=S3_BACKENDS)
def s3_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)


# --------------------------------------------------------------------------- round trips


def test_a_whole_tree_round_trips(backend: Backend, states_equal: Any) -> None:
    model = trained_model()

    returned = model.save_to_path(backend.path("ckpt"), **backend.kw)

    assert returned == backend.path("ckpt")  # a URI comes back as given, query and all
    files = backend.files("ckpt")
    assert {"metadata.json", "class_and_ctor_args.pkl", "state.pkl", MANIFEST_FILE} <= set(files)
    assert "optimizer/moments/state.pkl" in files
    restored = Model.from_checkpoint(backend.path("ckpt"), **backend.kw)
    states_equal(restored.get_state(), model.get_state())
    fresh = Model()
    fresh.restore_from_path(backend.path("ckpt"), **backend.kw)
    states_equal(fresh.get_state(), model.get_state())


def test_a_component_restores_alone_from_its_own_directory(
    backend: Backend, states_equal: Any
) -> None:
    model = trained_model()
    model.save_to_path(backend.path("ckpt"), **backend.kw)
    fresh = Model()
    before = fresh.get_state()

    fresh.restore_from_path(backend.path("ckpt", "optimizer"), component="optimizer", **backend.kw)

    states_equal(fresh.optimizer.get_state(), model.optimizer.get_state())
    states_equal(fresh.layers["layer0"].get_state(), before["layer0"])  # untouched
    assert fresh.epoch == 0


def test_msgpack_checkpoints_restore_from_every_backend(
    backend: Backend, states_equal: Any
) -> None:
    """RLlib reads msgpack checkpoints from the local disk only; ckptable anywhere."""
    model = trained_model()

    model.save_to_path(backend.path("ckpt"), use_msgpack=True, **backend.kw)

    files = backend.files("ckpt")
    assert "state.msgpack" in files and "optimizer/moments/state.msgpack" in files
    assert not any(f.endswith("state.pkl") for f in files)
    states_equal(
        Model.from_checkpoint(backend.path("ckpt"), **backend.kw).get_state(), model.get_state()
    )
    assert get_checkpoint_info(backend.path("ckpt"), **backend.kw)["format"] == "msgpack"


def test_info_and_verify_read_remote_checkpoints(backend: Backend) -> None:
    trained_model().save_to_path(backend.path("ckpt"), **backend.kw)

    info = get_checkpoint_info(backend.path("ckpt"), **backend.kw)
    report = verify_checkpoint(backend.path("ckpt"), **backend.kw)

    assert info["class"] == "trees.Model"
    assert sorted(info["components"]) == ["layer0", "layer1", "optimizer"]
    assert info["components"]["optimizer"]["components"]["moments"]["class"] == "trees.Leaf"
    assert report.levels == MODEL_LEVELS and report.verified
    assert report.files == sum(1 for f in backend.files("ckpt") if not f.endswith(MANIFEST_FILE))
    assert report.bytes > 0


def test_verify_and_restore_catch_a_remote_file_changed_behind_their_back(
    backend: Backend,
) -> None:
    trained_model().save_to_path(backend.path("ckpt"), **backend.kw)
    state_file = backend.at("ckpt", "layer1", "state.pkl")
    data = bytearray(backend.objects.get(state_file))
    data[-3] ^= 0xFF  # same size, other bytes
    backend.objects.put(state_file, bytes(data))

    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(backend.path("ckpt"), **backend.kw)
    with pytest.raises(CorruptCheckpointError, match="layer1"):
        Model().restore_from_path(backend.path("ckpt"), **backend.kw)


def test_saving_over_a_remote_checkpoint_replaces_it_whole(backend: Backend) -> None:
    Node({"old": Leaf(), "kept": Leaf()}).save_to_path(
        backend.path("ckpt"), use_msgpack=True, **backend.kw
    )

    Node({"new": Leaf(), "kept": Leaf(3)}).save_to_path(backend.path("ckpt"), **backend.kw)

    level = ["class_and_ctor_args.pkl", "metadata.json", "state.pkl"]
    assert backend.files("ckpt") == sorted(
        [MANIFEST_FILE, *level]
        + [f"{comp}/{name}" for comp in ("kept", "new") for name in [MANIFEST_FILE, *level]]
    )
    # In place: nothing beside the checkpoint (no staging or old trees).
    assert {f.split("/")[0] for f in backend.files()} == {"ckpt"}
    restored = Node({"new": Leaf(), "kept": Leaf(3)})
    restored.restore_from_path(backend.path("ckpt"), **backend.kw)
    assert restored.children["kept"].size == 3


def test_a_remote_save_cut_off_before_its_root_manifest_is_refused(backend: Backend) -> None:
    """What a crash leaves on an object store: every level but no root manifest."""
    trained_model().save_to_path(backend.path("ckpt"), **backend.kw)
    backend.objects.delete(backend.at("ckpt", MANIFEST_FILE))

    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        Model().restore_from_path(backend.path("ckpt"), **backend.kw)
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        Model.from_checkpoint(backend.path("ckpt"), **backend.kw)
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        verify_checkpoint(backend.path("ckpt"), **backend.kw)


def test_a_missing_remote_checkpoint_is_not_found(backend: Backend) -> None:
    with pytest.raises(CheckpointNotFoundError):
        Model().restore_from_path(backend.path("nothing"), **backend.kw)
    with pytest.raises(CheckpointNotFoundError):
        get_checkpoint_info(backend.path("nothing"), **backend.kw)


class Hooked(Leaf):
    """Overrides ``save_to_path`` and ``restore_from_path`` as RLlib classes may, and
    records what it is given."""

    seen: list[tuple[str, Any, Any]] = []

    def save_to_path(self, path: Any = None, *, filesystem: Any = None, **kw: Any) -> str:
        Hooked.seen.append(("save", path, filesystem))
        return super().save_to_path(path, filesystem=filesystem, **kw)

    def restore_from_path(self, path: Any, *, filesystem: Any = None, **kw: Any) -> None:
        Hooked.seen.append(("restore", path, filesystem))
        super().restore_from_path(path, filesystem=filesystem, **kw)


def test_overriding_components_get_a_pyarrow_filesystem_and_paths_that_reach_the_store(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, states_equal: Any
) -> None:
    """A root with its own ``save_to_path`` is called with the path shown to users (for
    a URI with a query, the query too); components get a pyarrow filesystem, as from
    RLlib, even over an fsspec one."""
    monkeypatch.setattr(Hooked, "seen", [])
    root = Hooked(3)
    root.steps = 5
    tree = Node({"hooked": Hooked(2), "plain": Leaf()})
    tree.children["hooked"].steps = 8  # type: ignore[attr-defined]

    root.save_to_path(backend.path("root"), **backend.kw)
    tree.save_to_path(backend.path("tree"), **backend.kw)
    fresh_root, fresh_tree = Hooked(3), Node({"hooked": Hooked(2), "plain": Leaf()})
    fresh_root.restore_from_path(backend.path("root"), **backend.kw)
    fresh_tree.restore_from_path(backend.path("tree"), **backend.kw)

    assert fresh_root.steps == 5
    states_equal(fresh_tree.get_state(), tree.get_state())
    root_saves = [(path, fs) for op, path, fs in Hooked.seen if op == "save" and "root" in path]
    assert len(root_saves) == 1  # the override ran once, with a path into the same store
    expected = resolve_storage(backend.path("root"), backend.filesystem)[1]
    assert resolve_storage(*root_saves[0])[1] == expected
    component_calls = [(op, fs) for op, path, fs in Hooked.seen if "tree" in str(path)]
    assert [op for op, _ in component_calls] == ["save", "restore"]
    for _, fs in component_calls:
        assert isinstance(fs, pyarrow.fs.FileSystem)


def test_mixed_rllib_and_ckptable_trees_round_trip(backend: Backend) -> None:
    """RLlib's own code (the middle level) writes and reads through the filesystem it is
    handed: a pyarrow one, which wraps the fsspec filesystem where that is the backend."""
    import rllib_trees
    from helpers import assert_states_equal

    ns = rllib_trees.CK_RL_CK
    src = ns.Root()
    src.mutate(7)

    src.save_to_path(backend.path("ckpt"), **backend.kw)
    dst = ns.Root()
    dst.restore_from_path(backend.path("ckpt"), **backend.kw)

    assert "mid/leaf/state.pkl" in backend.files("ckpt")
    # What RLlib's code wrote inside a ckptable save was checksummed after it.
    assert verify_checkpoint(backend.path("ckpt"), **backend.kw).verified
    assert_states_equal(dst.get_state(), src.get_state(), same_types=True)


# --------------------------------------------------------------------------- S3 specifics


def test_another_writer_s_checkpoint_is_seen_despite_s3fs_listing_cache(
    s3_prefix: str, pyarrow_s3: Any, s3fs_s3: Any, states_equal: Any
) -> None:
    """A worker restores; another process saves a different tree over the checkpoint;
    the worker restores again and must see the new tree, not its cached listings."""
    Node({"old": Leaf()}).save_to_path(f"{s3_prefix}/ckpt", filesystem=s3fs_s3)
    Node({"old": Leaf()}).restore_from_path(f"{s3_prefix}/ckpt", filesystem=s3fs_s3)
    assert verify_checkpoint(f"{s3_prefix}/ckpt", filesystem=s3fs_s3).levels == 2

    newer = Node({"new": Leaf(3), "other": Leaf(2)})
    newer.save_to_path(f"{s3_prefix}/ckpt", filesystem=pyarrow_s3)

    fresh = Node({"new": Leaf(3), "other": Leaf(2)})
    fresh.restore_from_path(f"{s3_prefix}/ckpt", filesystem=s3fs_s3)
    states_equal(fresh.get_state(), newer.get_state())
    assert verify_checkpoint(f"{s3_prefix}/ckpt", filesystem=s3fs_s3).levels == 3


def test_s3fs_storage_never_creates_a_bucket(s3_server: S3Server, s3fs_s3: Any) -> None:
    """On a bucketed store a directory is a prefix with objects: making one is a no-op,
    and a save to a missing bucket fails instead of creating the bucket (fsspec's
    ``makedirs`` would)."""
    storage, path = resolve_storage(f"{BUCKET}/{uuid.uuid4().hex}/dir", s3fs_s3)
    storage.makedirs(path)
    assert storage.kind(path) is None  # no objects below it: no directory
    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"

    with pytest.raises(CheckpointError, match="failed"):
        Leaf().save_to_path(f"{missing}/ckpt", filesystem=s3fs_s3)

    buckets = S3Objects(s3_server).client.list_buckets()["Buckets"]
    assert missing not in {b["Name"] for b in buckets}


_CHILD = """
import pickle, sys, json
storage, path = pickle.load(sys.stdin.buffer)
from trees import Model
restored = Model.from_checkpoint(path, filesystem=storage.user_filesystem())
print(json.dumps({
    "type": type(storage).__name__,
    "epoch": restored.epoch,
    "moments": restored.optimizer.children["moments"].weights.tolist(),
    "metadata": json.loads(storage.read_bytes(storage.join(path, "metadata.json"))),
}))
"""


@pytest.mark.parametrize("name", ["pyarrow-s3", "pyarrow-s3-uri", "s3fs"])
def test_pickled_storages_restore_in_a_fresh_process(
    name: str, request: pytest.FixtureRequest
) -> None:
    """What a Ray actor gets: the storage and its filesystem, pickled, in a process
    with no instance caches and no open connections."""
    backend = make_backend(name, request)
    model = trained_model()
    model.save_to_path(backend.path("ckpt"), **backend.kw)
    storage, path = resolve_storage(backend.path("ckpt"), backend.filesystem)
    expected = "FsspecStorage" if name == "s3fs" else "PyArrowStorage"
    assert type(storage).__name__ == expected

    tests = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=pickle.dumps((storage, path)),
        capture_output=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
        },
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out["type"] == expected
    assert out["epoch"] == 9
    assert out["moments"] == model.optimizer.children["moments"].weights.tolist()
    assert out["metadata"]["ckptable"]["class"] == "trees.Model"


def test_an_fsspec_storage_pickles_to_a_working_copy(s3fs_s3: Any, s3_prefix: str) -> None:
    storage, path = resolve_storage(s3_prefix + "/f", s3fs_s3)
    storage.write_bytes(path, b"payload")
    type(s3fs_s3).clear_instance_cache()  # as in a new process: no instance to reuse
    try:
        copy = pickle.loads(pickle.dumps(storage))
    finally:
        type(s3fs_s3).clear_instance_cache()

    assert isinstance(copy, FsspecStorage) and copy.filesystem is not s3fs_s3
    assert copy.read_bytes(path) == b"payload"


# --------------------------------------------------------------------------- FsspecStorage


@pytest.fixture(params=["s3fs", "fsspec-memory"])
def fsspec_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)


def test_fsspec_storage_operations(fsspec_backend: Backend) -> None:
    storage, root = resolve_storage(fsspec_backend.at("t"), fsspec_backend.filesystem)
    assert isinstance(storage, FsspecStorage) and not storage.can_rename_dirs
    storage.makedirs(root)
    storage.mkdir(storage.join(root, "d"))
    storage.write_bytes(storage.join(root, "d", "a"), b"aaa")
    with storage.open_write(storage.join(root, "d", "e", "b")) as stream:
        stream.write(b"bb")

    assert storage.kind(root) == "dir" and storage.kind(storage.join(root, "d")) == "dir"
    assert storage.kind(storage.join(root, "d", "a")) == "file"
    assert storage.kind(storage.join(root, "nothing")) is None
    assert storage.listdir(storage.join(root, "d")) == {"a": "file", "e": "dir"}
    assert storage.size(storage.join(root, "d", "e", "b")) == 2
    with storage.open_read(storage.join(root, "d", "e", "b")) as stream:
        # Seekable, so an unsized read() is one request of the file's size, not many
        # small ones (pyarrow's open_input_stream reads 64 MiB from S3 in 14 s).
        assert stream.seekable()
        assert stream.read() == b"bb"
    with pytest.raises(NotADirectoryError):
        storage.listdir(storage.join(root, "d", "a"))
    with pytest.raises(FileNotFoundError):
        storage.listdir(storage.join(root, "nothing"))

    storage.rename(storage.join(root, "d", "a"), storage.join(root, "moved"))
    assert storage.read_bytes(storage.join(root, "moved")) == b"aaa"
    storage.remove_tree(storage.join(root, "d"))
    assert fsspec_backend.files("t") == ["moved"]
    assert storage.identity(root) is None and storage.lock_directory(root) is None
    assert storage.display(root).startswith(("s3://", "memory://"))
    assert resolve_storage(storage.display(root), fsspec_backend.filesystem)[1] == root


def test_resolve_storage_picks_the_storage_for_each_kind_of_filesystem(tmp_path: Path) -> None:
    memory = fsspec.filesystem("memory")
    wrapper = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(memory))

    by_fs, path = resolve_storage("memory://x/y", memory)
    by_uri, uri_path = resolve_storage("memory://x/y")
    wrapped, wrapped_path = resolve_storage("/x/y", wrapper)
    local, local_path = resolve_storage(str(tmp_path), LocalFileSystem())
    arrow_uri, arrow_path = resolve_storage("fsspec+memory://x/y")

    assert isinstance(by_fs, FsspecStorage) and path == "/x/y"
    assert isinstance(by_uri, FsspecStorage) and uri_path == "/x/y"
    assert by_uri.display(uri_path) == "memory:///x/y"
    assert isinstance(wrapped, FsspecStorage) and wrapped_path == "/x/y"
    assert wrapped.user_filesystem() is wrapper  # nested calls come back to the same store
    assert isinstance(arrow_uri, FsspecStorage) and arrow_path == "/x/y"
    assert isinstance(local, LocalStorage) and local_path == str(tmp_path)
    handed = by_fs.user_filesystem()
    assert isinstance(handed, pyarrow.fs.PyFileSystem) and handed.handler.fs is memory
    assert handed is by_fs.user_filesystem()


def test_pyarrow_s3_uris_keep_their_query_in_shown_paths(s3_server: S3Server) -> None:
    uri = s3_server.uri(f"{BUCKET}/a/b")

    storage, path = resolve_storage(uri)

    assert isinstance(storage, PyArrowStorage) and path == f"{BUCKET}/a/b"
    assert storage.display(storage.join(path, "c")) == s3_server.uri(f"{BUCKET}/a/b/c")
    again, again_path = resolve_storage(storage.display(path))
    assert again.user_filesystem().equals(storage.user_filesystem()) and again_path == path


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda p: Leaf().save_to_path(p),
        lambda p: Leaf().restore_from_path(p),
        lambda p: Leaf.from_checkpoint(p),
        lambda p: get_checkpoint_info(p),
        lambda p: verify_checkpoint(p),
    ],
    ids=["save_to_path", "restore_from_path", "from_checkpoint", "info", "verify"],
)
def test_an_unknown_uri_scheme_is_a_checkpoint_error_naming_the_uri(call: Any) -> None:
    with pytest.raises(CheckpointError, match="no-such-scheme://bucket/x") as info:
        call("no-such-scheme://bucket/x")
    assert "neither pyarrow nor fsspec" in str(info.value)


def block_imports(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_a_known_scheme_whose_package_is_missing_names_the_pip_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block_imports(monkeypatch, "ossfs")  # Alibaba OSS: fsspec knows it, pyarrow does not

    with pytest.raises(ImportError, match="pip install ossfs"):
        Leaf().save_to_path("oss://bucket/x")


def test_s3_without_pyarrow_and_s3fs_names_both_installs(monkeypatch: pytest.MonkeyPatch) -> None:
    block_imports(monkeypatch, "pyarrow.fs", "s3fs")

    with pytest.raises(ImportError, match="pip install s3fs") as info:
        Model.from_checkpoint("s3://bucket/x")
    assert "pyarrow" in str(info.value)


def test_uris_without_pyarrow_or_fsspec_name_the_cloud_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block_imports(monkeypatch, "pyarrow.fs", "fsspec", "fsspec.registry")

    with pytest.raises(ImportError, match=r"pip install 'ckptable\[cloud\]'"):
        verify_checkpoint("s3://bucket/x")


def test_a_scheme_only_fsspec_knows_without_fsspec_is_a_checkpoint_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block_imports(monkeypatch, "fsspec", "fsspec.registry")

    with pytest.raises(CheckpointError, match="fsspec") as info:
        Leaf().restore_from_path("memory://x/y")
    assert "memory://x/y" in str(info.value)


def test_s3_uris_without_pyarrow_go_through_s3fs(
    s3_server: S3Server,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    states_equal: Any,
) -> None:
    block_imports(monkeypatch, "pyarrow.fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # botocore's own variable
    uri = f"s3://{s3_prefix}/ckpt"
    model = trained_model()

    assert model.save_to_path(uri) == uri

    storage, _ = resolve_storage(uri)
    assert isinstance(storage, FsspecStorage)
    assert storage.user_filesystem() is storage.filesystem  # no pyarrow to wrap it in
    states_equal(Model.from_checkpoint(uri).get_state(), model.get_state())
    assert verify_checkpoint(uri).levels == MODEL_LEVELS
    assert "optimizer/moments/state.pkl" in S3Objects(s3_server).keys(f"{s3_prefix}/ckpt")


def test_a_filesystem_of_neither_library_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nor an fsspec filesystem"):
        Leaf().save_to_path(tmp_path, filesystem=object())
