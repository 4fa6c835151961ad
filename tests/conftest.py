"""Shared fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_states_equal
from s3_server import BUCKET, S3Server, offline_aws_environment

#: pytest's own plugin for testing plugins (tests/test_pytest_plugin.py).
pytest_plugins = ("pytester",)


@pytest.fixture
def states_equal() -> Any:
    """``assert_states_equal(actual, expected)``: numpy-aware deep equality."""
    return assert_states_equal


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A local S3-compatible server (moto's) with the bucket ``BUCKET``, for the session.

    The AWS variables it sets stay set for the rest of the session, so that no client
    made afterwards looks for real credentials or the instance-metadata service.
    """
    from s3_server import start_server

    with pytest.MonkeyPatch.context() as patch:
        for name, value in offline_aws_environment().items():
            patch.setenv(name, value)
        server = start_server()
        try:
            server.create_bucket(BUCKET)
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def pyarrow_s3(s3_server: S3Server) -> Any:
    """``pyarrow.fs.S3FileSystem`` on the test server."""
    return s3_server.pyarrow_filesystem()


@pytest.fixture(scope="session")
def s3fs_s3(s3_server: S3Server) -> Any:
    """``s3fs.S3FileSystem`` (fsspec) on the test server."""
    return s3_server.s3fs_filesystem()


#: The round-trip time of ``s3_latency_server``: a client and an S3 region close by.
LATENCY_RTT_MS = 20


@pytest.fixture(scope="session")
def s3_latency_server(s3_server: S3Server) -> Iterator[S3Server]:
    """The session's server behind a latency proxy (``latency_proxy.py``) that adds
    ``LATENCY_RTT_MS`` per round trip (and one round trip per new connection): the same
    bucket, objects and request counts as ``s3_server``, reached at another address."""
    view = s3_server.with_latency(LATENCY_RTT_MS)
    try:
        yield view
    finally:
        view.stop()


@pytest.fixture(scope="session")
def pyarrow_s3_latency(s3_latency_server: S3Server) -> Any:
    """``pyarrow.fs.S3FileSystem`` on the test server, through the latency proxy."""
    return s3_latency_server.pyarrow_filesystem()


@pytest.fixture(scope="session")
def s3fs_s3_latency(s3_latency_server: S3Server) -> Any:
    """``s3fs.S3FileSystem`` (fsspec) on the test server, through the latency proxy."""
    return s3_latency_server.s3fs_filesystem()


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh ``bucket/prefix`` no other test uses (the bucket lives for the session;
    the ``*_latency`` fixtures reach the same bucket)."""
    return f"{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real multi-node Ray cluster for the session (see ``tests/ray_cluster.py``):
    a CPU-less head (this process is its driver) and two one-CPU worker nodes."""
    from ray_cluster import start_cluster, stop_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


_MSGPACK_NAMES = (
    "Packer", "Unpacker", "load", "loads", "dump", "dumps", "pack", "packb", "unpack", "unpackb",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _msgpack_left_unpatched() -> Iterator[None]:
    """RLlib's msgpack checkpoints call ``msgpack_numpy.patch()``, which replaces msgpack's
    functions for the whole process (ckptable passes the hooks per call instead). Tests
    that run RLlib's msgpack path would leave the pytest process patched, and Ray then
    encodes what this driver sends to its workers with msgpack-numpy's hooks that the
    workers do not decode (a remote Learner got arrays of bytes). Each test gets msgpack
    back as it found it."""
    import msgpack  # (a dev dependency; imported here so that its originals are known)

    saved = {name: getattr(msgpack, name) for name in _MSGPACK_NAMES}
    yield
    for name, value in saved.items():
        setattr(msgpack, name, value)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs site built once with ``mkdocs build --strict`` (any warning fails the
    build), for tests/test_docs.py and tests/test_docs_browser.py."""
    import os
    import subprocess
    import sys

    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's notice only
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    return site_dir
