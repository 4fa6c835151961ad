"""A TCP proxy that adds network latency, for object stores at realistic round trips.

``start_proxy(host, port, rtt_ms=20)`` starts it in a child process (``python
latency_proxy.py HOST PORT RTT_MS HANDSHAKE_RTTS``, stdlib only): it listens on
127.0.0.1 on a port the OS picks, opens one connection to the target per connection it
accepts, and forwards every chunk of bytes in each direction ``rtt_ms / 2`` after it
arrived. Chunks are timestamped on arrival and sent in order at arrival + delay, so
latency is added without limiting bandwidth: a stream keeps flowing (64 MiB through the
proxy take the transfer time plus one delay, not one delay per chunk), and requests on
different connections overlap as they would on a real network.

A new connection also pays for its TCP handshake: what the client sends in its first
``handshake_rtts`` round trips (1 by default: SYN, SYN-ACK) is held until then, as a
client on a real network could not send before the handshake completed. TLS is not
modelled (it would add one or two round trips per new connection).

Half-closes are forwarded (EOF in one direction, after the data before it); a reset or
an error on either side closes both. Each direction buffers at most ``HIGH_WATER``
bytes before it stops reading from its sender (TCP's window, roughly). The proxy serves
until its standard input closes (``Proxy.stop()``, or the parent ending whatever way it
ends). The shared loopback device is never touched (no ``tc``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import socket
import subprocess
import sys
import threading

#: A direction stops reading from its sender while this many bytes wait to be sent.
HIGH_WATER = 16 << 20
#: ... and reads again once fewer than this many wait.
LOW_WATER = 4 << 20


@dataclasses.dataclass
class Proxy:
    """A running proxy (a child process): connect to ``host:port`` to reach the target
    ``rtt_ms`` later per round trip. ``stop()`` ends it; also a context manager."""

    process: subprocess.Popen[str]
    host: str
    port: int
    target_host: str
    target_port: int
    rtt_ms: float

    @property
    def one_way_delay(self) -> float:
        """Seconds added to every chunk in each direction."""
        return self.rtt_ms / 2000

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()  # the proxy's signal to end
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_proxy(
    target_host: str,
    target_port: int,
    rtt_ms: float = 20,
    *,
    handshake_rtts: float = 1,
    timeout: float = 30.0,
) -> Proxy:
    """Start a proxy to ``target_host:target_port`` in a child process; wait until it
    listens. ``rtt_ms``: the round-trip time it adds (half in each direction);
    ``handshake_rtts``: round trips a new connection waits before its first bytes go on."""
    if rtt_ms < 0 or handshake_rtts < 0:
        raise ValueError("rtt_ms and handshake_rtts must not be negative")
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            target_host,
            str(target_port),
            repr(float(rtt_ms)),
            repr(float(handshake_rtts)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(first_line(process, timeout, "latency proxy"))
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Proxy(process, "127.0.0.1", port, target_host, target_port, float(rtt_ms))


def first_line(process: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The child's first line (its port), or an error naming ``what`` if it does not
    come in time (shared with ``s3_server.py``)."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"The {what} did not start within {timeout} s.")
    line = process.stdout.readline()
    if not line.strip():
        raise RuntimeError(f"The {what} exited (code {process.wait()}).")
    return line


# --------------------------------------------------------------------------- the proxy


class _Pipe:
    """One direction of a proxied connection: chunks from ``source`` written to
    ``sink`` ``delay`` seconds after they arrived (not before ``not_before``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, not_before: float) -> None:
        self.loop = loop
        self.delay = delay
        self.not_before = not_before
        self.source: _Side | None = None
        self.sink: _Side | None = None
        #: (time to send, chunk); ``None``: the sender's EOF.
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sink_paused = False
        self.reading_paused = False
        self.eof_sent = False

    def push(self, data: bytes | None) -> None:
        when = max(self.loop.time(), self.not_before) + self.delay
        self.queue.append((when, data))
        if data is not None:
            self.queued_bytes += len(data)
        self._schedule()
        self._flow_control()

    def sink_ready(self) -> None:
        """The sink's transport exists now (the upstream connection was made)."""
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is not None or not self.queue:
            return
        if self.sink is None or self.sink.transport is None:
            return
        self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        sink = self.sink
        if sink is None or sink.transport is None or sink.transport.is_closing():
            self.queue.clear()
            self.queued_bytes = 0
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is None:
                self.eof_sent = True
                if sink.transport.can_write_eof():
                    sink.transport.write_eof()
                sink.connection.maybe_close()
                continue
            self.queued_bytes -= len(data)
            sink.transport.write(data)
        self._schedule()
        self._flow_control()

    def set_sink_paused(self, paused: bool) -> None:
        self.sink_paused = paused
        self._flow_control()

    def _flow_control(self) -> None:
        source = self.source
        if source is None or source.transport is None or source.transport.is_closing():
            return
        if not self.reading_paused and (self.sink_paused or self.queued_bytes > HIGH_WATER):
            self.reading_paused = True
            source.transport.pause_reading()
        elif self.reading_paused and not self.sink_paused and self.queued_bytes < LOW_WATER:
            self.reading_paused = False
            source.transport.resume_reading()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection (the client's, or the target's)."""

    def __init__(self, connection: _Connection, outgoing: _Pipe, incoming: _Pipe) -> None:
        self.connection = connection
        self.outgoing = outgoing  # what this socket receives goes out through here
        self.incoming = incoming  # what this socket sends comes from here
        self.transport: asyncio.Transport | None = None
        outgoing.source = self
        incoming.sink = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.connection.closed:  # the client left while its target was dialled
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming.sink_ready()

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push(None)
        return True  # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self.incoming.set_sink_paused(True)

    def resume_writing(self) -> None:
        self.incoming.set_sink_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.close()


class _Connection:
    """A client's connection and its connection to the target, joined by two pipes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay: float,
        handshake: float,
        registry: set[_Connection],
    ) -> None:
        now = loop.time()
        self.registry = registry
        self.closed = False
        registry.add(self)
        upstream = _Pipe(loop, delay, not_before=now + handshake)
        downstream = _Pipe(loop, delay, not_before=now)
        self.client = _Side(self, outgoing=upstream, incoming=downstream)
        self.target = _Side(self, outgoing=downstream, incoming=upstream)
        self.pipes = (upstream, downstream)

    def maybe_close(self) -> None:
        """Both directions delivered their EOF: the exchange is over."""
        if all(pipe.eof_sent for pipe in self.pipes):
            self.close()

    def close(self) -> None:
        self.closed = True
        self.registry.discard(self)
        for side in (self.client, self.target):
            if side.transport is not None and not side.transport.is_closing():
                # Data still queued for a closed peer would go nowhere: drop it.
                side.transport.close()
        for pipe in self.pipes:
            if pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None


async def serve(
    target_host: str,
    target_port: int,
    rtt_ms: float,
    handshake_rtts: float,
    stop: asyncio.Event,
    ready: asyncio.Future[int] | None = None,
) -> None:
    """Serve until ``stop`` is set; ``ready`` gets the port once it listens."""
    loop = asyncio.get_running_loop()
    delay = rtt_ms / 2000
    handshake = handshake_rtts * rtt_ms / 1000
    open_connections: set[_Connection] = set()
    connecting: set[asyncio.Task[None]] = set()

    def accept() -> asyncio.Protocol:
        connection = _Connection(loop, delay, handshake, open_connections)
        task = loop.create_task(connect(connection))
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return connection.client

    async def connect(connection: _Connection) -> None:
        try:
            await loop.create_connection(lambda: connection.target, target_host, target_port)
        except OSError:
            connection.close()

    server = await loop.create_server(accept, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(port)
    else:
        print(port, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for task in list(connecting):
            task.cancel()
        for connection in list(open_connections):
            connection.close()
        await server.wait_closed()


def _main(argv: list[str]) -> None:
    target_host, target_port, rtt_ms, handshake_rtts = argv
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def wait_for_stdin() -> None:
        sys.stdin.read()  # until the parent closes it or dies
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    try:
        loop.run_until_complete(
            serve(target_host, int(target_port), float(rtt_ms), float(handshake_rtts), stop)
        )
    finally:
        loop.close()


if __name__ == "__main__":
    _main(sys.argv[1:])
