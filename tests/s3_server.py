"""A local S3-compatible server (moto's) for the remote-storage tests.

It runs in a child process (``python s3_server.py``), so that the tests that patch OS
calls, fork or crash in the test process cannot disturb it. It listens on 127.0.0.1 only,
on a port the OS picks, prints that port, and serves until its standard input closes
(``S3Server.stop()``, or the test process ending whatever way it ends).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
BUCKET = "ckptable-tests"


def offline_aws_environment() -> dict[str, str]:
    """Environment variables that keep every AWS client local: fake credentials, a fixed
    region, no instance-metadata lookups, no user's config or credentials files."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@dataclasses.dataclass
class S3Server:
    """A running server; ``stop()`` ends it."""

    process: subprocess.Popen[str]
    host: str
    port: int

    @property
    def endpoint_url(self) -> str:
        """For boto3 and s3fs (``client_kwargs={"endpoint_url": ...}``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint_override(self) -> str:
        """For pyarrow (``endpoint_override=...``, with ``scheme="http"``)."""
        return f"{self.host}:{self.port}"

    def uri(self, key: str) -> str:
        """An ``s3://`` URI that pyarrow opens on this server (its query parameters)."""
        return f"s3://{key}?endpoint_override={self.endpoint_override}&scheme=http&region={REGION}"

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        client.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # the server's signal to end
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(timeout: float = 60.0) -> S3Server:
    """Start the server in a child process and wait until it listens."""
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **offline_aws_environment()},
    )
    assert process.stdout is not None
    try:
        line = _read_line(process, timeout)
        port = int(line)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return S3Server(process, "127.0.0.1", port)


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The child's first line (its port), or an error if it does not come in time."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"The S3 test server did not start within {timeout} s.")
    line = process.stdout.readline()
    if not line.strip():
        raise RuntimeError(f"The S3 test server exited (code {process.wait()}).")
    return line


def _serve() -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server: Any = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    try:
        sys.stdin.read()  # until the parent closes it or dies
    finally:
        server.stop()


if __name__ == "__main__":
    _serve()
