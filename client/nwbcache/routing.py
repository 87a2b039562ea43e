"""Whether to read through the daemon or straight from upstream.

A lab laptop off the lab network, or a daemon that is being restarted, must
not make every notebook fail: when the daemon cannot be reached the client
warns once and reads upstream directly, unless ``NWBCACHE_FALLBACK=0`` asks
for an error instead (for jobs that must never bypass the cache and hit S3).

Reachability is checked once per process and daemon with a short TCP connect
and remembered, so the check costs nothing after the first file. A daemon
that goes away later is not noticed: the readers' own retries then fail.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import warnings
from urllib.parse import urlsplit

from . import env
from .urls import _DEFAULT_PORTS, _proxy, parse_upstream_url, proxied_url

__all__ = [
    "CONNECT_TIMEOUT",
    "DaemonUnavailable",
    "FallbackWarning",
    "choose",
    "daemon_reachable",
    "forget",
    "route",
]

# Long enough for a daemon on the lab network, short enough that a notebook
# whose daemon is down opens its first file without a noticeable stall
# (a refused loopback connect fails at once anyway).
CONNECT_TIMEOUT = 1.0


class DaemonUnavailable(ConnectionError):
    """The daemon cannot be reached and NWBCACHE_FALLBACK=0 forbids reading upstream."""


class FallbackWarning(RuntimeWarning):
    """Reading straight from upstream because the daemon cannot be reached."""


_lock = threading.Lock()
# base URL -> (pid, reachable, reason): keyed by pid too, so a forked worker
# checks for itself instead of trusting its parent's answer.
_checked: dict[str, tuple[int, bool, str]] = {}
_warned: set[tuple[int, str]] = set()


def _probe(base: str) -> str:
    """Why a TCP connection to the daemon at ``base`` fails; "" when it opens."""
    parts = urlsplit(base)
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS[parts.scheme]  # base is http(s): _proxy checked
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return ""
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _status(base: str) -> tuple[bool, str]:
    pid = os.getpid()
    with _lock:
        known = _checked.get(base)
        if known is not None and known[0] == pid:
            return known[1], known[2]
    reason = _probe(base)  # outside the lock: at most CONNECT_TIMEOUT, never twice in a row
    with _lock:
        _checked[base] = (pid, not reason, reason)
    return not reason, reason


@functools.lru_cache(maxsize=64)
def _base(proxy: str) -> str:
    """The normalised base URL of a proxy setting (InvalidURL if malformed)."""
    return _proxy(proxy).base


def _given(proxy: str | None) -> str:
    # NWBCACHE_URL is read at call time so it can be set after import.
    return (env.proxy() or "") if proxy is None else proxy


def daemon_reachable(proxy: str | None = None) -> bool:
    """Whether the daemon (``proxy``, default ``$NWBCACHE_URL``) accepts connections.

    The answer is remembered for the life of the process.
    """
    return _status(_base(_given(proxy)))[0]


def forget() -> None:
    """Drop the remembered reachability answers and warnings (tests, long-lived kernels)."""
    with _lock:
        _checked.clear()
        _warned.clear()


def route(url: str, proxy: str | None = None) -> str:
    """The URL to read ``url`` from: through the daemon when it answers, else upstream.

    ``proxy`` defaults to ``$NWBCACHE_URL``. When the daemon cannot be reached,
    warns once (FallbackWarning) and returns the upstream URL, or raises
    DaemonUnavailable when ``NWBCACHE_FALLBACK=0``. Raises InvalidURL for a
    malformed ``url`` or ``proxy``.
    """
    proxy = _given(proxy)
    # Both validated before anything is decided.
    return choose(proxied_url(url, proxy), parse_upstream_url(url).url, proxy)


def choose(through_daemon: str, upstream: str, proxy: str) -> str:
    """``through_daemon`` if the daemon at ``proxy`` answers, else as :func:`route` says."""
    base = _base(proxy)
    reachable, reason = _status(base)
    if reachable:
        return through_daemon
    if env.offline() or not env.fallback_enabled():
        why = (
            f"{env.ENV_OFFLINE}=1 reads only what the daemon holds"
            if env.offline()
            else f"{env.ENV_FALLBACK}=0 forbids reading upstream directly"
        )
        raise DaemonUnavailable(
            f"nwbcache: the daemon at {base} cannot be reached ({reason}) and {why}; "
            f"start it (nwbcache serve) or unset {env.ENV_URL}"
        )
    key = (os.getpid(), base)
    with _lock:
        first = key not in _warned
        _warned.add(key)
    if first:
        warnings.warn(
            f"nwbcache: the daemon at {base} cannot be reached ({reason}); reading "
            f"straight from upstream, uncached. Set {env.ENV_FALLBACK}=0 to fail instead.",
            FallbackWarning,
            stacklevel=3,
        )
    return upstream
