"""The process's limit of open files: raised to what the system allows, and the share of it that
WebSocket connections may take.

A Linux service usually starts with a soft limit of 1024 open files (the hard limit is far
higher), which would stop a gateway at about a thousand clients with EMFILE: new connections
reset, and the gateway's own sockets (PostgreSQL, MongoDB, Kafka, the JWKS fetch) and files
failing with them. The Go runtime raises its soft limit to the hard one at start for the same
reason; so does `rtserver serve`.
"""

from __future__ import annotations

import resource

# Kept for what is not a client connection: change feeds, Kafka, JWKS fetches, state files, HTTP
# requests in progress. With a small limit, half of it.
RESERVED = 1024


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard limit (open_files_limit says the result)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # the soft limit stays; limits.max_node_connections follows it


def open_files_limit() -> int:
    """The soft limit of open files now (-1: unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -1 if soft == resource.RLIM_INFINITY else soft


def connection_share(configured: int, kept: int = 0) -> int:
    """limits.max_node_connections: `configured`, or for 0 the open-files limit less what the
    gateway keeps for itself (RESERVED and `kept`, the change feeds' sockets a configuration
    may open on demand; or half of a small limit)."""
    if configured > 0:
        return configured
    soft = open_files_limit()
    if soft < 0:
        return 1 << 30
    return max(1, soft - RESERVED - kept, soft // 2)


def socket_share(connections: int, kept: int = 0) -> int:
    """Client sockets of any kind (WebSocket, HTTP, not yet upgraded) the node holds at most:
    `connections` (limits.max_node_connections) and half of RESERVED more for the HTTP ones
    beside them (probes, publishers, upgrades under way), within the open-files limit less
    that half (a quarter of a small limit) and `kept`. Idle or half-sent HTTP connections, which
    the WebSocket limit does not count, must not take what is kept for the gateway's own use."""
    share = connections + RESERVED // 2
    soft = open_files_limit()
    return share if soft < 0 else min(share, max(1, soft - min(RESERVED // 2, soft // 4) - kept))
