"""A local S3-compatible server (moto's) for the remote-storage tests.

It runs in a child process (``python s3_server.py``), so that the tests that patch OS
calls, fork or crash in the test process cannot disturb it. It listens on 127.0.0.1 only,
on a port the OS picks, prints that port, and serves until its standard input closes
(``S3Server.stop()``, or the test process ending whatever way it ends).

It counts the requests it receives, by kind (``KINDS``; see ``classify``):
``S3Server.counts()`` and ``S3Server.reset_counts()`` read and reset them through two
paths the server answers itself (``GET /__counts__``, ``POST /__counts__/reset``), which
are not counted. ``S3Server.with_latency(rtt_ms)`` gives a view of the same server
behind a latency proxy (``latency_proxy.py``), sharing its counts.

Connections stay open between requests, as on S3 (moto's own werkzeug server closes each
one after its response, which behind a proxy charges every request a new connection);
``start_server(keep_alive=False)`` serves as moto does.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from latency_proxy import Proxy, first_line, start_proxy

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
BUCKET = "ckptable-tests"

#: The kinds of requests counted, in report order.
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE", "OTHER")
#: The paths the counting layer answers itself (bucket names cannot hold ``_``).
COUNTS_PATH = "/__counts__"
RESET_PATH = "/__counts__/reset"
#: Requests kept for ``requests()`` (the oldest are dropped beyond this).
REQUEST_LOG_SIZE = 100_000


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


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the server received: its kind (``KINDS``), the S3 action it is (as
    S3's API names it: ``PutObject``, ``UploadPart``, ``DeleteObjects``...), the HTTP
    method, the path and query as sent, and for ``DeleteObjects`` the number of keys."""

    kind: str
    action: str
    method: str
    path: str
    keys: int = 0


@dataclasses.dataclass
class S3Server:
    """A running server; ``stop()`` ends it.

    A view made by ``with_latency`` has the proxy's address as ``host:port`` (what the
    clients connect to) and ``proxy`` set; its ``stop()`` ends only the proxy. Counts are
    read from the server itself (``server_port``), never through a proxy.
    """

    process: subprocess.Popen[str]
    host: str
    port: int
    #: The server's own port (the same as ``port`` unless this is a view via a proxy).
    server_port: int = 0
    proxy: Proxy | None = None

    def __post_init__(self) -> None:
        if not self.server_port:
            self.server_port = self.port

    @property
    def endpoint_url(self) -> str:
        """For boto3 and s3fs (``client_kwargs={"endpoint_url": ...}``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint_override(self) -> str:
        """For pyarrow (``endpoint_override=...``, with ``scheme="http"``)."""
        return f"{self.host}:{self.port}"

    @property
    def rtt_ms(self) -> float:
        """The round-trip time the proxy adds (0: the server itself)."""
        return self.proxy.rtt_ms if self.proxy is not None else 0.0

    def uri(self, key: str) -> str:
        """An ``s3://`` URI that pyarrow opens on this server (its query parameters)."""
        return f"s3://{key}?endpoint_override={self.endpoint_override}&scheme=http&region={REGION}"

    def boto3_client(self, **config: Any) -> Any:
        """A boto3 S3 client of this endpoint; ``config``: ``botocore.config.Config``'s
        arguments (``max_pool_connections=...``)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=botocore.config.Config(**config) if config else None,
        )

    def create_bucket(self, name: str) -> None:
        self.boto3_client().create_bucket(Bucket=name)

    def pyarrow_filesystem(self, **options: Any) -> Any:
        """``pyarrow.fs.S3FileSystem`` on this endpoint; ``options``: its other arguments."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            endpoint_override=self.endpoint_override,
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            **options,
        )

    def s3fs_filesystem(self, **options: Any) -> Any:
        """``s3fs.S3FileSystem`` (fsspec) on this endpoint; ``options``: its other
        arguments (``config_kwargs={"max_pool_connections": 64}``...)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint_url, "region_name": REGION},
            **options,
        )

    def obstore_store(self, bucket: str) -> Any:
        """``obstore.store.S3Store`` of ``bucket`` on this endpoint (the benchmark's plain
        obstore baselines; ``pip install obstore``)."""
        from obstore.store import S3Store

        return S3Store(bucket, **self._obstore_options())

    def obstore_filesystem(self) -> Any:
        """obstore's fsspec adapter (``obstore.fsspec.FsspecStore``) on this endpoint:
        ``bucket/key`` paths, as s3fs's."""
        from obstore.fsspec import FsspecStore

        return FsspecStore("s3", **self._obstore_options())

    def _obstore_options(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint_url,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": REGION,
            "client_options": {"allow_http": True},
        }

    # ------------------------------------------------------------------ request counts

    def counts(self, detail: bool = False) -> dict[str, int]:
        """Requests received since the start or the last ``reset_counts()``, by kind:
        every key of ``KINDS``, zeros included. ``detail=True`` adds one ``KIND/Action``
        key per S3 action seen (``"PUT/UploadPart"``) and ``"DELETE/keys"``, the keys
        that bulk deletes (``DeleteObjects``) named."""
        data = self._control("GET", COUNTS_PATH)
        out = dict(data["counts"])
        if detail:
            out.update(data["actions"])
            out["DELETE/keys"] = data["deleted_keys"]
        return out

    def requests(self) -> list[Request]:
        """The requests behind ``counts()``, in the order received (for debugging)."""
        data = self._control("GET", COUNTS_PATH + "?detail=1")
        return [Request(**fields) for fields in data["requests"]]

    def reset_counts(self) -> None:
        """Start counting from zero (counts and the request log)."""
        self._control("POST", RESET_PATH)

    def _control(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server_port}{path}",
            method=method,
            data=b"" if method == "POST" else None,
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
        with opener.open(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    # ------------------------------------------------------------------ latency

    def with_latency(self, rtt_ms: float = 20, *, handshake_rtts: float = 1) -> S3Server:
        """A view of this server behind a new latency proxy (``latency_proxy.py``) that
        adds ``rtt_ms`` per round trip: same process and counts, the proxy's address.
        Its ``stop()`` stops only the proxy."""
        proxy = start_proxy("127.0.0.1", self.server_port, rtt_ms, handshake_rtts=handshake_rtts)
        return S3Server(self.process, proxy.host, proxy.port, self.server_port, proxy)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            return
        if self.process.stdin is not None:
            self.process.stdin.close()  # the server's signal to end
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(timeout: float = 60.0, *, keep_alive: bool = True) -> S3Server:
    """Start the server in a child process and wait until it listens.

    ``keep_alive``: connections stay open between requests, as on S3 (moto's werkzeug
    server closes each one after its response; ``False`` keeps that behaviour).
    """
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *([] if keep_alive else ["--no-keep-alive"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **offline_aws_environment()},
    )
    assert process.stdout is not None
    try:
        line = first_line(process, timeout, "S3 test server")
        port = int(line)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return S3Server(process, "127.0.0.1", port)


# --------------------------------------------------------------------------- counting

#: Query parameters of a bucket GET that make it something other than a listing.
_BUCKET_SUBRESOURCES = frozenset((
    "accelerate", "acl", "analytics", "cors", "encryption", "intelligent-tiering",
    "inventory", "lifecycle", "location", "logging", "metrics", "notification", "object-lock",
    "ownershipControls", "policy", "policyStatus", "publicAccessBlock", "replication",
    "requestPayment", "tagging", "versioning", "website",
))  # fmt: skip
#: Query parameters of an object request that address a subresource, not its bytes.
_OBJECT_SUBRESOURCES = frozenset(
    ("acl", "attributes", "legal-hold", "restore", "retention", "select", "tagging", "torrent")
)
_KEY_ELEMENT = re.compile(rb"<(?:\w+:)?Key>")


def classify(method: str, path: str, query: str, headers: dict[str, str]) -> tuple[str, str]:
    """``(kind, action)`` of a path-style S3 request (``/bucket`` or ``/bucket/key``).

    Kinds: PUT, a request that writes an object or a part (``PutObject``,
    ``CopyObject``, ``UploadPart``, ``UploadPartCopy``, and the multipart upload's
    ``CreateMultipartUpload`` and ``CompleteMultipartUpload`` POSTs); GET,
    ``GetObject``, ranged or not; HEAD, ``HeadObject`` and ``HeadBucket``; LIST, a GET
    that lists (``ListObjects``, ``ListObjectsV2``, ``ListObjectVersions``,
    ``ListMultipartUploads``, ``ListParts``, ``ListBuckets``); DELETE, ``DeleteObject``
    and the bulk ``DeleteObjects`` POST; OTHER, the rest (bucket creation and
    configuration, subresources such as tags, ``AbortMultipartUpload``).
    """
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    bucket, _, key = path.lstrip("/").partition("/")
    copy = "x-amz-copy-source" in headers
    if not bucket:
        return ("LIST", "ListBuckets") if method == "GET" else ("OTHER", f"{method} /")
    if not key:
        if method == "GET":
            subresource = min(params.keys() & _BUCKET_SUBRESOURCES, default="")
            if subresource:  # GetBucketLocation, GetBucketVersioning...
                return "OTHER", f"GetBucket{subresource[0].upper()}{subresource[1:]}"
            if "uploads" in params:
                return "LIST", "ListMultipartUploads"
            if "versions" in params:
                return "LIST", "ListObjectVersions"
            return "LIST", "ListObjectsV2" if params.get("list-type") == ["2"] else "ListObjects"
        if method == "HEAD":
            return "HEAD", "HeadBucket"
        if method == "POST" and "delete" in params:
            return "DELETE", "DeleteObjects"
        if method == "PUT" and not params:
            return "OTHER", "CreateBucket"
        if method == "DELETE" and not params:
            return "OTHER", "DeleteBucket"
        return "OTHER", f"{method} bucket?{'&'.join(sorted(params))}"
    if params.keys() & _OBJECT_SUBRESOURCES:
        return "OTHER", f"{method} object?{'&'.join(sorted(params.keys() & _OBJECT_SUBRESOURCES))}"
    if method == "PUT":
        if "partNumber" in params and "uploadId" in params:
            return "PUT", "UploadPartCopy" if copy else "UploadPart"
        return "PUT", "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in params:
            return "PUT", "CreateMultipartUpload"
        if "uploadId" in params:
            return "PUT", "CompleteMultipartUpload"
    if method == "GET":
        if "uploadId" in params:
            return "LIST", "ListParts"
        return "GET", "GetObject"
    if method == "HEAD":
        return "HEAD", "HeadObject"
    if method == "DELETE":
        if "uploadId" in params:
            return "OTHER", "AbortMultipartUpload"
        return "DELETE", "DeleteObject"
    return "OTHER", f"{method} object"


class RequestCounter:
    """WSGI middleware: counts every request by kind (``classify``) before passing it
    on, and answers ``COUNTS_PATH`` (JSON) and ``RESET_PATH`` itself, uncounted."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.actions: collections.Counter[str] = collections.Counter()
        self.deleted_keys = 0
        self.log: collections.deque[Request] = collections.deque(maxlen=REQUEST_LOG_SIZE)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == COUNTS_PATH and method == "GET":
            detail = "detail" in urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            return self._reply(start_response, self.snapshot(detail))
        if path == RESET_PATH and method == "POST":
            self.reset()
            return self._reply(start_response, None)
        self.count(environ, method, path)
        return self.app(environ, start_response)

    def count(self, environ: dict[str, Any], method: str, path: str) -> None:
        query = environ.get("QUERY_STRING", "")
        headers = {"x-amz-copy-source": ""} if "HTTP_X_AMZ_COPY_SOURCE" in environ else {}
        kind, action = classify(method, path, query, headers)
        keys = self._deleted_keys(environ) if action == "DeleteObjects" else 0
        shown = path + (f"?{query}" if query else "")
        with self.lock:
            self.kinds[kind] += 1
            self.actions[f"{kind}/{action}"] += 1
            self.deleted_keys += keys
            self.log.append(Request(kind, action, method, shown, keys))

    @staticmethod
    def _deleted_keys(environ: dict[str, Any]) -> int:
        """The keys a ``DeleteObjects`` body names; the body is put back for moto."""
        import io

        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        body = stream.read(int(length)) if length else stream.read()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("wsgi.input_terminated", None)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return len(_KEY_ELEMENT.findall(body))

    def snapshot(self, detail: bool) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {
                "counts": {kind: self.kinds[kind] for kind in KINDS},
                "actions": dict(self.actions),
                "deleted_keys": self.deleted_keys,
            }
            if detail:
                out["requests"] = [dataclasses.asdict(r) for r in self.log]
        return out

    def reset(self) -> None:
        with self.lock:
            self.kinds.clear()
            self.actions.clear()
            self.deleted_keys = 0
            self.log.clear()

    @staticmethod
    def _reply(start_response: Any, data: Any) -> Iterator[bytes]:
        body = json.dumps(data).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return iter([body])


class KeepAlive:
    """WSGI middleware for kept-alive connections: it reads what is left of each
    request's body once the response is sent, so that the next request on the connection
    starts where it should (moto reads every body, but ``RequestCounter``'s own paths and
    errors raised early do not; werkzeug's own drain, disabled by ``_serve``, would read
    the next request too)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        from werkzeug.wsgi import LimitedStream

        stream = environ["wsgi.input"]
        drain: Callable[[], None]
        if environ.get("wsgi.input_terminated"):  # chunked: werkzeug's DechunkedInput

            def drain() -> None:
                while stream.read(1 << 16):  # up to and with the last chunk's line end
                    pass

        else:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            limited = LimitedStream(stream, length)
            environ["wsgi.input"] = limited

            def drain() -> None:
                limited.exhaust()

        return _AfterResponse(self.app(environ, start_response), drain)


class _AfterResponse:
    """A WSGI response that calls ``after`` once the server closes it."""

    def __init__(self, response: Iterable[bytes], after: Callable[[], None]) -> None:
        self.response = response
        self.after = after

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.response)

    def close(self) -> None:
        try:
            close = getattr(self.response, "close", None)
            if close is not None:
                close()
        finally:
            self.after()


def _serve(keep_alive: bool) -> None:
    """Serve moto's application (as moto's ``ThreadedMotoServer`` does: werkzeug, a
    thread per connection) behind the counting layer, until standard input closes.

    ``keep_alive``: keep connections open between requests, as S3 does (werkzeug closes
    each one after its response, so every request would pay for a new connection).
    """
    import logging

    import werkzeug.serving
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    handler: type[Any] = MotoRequestHandler
    app: Callable[..., Iterable[bytes]] = RequestCounter(
        DomainDispatcherApplication(create_backend_app)
    )
    if keep_alive:
        handler, no_drain = _keep_alive_classes()
        app = KeepAlive(app)
        # werkzeug reads whatever a client sent after each response (10 ms at least);
        # on a kept-alive connection that is the next request. KeepAlive drains instead.
        werkzeug.serving.selectors = no_drain  # type: ignore[attr-defined]
    server = werkzeug.serving.make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=handler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(server.server_address[1], flush=True)
    try:
        sys.stdin.read()  # until the parent closes it or dies
    finally:
        server.shutdown()
        thread.join()


def _keep_alive_classes() -> tuple[type[Any], Any]:
    """The request handler that keeps connections open, and the stand-in for
    ``selectors`` in ``werkzeug.serving`` whose selector never sees data (moto and
    werkzeug are imported here, in the server process only)."""
    import selectors as real_selectors

    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class KeepAliveRequestHandler(MotoRequestHandler):
        # A response is written in several sends (headers, then the body): with Nagle's
        # algorithm, a later one waits for the client's delayed ACK (40 ms) on a kept-alive
        # connection (a closing one flushes them at once).
        disable_nagle_algorithm = True

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "connection" and value.lower() == "close":
                return  # werkzeug's on every response; the client's own still counts
            super().send_header(keyword, value)

    class NeverReady:
        def register(self, *args: Any, **kwargs: Any) -> None:
            pass

        def select(self, timeout: float | None = None) -> list[Any]:
            return []

        def close(self) -> None:
            pass

    class NoDrainSelectors:
        EVENT_READ = real_selectors.EVENT_READ
        DefaultSelector = NeverReady

    return KeepAliveRequestHandler, NoDrainSelectors


if __name__ == "__main__":
    _serve(keep_alive="--no-keep-alive" not in sys.argv[1:])
