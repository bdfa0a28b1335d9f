"""Loopback ports for the servers the tests start (gateways, PostgreSQL, Kafka).

A port from bind(0) comes from the kernel's ephemeral range, where it also takes the local
ports of outgoing connections: between the pick and the server's bind (seconds for Kafka; a
restarted gateway or broker binds its port again), any client connection of the run could
take it, and the server failed with "Address already in use" (a Kafka broker did so in a run of
several test processes). Ports below that range are never taken so: picked at random there and
checked free, two picks must meet on one port within moments to clash. A port is also never
handed out twice by one process, and each pytest-xdist worker picks from its own slice of the
range: a broker stopped for an outage test leaves its ports unbound, and a gateway picked one of
them before the broker came back (the broker then failed to bind it)."""

from __future__ import annotations

import os
import random
import socket

_LOWEST = 20000  # below: ports of well-known services more likely to be in use


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        # As servers bind theirs: a port whose last connection is in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_handed_out: set[int] = set()


def _slice() -> tuple[int, int]:
    """This process's part of the ports below the ephemeral range: all of it, or one worker's
    share of it under pytest-xdist."""
    low, top = _LOWEST, _ephemeral_start()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        size = (top - low) // count
        low += int(worker[2:]) % count * size
        top = low + size
    return low, top


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1, outside the ephemeral range when it leaves room."""
    low, top = _slice()
    if top - low < 500:
        return _kernel_ports(n)
    if len(_handed_out) > (top - low) // 2:
        _handed_out.clear()  # a very long run: reuse rather than search a crowded slice
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(low, top)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            ports.append(port)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def _kernel_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
