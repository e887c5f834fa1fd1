"""The test proxy itself: it forwards, adds its delay, and cuts and heals as documented."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tests.support.tcpproxy import TcpProxy


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """A TCP echo server on loopback (one thread per connection)."""
    srv = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve_one(c: socket.socket) -> None:
        with c:
            while data := _recv(c):
                c.sendall(data)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)
            threading.Thread(target=serve_one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()
    srv.close()
    for c in conns:
        c.close()


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=5)


def _roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_with_the_delay_added_each_way(echo):
    with TcpProxy(echo, delay=0.05) as proxy, _connect(proxy) as s:
        t = time.monotonic()
        assert _roundtrip(s, b"hello") == b"hello"
        assert time.monotonic() - t >= 0.1  # one delay up, one down
        big = bytes(range(256)) * 4096  # 1 MB, many chunks: order and content kept
        assert _roundtrip(s, big) == big
    assert proxy.stats()["bytes_up"] == proxy.stats()["bytes_down"] == 5 + len(big)


def test_a_redis_client_works_through_the_proxy():
    from producer.embedded import embedded_redis

    with embedded_redis() as url:
        target = redis.Redis.from_url(url).connection_pool.connection_kwargs
        with TcpProxy((target["host"], target["port"]), delay=0.001) as proxy:
            client = redis.Redis(host=proxy.host, port=proxy.port)
            client.set("k", "v")
            assert client.get("k") == b"v"
            client.close()


def test_reset_cut_resets_connections_and_refuses_new_ones_until_healed(echo):
    with TcpProxy(echo) as proxy:
        s = _connect(proxy)
        assert _roundtrip(s, b"a") == b"a"
        proxy.cut("reset")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            s.sendall(b"b")
            s.recv(10)
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
        assert proxy.stats()["resets"] == 1
        proxy.heal()
        with _connect(proxy) as s2:
            assert _roundtrip(s2, b"c") == b"c"
        s.close()


def test_blackhole_holds_traffic_and_new_connections_then_delivers_on_heal(echo):
    with TcpProxy(echo) as proxy, _connect(proxy) as s:
        assert _roundtrip(s, b"a") == b"a"
        proxy.cut("blackhole")
        s.sendall(b"held")
        late = _connect(proxy)  # accepted, but not connected upstream
        late.sendall(b"late")
        for c in (s, late):
            c.settimeout(0.3)
            with pytest.raises(TimeoutError):  # silence, not an error
                c.recv(10)
        proxy.heal()
        for c, want in ((s, b"held"), (late, b"late")):
            c.settimeout(5)
            assert c.recv(10) == want
        late.close()
        assert proxy.stats()["resets"] == 0


def test_cut_on_drops_the_matching_reply_and_resets_the_link(echo):
    with TcpProxy(echo) as proxy, _connect(proxy) as s:
        proxy.cut_on(rb"secret")
        assert _roundtrip(s, b"plain") == b"plain"  # no match: forwarded
        s.sendall(b"the secret")
        assert _recv(s) == b""  # the reply never arrives: the connection is reset
        assert proxy.tripped == b"the secret" and proxy.state == "reset"
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
        proxy.heal()
        with _connect(proxy) as s2:
            assert _roundtrip(s2, b"the secret") == b"the secret"  # disarmed: it fires once


def test_bad_arguments_are_refused_with_their_name():
    with pytest.raises(ValueError, match="delay"):
        TcpProxy(("127.0.0.1", 1), delay=-1)
    with TcpProxy(("127.0.0.1", 1)) as proxy, pytest.raises(ValueError, match="blackhole"):
        proxy.cut("unplug")
