"""Parent caches (``--parent``): which parent to ask for a part of an object, which are up, and Via.

A child daemon (a node-local cache on a compute node, say) fetches its
misses from parent nwbcache daemons instead of upstream, the way Squid,
Traffic Server and XCache tier. Each group of ``--parent-group`` bytes of an
object has one parent, by rendezvous hashing (highest random weight) of the
object's cache key and the group's number: every child asks the same parent
for a group, so a hot large object spreads over all parents and each group
is fetched from upstream once; a parent leaving moves only its own groups,
each to its next-ranked parent.

A parent that fails (no connection, a timeout, a 5xx, or a refusal of its
own rather than upstream's) is skipped while its breaker is open: one
failure opens it for 2 s, doubling up to a minute, then one request probes
it. With no parent up, the child asks upstream itself.

Loops: requests to a parent carry ``Via``, the chain of daemons the
request that caused the fetch had passed, plus this one. A daemon that
finds its own id in a request's Via refuses it (508) and so does one past
MAX_HOPS. The chain reaches the fetch through a context variable
(``INBOUND_VIA``) that the HTTP layer sets for each request: fetch tasks
started while serving it inherit it (asyncio copies the context into tasks).
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from urllib.parse import urlsplit

from nwbcache.urls import UpstreamURL, cache_key, proxied_url

from .breaker import Breaker, Breakers

log = logging.getLogger(__name__)

# Daemons a request may have passed: a deeper chain is a loop of some shape.
MAX_HOPS = 8
# What a daemon answers a request that loops (errors.LoopDetected, RFC 5842).
LOOP_STATUS = 508
# The error-kind header a daemon sets on its own error responses (observe.py):
# a parent's answer without it, or with UPSTREAM_KIND, is upstream's answer
# passed on; any other kind is the parent's own failure or refusal.
ERROR_KIND_HEADER = "X-Nwbcache-Error"
UPSTREAM_KIND = "upstream"
# How this daemon marks its hop in Via, beside its id: "1.1 <id> (nwbcache)".
NWBCACHE_COMMENT = "(nwbcache)"
# The Via of the request being served: set by the HTTP layer, read by fetches.
INBOUND_VIA: contextvars.ContextVar[str] = contextvars.ContextVar("inbound_via", default="")


def new_node_id(name: str = "") -> str:
    """This daemon's id in Via: its --node-name (or "nwbcache") and a random
    suffix, new at every start, so two daemons never share one."""
    return f"{name or 'nwbcache'}-{secrets.token_hex(4)}"


def via_ids(via: str) -> list[str]:
    """The ids of the daemons a Via field value names (``1.1 <id>, 1.1 <id>``)."""
    ids = []
    for hop in via.split(","):
        parts = hop.split()
        if len(parts) >= 2:
            ids.append(parts[1])
    return ids


def loops(via: str, node_id: str) -> bool:
    """Whether a request with this Via has passed this daemon already, or too many."""
    ids = via_ids(via)
    return node_id in ids or len(ids) >= MAX_HOPS


def parent_unwell(status: int) -> bool:
    """A parent's answer that says it (or its way upstream) is in trouble: a 5xx
    (but 508, a refusal) or 429. It is skipped for a while (its breaker opens)."""
    return (status >= 500 and status != LOOP_STATUS) or status == 429


def parents_own(status: int, headers: Mapping[str, str]) -> bool:
    """A parent's error of its own, not upstream's passed on (no error kind
    saying so): for a 4xx or a 508, a refusal of this request (a host it does
    not allow, a loop). The request asks elsewhere; the parent stays in
    rotation for others."""
    return status >= 400 and headers.get(ERROR_KIND_HEADER) != UPSTREAM_KIND


def from_nwbcache(via: str) -> bool:
    """Whether a Via names an nwbcache daemon (it asks as a child: parents.py)."""
    return any(NWBCACHE_COMMENT in hop for hop in via.split(","))


def _on_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def rank(parents: Sequence[str], key: str, group: int) -> list[int]:
    """Parent indices by rendezvous weight for (object, group), highest first."""

    def weight(i: int) -> bytes:
        text = f"{parents[i]}\n{key}\n{group}".encode("utf-8", "surrogateescape")
        return hashlib.blake2b(text, digest_size=8).digest()

    return sorted(range(len(parents)), key=weight, reverse=True)


class Parents:
    def __init__(
        self,
        urls: Sequence[str],
        node_id: str,
        *,
        group_bytes: int,
        on_result: Callable[[str, str], None] = lambda _parent, _outcome: None,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        for url in self.urls:
            if url.startswith("http://") and not _on_loopback(urlsplit(url).hostname or ""):
                log.warning(
                    "parent %s is plain HTTP: the signatures and Authorization of private "
                    "objects' requests travel to it unencrypted (use https://, or keep "
                    "the tiers on a trusted network)",
                    url,
                )
        self.node_id = node_id
        self.group_bytes = group_bytes
        # (parent's index as a str, "ok" | "failed" | "refused") per request
        self._on_result = on_result
        # Keyed by the parent's index as a str.
        self._breakers = Breakers(make=lambda: Breaker(threshold=1, max_cooldown=60.0))

    def __bool__(self) -> bool:
        return bool(self.urls)

    def choose(self, url: UpstreamURL, offset: int, skip: Collection[int] = ()) -> int | None:
        """The parent to ask for the byte at ``offset`` of ``url``'s object (an
        index into ``urls``), or None to ask upstream: no parent is up (or every
        one is in ``skip``: passed over for this request)."""
        for i in rank(self.urls, cache_key(url), offset // self.group_bytes):
            if i not in skip and self._breakers.before(str(i)) is None:
                return i
        return None

    def target(self, parent: int, url: UpstreamURL) -> str:
        """The URL that asks parent ``parent`` for ``url`` (query and signature kept:
        the parent checks them upstream)."""
        return proxied_url(url.url, self.urls[parent])

    def via(self) -> str:
        """The Via to send: the served request's chain, then this daemon."""
        inbound = INBOUND_VIA.get()
        mine = f"1.1 {self.node_id} {NWBCACHE_COMMENT}"
        return f"{inbound}, {mine}" if inbound else mine

    def record(self, parent: int, *, ok: bool) -> None:
        """How a request to parent ``parent`` went: a failure skips it for a while."""
        self._breakers.record(str(parent), ok=ok)
        self._on_result(str(parent), "ok" if ok else "failed")

    def refused(self, parent: int) -> None:
        """Parent ``parent`` refused one request itself: it stays in rotation."""
        self._on_result(str(parent), "refused")

    def down(self) -> list[str]:
        """The parents being skipped now."""
        return [self.urls[int(i)] for i in self._breakers.states()]
