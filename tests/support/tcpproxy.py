"""A TCP proxy of the tests' own: per-connection forwarding with an added one-way delay, and a
switch that cuts the link and heals it.

Why: the kernel here has no netem, so the network between two "hosts" (network namespaces, see
``tests/support/netlab.py``) can only be slowed or cut on a path the test owns. Every worker host
reaches Redis through its own proxy, so one host can be cut off alone while the others go on.

Two ways to cut, as real networks fail:

- ``cut("reset")``: every connection is reset (RST) and new ones are refused (the listening
  socket is closed) until ``heal()``. Peers see an error at once: a link that went down hard,
  a firewall that rejects.
- ``cut("blackhole")``: nothing is forwarded any more, either way, and no socket is closed.
  Bytes sent meanwhile wait in the proxy; new connections are accepted but not connected
  upstream. ``heal()`` delivers everything held, in order. Peers see silence, not an error:
  a partition that heals within TCP's retransmission window.
- ``cut_on(pattern)``: armed, it waits for the first chunk from the target that matches
  ``pattern``, drops that chunk and resets the link as ``cut("reset")`` does: a reply lost in
  flight with its connection (the link died after the server sent it, before the client got
  it). ``tripped`` tells when it fired.

The delay is one way, per direction, per chunk: a chunk read at ``t`` is written at
``t + delay`` (chunks behind it are not held up longer), so the round trip grows by twice the
delay and pipelined traffic keeps its throughput.

In process (a thread with its own event loop)::

    with TcpProxy(("10.231.7.2", 6379), listen=("10.231.7.5", 0), delay=0.001) as proxy:
        url = f"redis://{proxy.host}:{proxy.port}/0"
        proxy.cut("blackhole"); ...; proxy.heal()

As its own process (benchmarks)::

    python -m tests.support.tcpproxy --target 127.0.0.1:6379 --delay-ms 1
    # prints TCPPROXY_ADDR=127.0.0.1:PORT; SIGUSR1 cuts (reset), SIGUSR2 heals, SIGTERM stops
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field

CHUNK = 65536
MODES = ("reset", "blackhole")


@dataclass(eq=False)
class _Link:
    """One client connection and, once forwarding is allowed, its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    dead: bool = False


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST, not FIN: the peer gets ECONNRESET on its next read or write, as when a
    link drops, instead of a clean end of stream."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forward ``listen`` -> ``target`` with ``delay`` seconds added each way.

    :param target: ``(host, port)`` to connect to for every accepted connection.
    :param listen: ``(host, port)`` to listen on; port 0 picks a free one (``self.port``).
    :param delay: one-way delay in seconds, added in both directions.
    """

    def __init__(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0),
                 delay: float = 0.0):
        if delay < 0:
            raise ValueError(f"TcpProxy delay must be >= 0 s, got {delay}")
        self.target = target
        self.host, self.port = listen
        self.delay = delay
        self.state = "open"  # "open" | "reset" | "blackhole"
        self.accepted = 0
        self.resets = 0  # connections reset by cuts
        self.bytes_up = 0
        self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._trigger: re.Pattern[bytes] | None = None
        self.tripped: bytes | None = None  # the chunk cut_on dropped, once it fired

    # -- the thread and its loop -------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _call(self, coro, timeout: float = 10):
        if self._loop is None:
            raise RuntimeError("TcpProxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- the switch ------------------------------------------------------------------------
    def cut(self, mode: str = "reset") -> None:
        """Cut the link (see the module docstring for ``reset`` and ``blackhole``)."""
        if mode not in MODES:
            raise ValueError(f"TcpProxy.cut: mode must be one of {MODES}, got {mode!r}")
        self._call(self._cut(mode))

    def cut_on(self, pattern: bytes) -> None:
        """Arm a cut: the first chunk from the target matching ``pattern`` (a regex) is dropped
        and the link reset; ``heal()`` undoes it as any cut."""
        self.tripped = None
        self._trigger = re.compile(pattern)

    def heal(self) -> None:
        """Forward again: listen again after a reset, deliver what a blackhole held; disarm
        ``cut_on``."""
        self._trigger = None
        self._call(self._heal())

    def stats(self) -> dict:
        return {"state": self.state, "accepted": self.accepted, "open": len(self._links), "resets": self.resets,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    # -- inside the loop -------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self, mode: str) -> None:
        assert self._flowing is not None
        self._flowing.clear()
        self.state = mode
        if mode == "reset":
            if self._server is not None:
                self._server.close()  # new connections are refused from now on
                self._server = None
            for link in list(self._links):
                self._drop(link)
                self.resets += 1

    async def _heal(self) -> None:
        assert self._flowing is not None
        if self._server is None:
            await self._listen()
        self.state = "open"
        self._flowing.set()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            self._drop(link)

    def _drop(self, link: _Link, *, hard: bool = True) -> None:
        """End a connection: reset both sides (a cut), or close them cleanly once the
        connection ended by itself (so the bytes already written still arrive)."""
        link.dead = link.dead or hard
        for w in (link.client, link.upstream):
            if hard:
                _abort(w)
            elif w is not None and not w.transport.is_closing():
                w.close()
        for t in link.tasks:
            t.cancel()
        self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackhole holds new connections here
            if link.dead:
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the target is down: the client sees its connection reset
            link.tasks = [asyncio.create_task(self._pump(reader, link.upstream, "up")),
                          asyncio.create_task(self._pump(up_reader, writer, "down"))]
            # When one direction ends, the connection ends: Redis clients never half-close.
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            self._drop(link, hard=link.dead)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        """Read chunks as they come, write each one ``delay`` after it was read; hold both ends
        while the link is cut."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)

        sender = asyncio.create_task(send())
        try:
            while True:
                await self._flowing.wait()
                try:
                    data = await src.read(CHUNK)
                except OSError:
                    data = b""
                if direction == "down" and self._trigger is not None and self._trigger.search(data):
                    self._trigger, self.tripped = None, data
                    await self._cut("reset")  # drops this link too: the chunk goes nowhere
                    return
                queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A TCP proxy with an added one-way delay and a cut switch.")
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT (port 0: a free one)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added in each direction, ms")
    a = p.parse_args(argv)
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # the proxy's thread inherits the mask
    proxy = TcpProxy(a.target, listen=a.listen, delay=a.delay_ms / 1000).start()
    print(f"TCPPROXY_ADDR={proxy.host}:{proxy.port}", flush=True)
    try:
        while True:
            sig = signal.sigwait(signals)
            if sig == signal.SIGUSR1:
                proxy.cut("reset")
            elif sig == signal.SIGUSR2:
                proxy.heal()
            else:
                break
    finally:
        proxy.stop()
        print(f"TCPPROXY_STATS={proxy.stats()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
