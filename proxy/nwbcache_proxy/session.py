"""The HTTP clients for upstream and parents: their pools, timeouts, and bytes as stored.

An object's bytes come on wire.py's connections (received straight into
block buffers); everything else (listings, DANDI's API) on aiohttp's session.
"""

from __future__ import annotations

import aiohttp

from .metrics import Metrics
from .upstream import USER_AGENT
from .wire import WireClient

# identity: a server that compresses on the fly would change the bytes and
# make Content-Range count compressed ones.
HEADERS = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}


def make_wire(
    *, max_connections: int, connect_timeout: float, read_timeout: float, metrics: Metrics
) -> WireClient:
    connections = metrics.upstream_connections
    return WireClient(
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        headers=HEADERS,
        on_connection=lambda how: connections.labels(how).inc(),
    )


def make_session(
    *, max_connections: int, connect_timeout: float, read_timeout: float
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=max_connections,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout, sock_read=read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=HEADERS,
        auto_decompress=False,  # bytes must reach the cache exactly as stored upstream
        raise_for_status=False,
        read_bufsize=1024 * 1024,  # reading pauses at 2x: 64 KiB paused it at every recv
        trust_env=False,  # an HTTP(S)_PROXY in the daemon's env must not reroute upstream reads
    )
