"""The direct connection: file contents sent from the reader task to the writer task over
one TCP connection, instead of chunk by chunk through Ray's object store.

Through the object store every chunk is copied into the source node's store, pushed to
the destination node's store and mapped there (measured on a two-core VM: 0.4-0.9 GB/s
between two nodes whatever the chunk size, 5-8x a local copy). Over one connection the
bytes are copied into the socket on one side and out of it on the other (1.1-2.3 GB/s
there). Everything else still goes through Ray: the listing, the records and any
failure, so both ends know what happened whichever way the bytes came.

The stream's items stay the same (listing, chunks, end; see ``_transfer_read``); only how
the chunks travel changes, below the hook's seams:

1. The writer listens on its node's IP (``ray.util.get_node_ip_address()``), on a port
   the OS picks, and gives the reader its address and a fresh random token (32 bytes,
   in the reader task's arguments, so only through Ray).
2. The reader connects and sends the token, then yields the listing through Ray as
   always. Connected, it yields the record ``("direct", total)`` and sends every chunk
   (of at most ``SEND_BYTES``) over the connection, then closes it and yields the end
   record through Ray. Not connected within ``CONNECT_TIMEOUT_S`` (a firewall, say), it
   yields the chunks through Ray as before: slower, never wrong.
3. The writer, at that record, accepts the connection whose first bytes are the token
   (compared in constant time; others are closed) and hands on what arrives as chunks of
   one reused buffer until ``total`` bytes came, then expects the connection to end.

So the writer's checks all still hold (every file's size and checksum against the
reader's, computed as it read), the memory is still a few buffers (the sockets' and one
chunk on each side), and nothing listens longer than one transfer. A reader that dies
mid-stream closes the connection (its process's sockets close with it); the writer then
reports the reader's failure as Ray gives it, else that the connection closed early. A
source node that vanishes without closing it is noticed through Ray as well: the writer
polls for the reader's failure while it waits for bytes.

Not used where Ray's own traffic is encrypted (``RAY_USE_TLS``): the connection is plain
TCP, like Ray's own object transfers without TLS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import os
import secrets
import socket
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import ray

from ckptable.errors import TransferError
from ckptable.ray._transfer_read import _listed_bytes

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DIRECT",
    "SEND_BYTES",
    "Listener",
    "Peer",
    "connect",
    "direct_allowed",
    "receive_over",
    "send_over",
]

#: The record that says the file contents come over the connection.
DIRECT = "direct"
#: How long the reader tries to connect before it sends through the object store.
CONNECT_TIMEOUT_S = 5.0
#: How long the writer waits for the connection after the reader said it connected.
_ACCEPT_TIMEOUT_S = 30.0
#: How often the writer, waiting for bytes, asks Ray whether the reader failed.
_POLL_S = 1.0
#: How long the writer waits for the reader's outcome after the connection closed early.
_OUTCOME_TIMEOUT_S = 30.0
_TOKEN_BYTES = 32
#: How long the writer waits for the token on a connection it accepted.
_TOKEN_TIMEOUT_S = 5.0
#: Socket buffer sizes asked for (the kernel may cap them).
_SOCKET_BUFFER_BYTES = 4 << 20
#: The writer receives into a buffer of this size (the chunks it hands on), and the
#: reader sends chunks of at most this size: buffers that stay in the CPU's cache (with
#: 8 MiB ones the reader took about twice the CPU time).
RECEIVE_BYTES = SEND_BYTES = 1 << 20


def direct_allowed() -> bool:
    """Whether a direct connection may carry the bytes: not where Ray encrypts its own
    traffic (a plain connection would bypass that)."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() not in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class Peer:
    """Where the reader connects, and the token it proves itself with."""

    host: str
    port: int
    token: bytes = dataclasses.field(repr=False)


class Listener:
    """The writer's listening socket, on its node's IP, for the one connection of one
    transfer."""

    def __init__(self) -> None:
        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, 0), family=family, backlog=8)
        _tune(self._socket, socket.SO_RCVBUF)  # the connection inherits it
        self.peer = Peer(host, self._socket.getsockname()[1], secrets.token_bytes(_TOKEN_BYTES))

    def accept(self, timeout_s: float | None = None) -> socket.socket:
        """The connection that presents the token; others are closed. TransferError if
        none comes within ``timeout_s`` (default ``_ACCEPT_TIMEOUT_S``)."""
        timeout_s = _ACCEPT_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self._socket.settimeout(left)
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                break
            try:  # the reader sends its token at once: a silent peer is dropped soon
                connection.settimeout(
                    max(0.001, min(_TOKEN_TIMEOUT_S, deadline - time.monotonic()))
                )
                token = _receive_exactly(connection, _TOKEN_BYTES)
            except OSError:
                token = b""
            if hmac.compare_digest(token, self.peer.token):
                connection.settimeout(_POLL_S)
                return connection
            connection.close()
        raise TransferError(f"the source node's connection did not arrive within {timeout_s:.0f} s")

    def close(self) -> None:
        self._socket.close()


def connect(peer: Peer, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket | None:
    """On the reader: a connection to the writer that has sent the token, or None if it
    cannot be made (the chunks then go through the object store)."""
    try:
        connection = socket.create_connection((peer.host, peer.port), timeout=timeout_s)
    except OSError:
        return None
    try:
        _tune(connection, socket.SO_SNDBUF)
        connection.sendall(peer.token)
        connection.settimeout(None)
    except OSError:
        connection.close()
        return None
    return connection


def _tune(connection: socket.socket, option: int) -> None:
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER_BYTES)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = connection.recv(size - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


# --------------------------------------------------------------------------------------
# The reader's side: chunks onto the connection


def send_over(items: Iterator[Any], connection: Any) -> Iterator[Any]:
    """The reader's stream as it goes into Ray's generator: with a ``connection`` (to the
    writer, ``sendall`` and ``close``), the chunks after the listing go over it,
    announced by the record ``("direct", total)``; records always go through Ray.
    Without one, or for a listing without bytes, everything goes through Ray. The
    connection is closed when the contents are sent (or the stream fails)."""
    try:
        for item in items:
            if not isinstance(item, (tuple, list)):  # a chunk
                if connection is not None:
                    connection.sendall(item)
                else:
                    yield item
                continue
            is_listing = len(item) == 4 and item[0] == "listing"
            total = _listed_bytes(item[3]) if is_listing else 0
            if connection is not None and not total:
                connection.close()  # the contents are all sent (or there are none)
                connection = None
            yield item
            if connection is not None:
                yield (DIRECT, total)
    finally:
        if connection is not None:
            connection.close()


# --------------------------------------------------------------------------------------
# The writer's side: the connection back into chunks


def receive_over(
    items: Iterator[Any],
    listener: Listener | None,
    reader_failure: Callable[[float], TransferError | None],
) -> Generator[Any, None, None]:
    """The reader's stream as the writer takes it: at the record ``("direct", total)``,
    the connection's bytes, as chunks of one reused buffer (each is written before the
    next is received), then the rest of ``items``.

    ``reader_failure(timeout_s)``: the reader's failure if Ray reports one within
    ``timeout_s``, else None; asked while no bytes arrive, and when the connection
    closes early, so that a failed reader is reported as such.
    """
    try:
        for item in items:
            if (
                listener is not None
                and isinstance(item, (tuple, list))
                and len(item) == 2
                and item[0] == DIRECT
            ):
                total = item[1]
                if isinstance(total, bool) or not isinstance(total, int) or total < 0:
                    raise TransferError(f"bad record {item!r}")
                connection = listener.accept()
                listener.close()
                listener = None
                with connection:
                    yield from _chunks_from(connection, total, reader_failure)
                continue
            if listener is not None and not (
                isinstance(item, (tuple, list)) and item and item[0] == "listing"
            ):
                listener.close()  # the reader sends through Ray
                listener = None
            yield item
    finally:
        if listener is not None:
            listener.close()


def _chunks_from(
    connection: socket.socket,
    total: int,
    reader_failure: Callable[[float], TransferError | None],
) -> Iterator[memoryview]:
    """``total`` bytes from the connection, as chunks of one reused buffer. If the
    connection ends early, the reader's failure is raised if Ray reports one; else the
    chunks stop there, and the writer finds the files short (and names the first) when
    the end record comes."""
    view = memoryview(bytearray(min(RECEIVE_BYTES, total) or 1))
    received = 0
    while received < total:
        count, ended = _receive_into(connection, view[: min(len(view), total - received)])
        if count:
            received += count
            yield view[:count]
        if ended:
            failure = reader_failure(_OUTCOME_TIMEOUT_S)
            if failure is not None:
                raise failure
            return
        if not count:  # nothing for a while: has the reader failed?
            failure = reader_failure(0.0)
            if failure is not None:
                raise failure
    while True:
        count, ended = _receive_into(connection, view[:1])
        if count:
            raise TransferError(f"the stream goes on after its end: more than {total} bytes came")
        if ended:
            return
        failure = reader_failure(0.0)
        if failure is not None:
            raise failure


def _receive_into(connection: socket.socket, view: memoryview) -> tuple[int, bool]:
    """Fill ``view`` from the connection: (bytes received, whether the connection
    ended). Returns early, with what came, if nothing arrives for ``_POLL_S``."""
    filled = 0
    while filled < len(view):
        try:
            count = connection.recv_into(view[filled:])
        except TimeoutError:
            return filled, False
        except OSError:  # reset: the reader's end went away
            return filled, True
        if count == 0:
            return filled, True
        filled += count
    return filled, False
