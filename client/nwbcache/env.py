"""The client's settings, read from the environment when they are used.

This module owns every ``NWBCACHE_*`` variable the client reads: the names
and the reading. Other modules call the functions here; none reads
``os.environ`` for an ``NWBCACHE_*`` name itself. The one other reader, on
purpose, is the ``nwbcache-transparent.pth`` line, which runs at every
interpreter start and checks ``os.environ.get("NWBCACHE_URL")`` itself so that
a process without it pays one lookup and imports nothing (see
:mod:`nwbcache.transparent`); keep its spelling in step with :data:`ENV_URL`.
For the same reason ``transparent.install`` reads :data:`ENV_S3_ENV` itself.
The daemon's own ``NWBCACHE_<FLAG>`` settings are read by
``nwbcache_proxy.config``; :data:`ENV_CACHE_DIR` is here because ``nwbcache
check`` finds the cache the way ``serve`` does.

Read at call time rather than at import, so a notebook can set
``os.environ["NWBCACHE_URL"]`` after importing and tests need not patch
globals. Values come back as text: parsing them is the job of their users
(:mod:`nwbcache.patches` parses NWBCACHE_HOSTS once per distinct value).

Standard library only and no other module of this package: everything else
may import this one.
"""

from __future__ import annotations

import os

__all__ = [
    "DEFAULT_DAEMON_URL",
    "ENV_CACHE_DIR",
    "ENV_FALLBACK",
    "ENV_HOSTS",
    "ENV_OFFLINE",
    "ENV_S3_ENV",
    "ENV_S3_URL",
    "ENV_URL",
    "cache_dir",
    "environ_with_proxy",
    "fallback_enabled",
    "hosts",
    "offline",
    "proxy",
    "s3_env",
    "s3_url",
    "split_entries",
]

ENV_URL = "NWBCACHE_URL"  # the daemon's base URL (also spelled out in nwbcache-transparent.pth)
ENV_HOSTS = "NWBCACHE_HOSTS"  # upstreams transparent mode sends through the daemon
ENV_FALLBACK = "NWBCACHE_FALLBACK"  # "0": fail when the daemon is down instead of going direct
ENV_OFFLINE = "NWBCACHE_OFFLINE"  # "1": read only what the daemon has cached (only-if-cached)
ENV_CACHE_DIR = "NWBCACHE_CACHE_DIR"  # serve's --cache-dir, for `nwbcache check`
ENV_S3_URL = "NWBCACHE_S3_URL"  # the daemon's S3 endpoint as clients reach it (default: asked)
ENV_S3_ENV = "NWBCACHE_S3_ENV"  # "1": transparent mode sets AWS_ENDPOINT_URL_S3 & co. too

# Where `nwbcache status` looks when neither --url nor NWBCACHE_URL says:
# `nwbcache serve`'s default --host and --port.
DEFAULT_DAEMON_URL = "http://127.0.0.1:8080"

_FALSE = frozenset({"0", "false", "no", "off"})
_TRUE = frozenset({"1", "true", "yes", "on"})


def split_entries(text: str) -> tuple[str, ...]:
    """``"a b,c"`` -> ``("a", "b", "c")``: the daemon's --allow-upstream list syntax."""
    return tuple(text.replace(",", " ").split())


def proxy() -> str | None:
    """NWBCACHE_URL, stripped; None when unset or blank."""
    return os.environ.get(ENV_URL, "").strip() or None


def environ_with_proxy(base: str) -> dict[str, str]:
    """This process's environment with NWBCACHE_URL set to ``base``, for a child process."""
    return {**os.environ, ENV_URL: base}


def fallback_enabled() -> bool:
    """NWBCACHE_FALLBACK: unless "0" (or false/no/off), read upstream when the daemon is down."""
    return _fallback(os.environ.get(ENV_FALLBACK, ""))


def offline() -> bool:
    """NWBCACHE_OFFLINE: "1" (or true/yes/on) to read only what the daemon has cached."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in _TRUE


def cache_dir() -> str | None:
    """NWBCACHE_CACHE_DIR; None when unset or empty."""
    return os.environ.get(ENV_CACHE_DIR) or None


def s3_url() -> str | None:
    """NWBCACHE_S3_URL, stripped; None when unset or blank."""
    return os.environ.get(ENV_S3_URL, "").strip() or None


def s3_env() -> bool:
    """NWBCACHE_S3_ENV: "1" (or true/yes/on) to point every S3 client of the process
    at the daemon's S3 endpoint, not only reads of its buckets."""
    return os.environ.get(ENV_S3_ENV, "").strip().lower() in _TRUE


def hosts() -> str | None:
    """NWBCACHE_HOSTS as given (an --allow-upstream list), None when unset or blank."""
    value = os.environ.get(ENV_HOSTS)
    return value if value is not None and value.strip() else None


def _fallback(text: str) -> bool:
    return text.strip().lower() not in _FALSE
