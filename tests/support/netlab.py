"""Hosts as Linux network namespaces on this machine, for tests where Redis and the workers must
be separate hosts with their own addresses.

Why: on one loopback every process shares one network, so a "host cut off from Redis" cannot be
told from "Redis down". Here each host is a namespace joined to the root namespace (the test's
own host: the producer, the fake VLM, the proxies) by its own veth pair, with addresses in
10.231.<n>.0/24: link ``i`` is 10.231.<n>.<4i>/30, the root side ``.4i+1``, the host ``.4i+2``.
Hosts get no default route, only routes we add to root-side addresses, and the root namespace
forwards nothing (``net.ipv4.ip_forward`` is left as it is, 0 here): no packet leaves this
machine, and a worker host can reach Redis only through the path the test gives it.

Names carry the creating process id (``rxn<pid>-<host>`` for namespaces, ``rxn<pid>h<i>`` for
root-side links), so a run that crashed leaves names the next run recognises and deletes, with
the processes still inside them, before it builds its own. Needs root and iproute2's ``ip``; a
lab that cannot be built raises ``NetLabError`` (tests fail, never skip).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

PREFIX = "rxn"
NET = "10.231"
_NS_NAME = re.compile(rf"^{PREFIX}(\d+)-\S+$")
_LINK_NAME = re.compile(rf"^{PREFIX}(\d+)h\d+$")


class NetLabError(RuntimeError):
    """A namespace, link or address could not be made (not root, no ``ip``, kernel refused)."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    addr: str  # this host's address, inside its namespace
    gateway: str  # the root namespace's address on this host's link
    link: str  # the root-side interface

    def prefix(self) -> list[str]:
        """Run a command on this host: ``[*host.prefix(), "redis-server", ...]``."""
        return ["ip", "netns", "exec", self.netns]


def ip(*args: str) -> str:
    """Run ``ip ARGS``; a failure is a ``NetLabError`` that names the command and ip's message."""
    exe = shutil.which("ip")
    if exe is None:
        raise NetLabError("iproute2's `ip` is not installed (Debian: apt-get install iproute2); "
                          "the cross-host tests need it and root")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetLabError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()} -- network "
                          "namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
                          + ("" if os.geteuid() == 0 else f"; this process runs as uid {os.geteuid()}"))
    return proc.stdout


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_inside(netns: str) -> None:
    """SIGKILL the processes a lab started in ``netns`` (by their ids, from ``ip netns pids``)."""
    with contextlib.suppress(NetLabError):
        for pid in ip("netns", "pids", netns).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _links() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[:@]", ip("-o", "link", "show"), re.M)]


def remove_leftovers() -> list[str]:
    """Delete the namespaces and links of labs whose process is gone; returns their names."""
    gone = []
    for ns in _namespaces():
        m = _NS_NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            _kill_inside(ns)
            with contextlib.suppress(NetLabError):
                ip("netns", "del", ns)
                gone.append(ns)
    for link in _links():
        m = _LINK_NAME.match(link)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(NetLabError):
                ip("link", "del", link)
                gone.append(link)
    return gone


def _free_subnet() -> int:
    """A third octet n with no address in 10.231.n.0/24 on this machine's root namespace."""
    used = {int(m.group(1)) for m in re.finditer(rf"inet {re.escape(NET)}\.(\d+)\.", ip("-o", "-4", "addr"))}
    start = os.getpid() % 250
    for k in range(250):
        n = 1 + (start + k) % 250
        if n not in used:
            return n
    raise NetLabError(f"no free {NET}.n.0/24 subnet left on this machine")


class NetLab:
    """A few hosts (network namespaces) linked to the root namespace; all removed on ``close``.

    ``with NetLab() as lab: redis_host = lab.add_host("redis")``. Use it as a context manager or
    call ``close()`` in a finalizer: it kills what runs in its namespaces and deletes them, and
    it is safe to call twice.
    """

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self.subnet: int | None = None
        self.removed_leftovers: list[str] = []

    def __enter__(self) -> NetLab:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        # Our own names from an earlier run in this process (pid reuse) are leftovers too.
        for ns in _namespaces():
            if ns.startswith(f"{self.tag}-"):
                _kill_inside(ns)
                ip("netns", "del", ns)
        for link in _links():
            if _LINK_NAME.match(link) and link.startswith(f"{self.tag}h"):
                ip("link", "del", link)
        self.removed_leftovers = remove_leftovers()
        self.subnet = _free_subnet()

    def add_host(self, name: str) -> Host:
        """A namespace ``rxn<pid>-<name>`` with loopback up and one veth link to the root namespace."""
        if self.subnet is None:
            raise NetLabError("NetLab.add_host before open()")
        if not re.fullmatch(r"[a-z0-9]{1,8}", name) or name in self.hosts:
            raise NetLabError(f"host name {name!r}: 1-8 lowercase letters/digits, unique in the lab")
        i = len(self.hosts)
        if i >= 63:
            raise NetLabError("a lab holds at most 63 hosts")
        net = ipaddress.ip_network(f"{NET}.{self.subnet}.{4 * i}/30")
        gateway, addr = (str(a) for a in list(net.hosts())[:2])
        netns, link = f"{self.tag}-{name}", f"{self.tag}h{i}"
        if len(link) > 15:
            raise NetLabError(f"interface name {link!r} is longer than 15 characters")
        ip("netns", "add", netns)
        host = Host(name, netns, addr, gateway, link)
        self.hosts[name] = host  # from here on close() removes it, whatever fails next
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("addr", "add", f"{gateway}/30", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", netns, "addr", "add", f"{addr}/30", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        return host

    def route(self, host: Host, to: str) -> None:
        """Let ``host`` reach one root-namespace address ``to`` (e.g. the fake VLM's), via its link.
        The root namespace owns ``to``, so it answers without forwarding anything."""
        ip("-n", host.netns, "route", "add", f"{to}/32", "via", host.gateway)

    def close(self) -> None:
        for host in reversed(list(self.hosts.values())):
            _kill_inside(host.netns)
            with contextlib.suppress(NetLabError):
                ip("netns", "del", host.netns)  # takes the veth pair with it
            if host.link in _links():
                with contextlib.suppress(NetLabError):
                    ip("link", "del", host.link)
        self.hosts.clear()
