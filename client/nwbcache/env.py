"""The client's settings, read from the environment when they are used.

Read at call time rather than at import, so a notebook can set
``os.environ["NWBCACHE_URL"]`` after importing and tests need not patch
globals. Parsing is cached per distinct set of values, so the hot path (every
fsspec request asks) costs a few dictionary lookups.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from .urls import DANDI_HOSTS, ENV_VAR, AllowList

__all__ = [
    "ENV_FALLBACK",
    "ENV_HOSTS",
    "ENV_URL",
    "ClientSettings",
    "current",
    "fallback_enabled",
    "split_entries",
]

ENV_URL = ENV_VAR  # NWBCACHE_URL: the daemon's base URL
ENV_HOSTS = "NWBCACHE_HOSTS"  # upstreams transparent mode sends through the daemon
ENV_FALLBACK = "NWBCACHE_FALLBACK"  # "0": fail when the daemon is down instead of going direct

_FALSE = frozenset({"0", "false", "no", "off"})


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSettings:
    proxy: str | None  # NWBCACHE_URL as given, None when unset or blank
    hosts: AllowList  # parsed NWBCACHE_HOSTS, DANDI_HOSTS by default


def split_entries(text: str) -> tuple[str, ...]:
    """``"a b,c"`` -> ``("a", "b", "c")``: the daemon's --allow-upstream list syntax."""
    return tuple(text.replace(",", " ").split())


def fallback_enabled() -> bool:
    """NWBCACHE_FALLBACK: unless "0" (or false/no/off), read upstream when the daemon is down."""
    return _fallback(os.environ.get(ENV_FALLBACK, ""))


def current() -> ClientSettings:
    """Where transparent mode sends what. Raises InvalidURL for a malformed NWBCACHE_HOSTS."""
    return _parse(os.environ.get(ENV_URL, ""), os.environ.get(ENV_HOSTS))


@functools.lru_cache(maxsize=16)
def _parse(proxy: str, hosts: str | None) -> ClientSettings:
    entries = DANDI_HOSTS if hosts is None or not hosts.strip() else split_entries(hosts)
    return ClientSettings(proxy=proxy.strip() or None, hosts=AllowList.parse(entries))


def _fallback(text: str) -> bool:
    return text.strip().lower() not in _FALSE
