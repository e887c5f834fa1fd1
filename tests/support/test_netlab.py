"""The network-namespace lab: hosts reach only what they are given, names are cleaned up, and a
lab that cannot be built is an error that says why."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.fleet import ROOT, wait_until
from tests.support.netlab import PREFIX, NetLab, _links, _namespaces, ip, remove_leftovers

# With the cross-host tests, on one pytest-xdist worker (tests/integration/test_hosts.py says why).
pytestmark = pytest.mark.xdist_group("netns")

PROBE = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"


def _reach(host, addr: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([*host.prefix(), sys.executable, "-c", PROBE, addr, str(port)],
                          capture_output=True, text=True, timeout=30)


def test_hosts_reach_their_link_and_routed_addresses_only_and_close_removes_everything():
    import socket

    with NetLab() as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.route(a, b.gateway)
        assert a.addr != b.addr and a.gateway != b.gateway
        with socket.create_server((b.gateway, 0)) as srv:  # a service on the test's host
            port = srv.getsockname()[1]
            assert _reach(a, b.gateway, port).returncode == 0  # routed: answered by the root namespace
            no_route = _reach(b, a.gateway, port)  # b has no route to a's link
            assert no_route.returncode != 0 and "unreachable" in no_route.stderr
        peer = _reach(a, b.addr, 9)  # no host reaches another host: no route, and the root namespace forwards nothing
        assert peer.returncode != 0 and "unreachable" in peer.stderr
        names = {h.netns for h in lab.hosts.values()}
        links = {h.link for h in lab.hosts.values()}
        assert names <= set(_namespaces()) and links <= set(_links())
    assert not names & set(_namespaces()) and not links & set(_links())


def test_leftovers_of_a_dead_run_are_removed_with_what_runs_inside():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process id nobody uses now
    ns, link = f"{PREFIX}{dead}-old", f"{PREFIX}{dead}h0"
    ip("netns", "add", ns)
    ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
    inside = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # `ip netns exec` enters the namespace, then execs the command: wait until it is inside,
        # or the cleanup may find nothing to kill there yet (seen once in CI).
        wait_until(lambda: str(inside.pid) in ip("netns", "pids", ns).split(), 10, "the process to enter the namespace",
                   interval=0.02)
        removed = remove_leftovers()
        assert ns in removed
        assert inside.wait(timeout=10) != 0  # killed
        assert ns not in _namespaces() and link not in _links()
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait()


def test_a_lab_that_cannot_be_built_is_an_error_that_says_why():
    # Root without capabilities cannot make namespaces: NetLab must raise, naming the command and the cause.
    code = "from tests.support.netlab import NetLab\nwith NetLab() as lab:\n    lab.add_host('x')\n"
    proc = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "NetLabError: `ip netns add" in proc.stderr and "need root" in proc.stderr, proc.stderr
