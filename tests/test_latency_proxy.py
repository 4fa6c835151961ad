"""The test infrastructure for object stores at realistic latency: the latency proxy
(``latency_proxy.py``) adds its round-trip time without limiting bandwidth or
concurrency, and the S3 server (``s3_server.py``) counts the requests it receives by kind
and keeps connections alive between requests, as S3 does."""

from __future__ import annotations

import http.client
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from latency_proxy import Proxy, start_proxy
from s3_server import BUCKET, KINDS, S3Server, classify

RTT = 0.020  # the s3_latency_server fixture's, in seconds


# --------------------------------------------------------------------------- helpers


class EchoServer:
    """A TCP server on 127.0.0.1 that sends back what it receives, and closes its side
    once the client closed its own (``shutdown(SHUT_WR)``)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self.socket.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := connection.recv(1 << 16):
                connection.sendall(data)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def echo_proxy(echo_server: EchoServer) -> Iterator[Proxy]:
    with start_proxy("127.0.0.1", echo_server.port, rtt_ms=RTT * 1000) as proxy:
        yield proxy


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trip(sock: socket.socket, data: bytes = b"ping") -> float:
    """Seconds to send ``data`` and receive it back."""
    start = time.perf_counter()
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        received += sock.recv(len(data) - len(received))
    return time.perf_counter() - start


def median_time(call: Callable[[], Any], times: int) -> float:
    durations = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


# --------------------------------------------------------------------------- the proxy


def test_the_proxy_adds_its_round_trip_time(echo_server: EchoServer, echo_proxy: Proxy) -> None:
    with connect("127.0.0.1", echo_server.port) as direct, connect(*address(echo_proxy)) as via:
        round_trip(via)  # the connection's handshake round trip, measured on its own below
        direct_time = statistics.median(round_trip(direct) for _ in range(10))
        proxied_time = statistics.median(round_trip(via) for _ in range(10))
    added = proxied_time - direct_time
    assert 0.8 * RTT <= added <= 2 * RTT, f"added {added * 1000:.1f} ms per round trip"


def test_a_new_connection_pays_one_more_round_trip_for_its_handshake(
    echo_proxy: Proxy,
) -> None:
    with connect(*address(echo_proxy)) as via:
        first = round_trip(via)
        later = statistics.median(round_trip(via) for _ in range(5))
    assert first - later >= 0.8 * RTT, f"first {first * 1000:.1f} ms, then {later * 1000:.1f}"


def test_a_stream_is_delayed_once_not_once_per_chunk(echo_proxy: Proxy) -> None:
    """32 MiB echoed back: 512 chunks of 64 KiB each way, 10 s if each waited its turn."""
    payload = bytes(range(256)) * (32 << 12)
    with connect(*address(echo_proxy)) as via:
        round_trip(via)
        received = bytearray()

        def receive() -> None:
            while len(received) < len(payload):
                received.extend(via.recv(1 << 20))

        reader = threading.Thread(target=receive)
        start = time.perf_counter()
        reader.start()
        via.sendall(payload)
        reader.join()
        seconds = time.perf_counter() - start
    assert received == payload
    assert seconds < 2.0, f"{seconds:.2f} s for 32 MiB through the proxy"


def test_round_trips_on_many_connections_overlap(echo_proxy: Proxy) -> None:
    sockets = [connect(*address(echo_proxy)) for _ in range(64)]
    try:
        with ThreadPoolExecutor(len(sockets)) as pool:
            list(pool.map(round_trip, sockets))  # the handshakes
            start = time.perf_counter()
            times = list(pool.map(round_trip, sockets))
            seconds = time.perf_counter() - start
    finally:
        for sock in sockets:
            sock.close()
    assert min(times) >= 0.8 * RTT
    assert seconds < 4 * RTT, f"64 concurrent round trips took {seconds * 1000:.0f} ms"


def test_a_half_close_reaches_the_server_after_the_data(echo_proxy: Proxy) -> None:
    with connect(*address(echo_proxy)) as via:
        via.sendall(b"last words")
        via.shutdown(socket.SHUT_WR)  # the echo server closes once it sees this
        received = b""
        while data := via.recv(1024):
            received += data
    assert received == b"last words"


def test_stop_ends_the_proxy_and_its_connections(echo_server: EchoServer) -> None:
    proxy = start_proxy("127.0.0.1", echo_server.port, rtt_ms=2)
    sock = connect(*address(proxy))
    round_trip(sock)
    proxy.stop()
    assert proxy.process.returncode is not None
    with sock:
        assert sock.recv(16) == b""  # closed by the proxy, not left hanging
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address(proxy), timeout=5).close()
    proxy.stop()  # again: nothing left to do


def test_a_target_that_refuses_closes_the_client() -> None:
    unused = socket.create_server(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    with start_proxy("127.0.0.1", port, rtt_ms=2) as proxy, connect(*address(proxy)) as sock:
        assert sock.recv(16) == b""


def address(proxy: Proxy) -> tuple[str, int]:
    return proxy.host, proxy.port


# --------------------------------------------------------------------------- S3 at latency


def test_s3_requests_through_the_proxy_take_one_more_round_trip(
    s3_server: S3Server, s3_latency_server: S3Server
) -> None:
    direct, via = s3_server.boto3_client(), s3_latency_server.boto3_client()
    key = f"{uuid.uuid4().hex}/object"
    direct.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    via.head_object(Bucket=BUCKET, Key=key)  # the connection, made once

    def head(client: Any) -> Callable[[], Any]:
        return lambda: client.head_object(Bucket=BUCKET, Key=key)

    added = median_time(head(via), 10) - median_time(head(direct), 10)
    assert 0.8 * RTT <= added <= 2.5 * RTT, f"added {added * 1000:.1f} ms per HEAD"


def test_a_big_put_through_the_proxy_streams(
    s3_server: S3Server, s3_latency_server: S3Server
) -> None:
    """32 MiB in one PUT: with each 256 KiB chunk (the proxy's reads) waiting for the
    one before it, the proxy would add 128 x 10 ms."""
    payload = bytes(32 << 20)
    key = f"{uuid.uuid4().hex}/big"
    times = {}
    for name, server in (("direct", s3_server), ("proxied", s3_latency_server)):
        client = server.boto3_client()
        client.head_bucket(Bucket=BUCKET)  # the connection, made untimed
        start = time.perf_counter()
        client.put_object(Bucket=BUCKET, Key=key, Body=payload)
        times[name] = time.perf_counter() - start
    added = times["proxied"] - times["direct"]
    assert added < 0.6, f"{times}: the proxy added {added:.2f} s to a 32 MiB PUT"


def test_concurrent_s3_requests_overlap(s3_server: S3Server, s3_latency_server: S3Server) -> None:
    """16 GETs at once take a few round trips, not 16 (moto's own time, which does not
    overlap, is measured without the proxy and taken off)."""
    keys = [f"{uuid.uuid4().hex}/{i}" for i in range(16)]
    direct_client = s3_server.boto3_client(max_pool_connections=16)
    for key in keys:
        direct_client.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 1024)
    times = {}
    with ThreadPoolExecutor(16) as pool:
        for name, server in (("direct", s3_server), ("proxied", s3_latency_server)):
            client = server.boto3_client(max_pool_connections=16)

            def get(key: str, client: Any = client) -> bytes:
                body: bytes = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                return body

            list(pool.map(get, keys))  # the connections, made untimed
            start = time.perf_counter()
            assert all(body == b"x" * 1024 for body in pool.map(get, keys))
            times[name] = time.perf_counter() - start
    added = times["proxied"] - times["direct"]
    assert added < 4 * RTT, f"{times}: 16 concurrent GETs took {added / RTT:.1f} RTTs more"


def test_the_latency_filesystems_reach_the_same_bucket(
    s3_prefix: str, pyarrow_s3: Any, pyarrow_s3_latency: Any, s3fs_s3_latency: Any
) -> None:
    with pyarrow_s3_latency.open_output_stream(f"{s3_prefix}/a") as f:
        f.write(b"written through the proxy")
    s3fs_s3_latency.pipe_file(f"{s3_prefix}/b", b"and with s3fs")
    with pyarrow_s3.open_input_stream(f"{s3_prefix}/a") as f:
        assert f.read() == b"written through the proxy"
    assert s3fs_s3_latency.cat_file(f"{s3_prefix}/b") == b"and with s3fs"


# --------------------------------------------------------------------------- counts


def test_requests_are_counted_by_kind(s3_server: S3Server, s3_latency_server: S3Server) -> None:
    client = s3_latency_server.boto3_client()
    prefix = uuid.uuid4().hex
    s3_server.reset_counts()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/a", Body=b"a")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/b", Body=b"b")
    client.get_object(Bucket=BUCKET, Key=f"{prefix}/a")["Body"].read()
    client.get_object(Bucket=BUCKET, Key=f"{prefix}/a", Range="bytes=0-0")["Body"].read()
    client.head_object(Bucket=BUCKET, Key=f"{prefix}/b")
    client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/c")["UploadId"]
    part = client.upload_part(
        Bucket=BUCKET, Key=f"{prefix}/c", UploadId=upload, PartNumber=1, Body=b"c"
    )
    client.complete_multipart_upload(
        Bucket=BUCKET,
        Key=f"{prefix}/c",
        UploadId=upload,
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/a")
    client.delete_objects(
        Bucket=BUCKET, Delete={"Objects": [{"Key": f"{prefix}/b"}, {"Key": f"{prefix}/c"}]}
    )
    client.get_bucket_location(Bucket=BUCKET)

    expected = {"PUT": 5, "GET": 2, "HEAD": 1, "LIST": 1, "DELETE": 2, "OTHER": 1}
    assert s3_server.counts() == expected
    assert s3_latency_server.counts() == expected  # one server, one count
    detail = s3_server.counts(detail=True)
    assert {key: n for key, n in detail.items() if "/" in key} == {
        "PUT/PutObject": 2,
        "PUT/CreateMultipartUpload": 1,
        "PUT/UploadPart": 1,
        "PUT/CompleteMultipartUpload": 1,
        "GET/GetObject": 2,
        "HEAD/HeadObject": 1,
        "LIST/ListObjectsV2": 1,
        "DELETE/DeleteObject": 1,
        "DELETE/DeleteObjects": 1,
        "DELETE/keys": 2,
        "OTHER/GetBucketLocation": 1,
    }
    requests = s3_server.requests()
    assert [r.action for r in requests[:3]] == ["PutObject", "PutObject", "GetObject"]
    assert requests[0].path == f"/{BUCKET}/{prefix}/a" and requests[0].method == "PUT"
    assert [r.keys for r in requests if r.action == "DeleteObjects"] == [2]


def test_reading_and_resetting_the_counts_is_not_counted(s3_server: S3Server) -> None:
    s3_server.reset_counts()
    s3_server.counts()
    s3_server.counts(detail=True)
    s3_server.requests()
    assert s3_server.counts() == dict.fromkeys(KINDS, 0)
    assert s3_server.requests() == []
    s3_server.boto3_client().head_bucket(Bucket=BUCKET)
    assert s3_server.counts()["HEAD"] == 1
    s3_server.reset_counts()
    assert s3_server.counts() == dict.fromkeys(KINDS, 0)


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "expected"),
    [
        ("PUT", "/b/k", "", {}, ("PUT", "PutObject")),
        ("PUT", "/b/k", "", {"x-amz-copy-source": "b/j"}, ("PUT", "CopyObject")),
        ("PUT", "/b/k", "partNumber=2&uploadId=u", {}, ("PUT", "UploadPart")),
        ("POST", "/b/k", "uploads", {}, ("PUT", "CreateMultipartUpload")),
        ("POST", "/b/k", "uploadId=u", {}, ("PUT", "CompleteMultipartUpload")),
        ("GET", "/b/dir/k", "", {}, ("GET", "GetObject")),
        ("GET", "/b/k", "uploadId=u", {}, ("LIST", "ListParts")),
        ("GET", "/b", "list-type=2&prefix=p", {}, ("LIST", "ListObjectsV2")),
        ("GET", "/b/", "prefix=p&delimiter=%2F", {}, ("LIST", "ListObjects")),
        ("GET", "/b", "uploads", {}, ("LIST", "ListMultipartUploads")),
        ("GET", "/", "", {}, ("LIST", "ListBuckets")),
        ("GET", "/b", "versioning", {}, ("OTHER", "GetBucketVersioning")),
        ("HEAD", "/b/k", "", {}, ("HEAD", "HeadObject")),
        ("HEAD", "/b", "", {}, ("HEAD", "HeadBucket")),
        ("DELETE", "/b/k", "", {}, ("DELETE", "DeleteObject")),
        ("POST", "/b", "delete", {}, ("DELETE", "DeleteObjects")),
        ("DELETE", "/b/k", "uploadId=u", {}, ("OTHER", "AbortMultipartUpload")),
        ("PUT", "/b", "", {}, ("OTHER", "CreateBucket")),
        ("PUT", "/b/k", "tagging", {}, ("OTHER", "PUT object?tagging")),
    ],
)
def test_requests_are_classified_as_s3_names_them(
    method: str, path: str, query: str, headers: dict[str, str], expected: tuple[str, str]
) -> None:
    assert classify(method, path, query, headers) == expected


# --------------------------------------------------------------------------- keep-alive


def test_the_server_keeps_connections_open_between_requests(s3_server: S3Server) -> None:
    """Also after a chunked request (as pyarrow sends its parts) and after one whose body
    is left unread (the counts' reset path ignores it): the server reads the rest, and
    the next request on the connection is read as one."""
    key = f"/{BUCKET}/{uuid.uuid4().hex}"
    requests: list[tuple[str, str, bytes | Iterator[bytes] | None, int]] = [
        ("PUT", key, b"x" * 100_000, 200),
        ("PUT", f"{key}-chunked", iter([b"chunk", b"ed"]), 200),
        ("POST", "/__counts__/reset", b"ignored" * 10_000, 200),
        ("GET", f"{key}-missing", None, 404),
    ]
    connection = http.client.HTTPConnection("127.0.0.1", s3_server.port, timeout=30)
    try:
        for method, path, body, status in requests:
            chunked = body is not None and not isinstance(body, bytes)
            connection.request(method, path, body=body, encode_chunked=chunked)
            response = connection.getresponse()
            data = response.read()
            assert (response.status, response.will_close) == (status, False), (method, path)
        assert b"NoSuchKey" in data
    finally:
        connection.close()


def test_small_requests_on_a_kept_alive_connection_do_not_wait_for_delayed_acks(
    s3_server: S3Server,
) -> None:
    """A response goes out in several sends; with Nagle's algorithm on the server's
    sockets, each small PUT or GET on a kept-alive connection waited 40 ms for the
    client's delayed ACK."""
    client = s3_server.boto3_client()
    key = f"{uuid.uuid4().hex}/small"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 1024)
    put = median_time(lambda: client.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 1024), 10)
    get = median_time(lambda: client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), 10)
    assert max(put, get) < 0.035, f"PUT {put * 1000:.1f} ms, GET {get * 1000:.1f} ms"
