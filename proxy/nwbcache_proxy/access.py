"""Who may read a private object: each request's credentials checked with upstream, successes
remembered per credential.

An object is private when upstream refuses it without credentials (versions.py
finds out when a request with credentials discovers it, or when upstream
starts refusing an object believed public: embargo can come after release).
The cache holds one copy of its bytes for everyone, so before any of them,
or any header about them, goes to a request, the request's own credentials
are shown to upstream with a minimal request (its first byte, ``If-Match``
the cached ETag). A success is remembered by a fingerprint of the
credentials (never the credentials) until they expire or CHECK_MEMORY
passes, whichever is first; a refusal for REFUSAL_MEMORY only, so a
credential that was just issued, or an object just released, is not turned
away for long. Requests without credentials are checked too, under their
shared fingerprint: once an embargo is lifted they are let through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nwbcache.urls import UpstreamURL, redact_url

from .credentials import Credentials
from .errors import NotCached, UpstreamStatus, VersionChanged
from .lru import BoundedLRU
from .metrics import Metrics
from .upstream import Upstream
from .version import Version

log = logging.getLogger(__name__)

# How long an accepted credential is trusted without asking upstream again.
CHECK_MEMORY = 300.0
# How long a refusal is remembered: long enough that a script retrying in a
# loop does not turn into a stream of upstream requests, short enough that a
# fresh credential or a released embargo is honoured at once.
REFUSAL_MEMORY = 5.0
# Credentials remembered per process.
CREDENTIALS_MEMORY = 50_000


class Access:
    def __init__(
        self,
        upstream: Upstream,
        *,
        metrics: Metrics,
        on_version_changed: Callable[[Version], Awaitable[None]],
    ) -> None:
        self.upstream = upstream
        self._on_version_changed = on_version_changed
        self._accepted: BoundedLRU[str, float] = BoundedLRU(CREDENTIALS_MEMORY)
        # fingerprint -> (until, status, message) of a refusal
        self._refused: BoundedLRU[str, tuple[float, int, str]] = BoundedLRU(CREDENTIALS_MEMORY)
        self._checking: dict[str, asyncio.Task[None]] = {}
        self._results = {
            result: metrics.auth_checks.labels(result)
            for result in ("accepted", "refused", "error")
        }

    def accepted(self, v: Version, creds: Credentials) -> bool:
        """Whether these credentials are known, now, to read this private object."""
        until = self._accepted.get(creds.fingerprint(v.key))
        return until is not None and until > time.time()

    def refusal(self, v: Version, creds: Credentials) -> UpstreamStatus | None:
        """Upstream's refusal of these credentials for this object, if it is
        remembered (a few seconds)."""
        refused = self._refused.get(creds.fingerprint(v.key))
        if refused is not None and refused[0] > time.time():
            return UpstreamStatus(refused[2], status=refused[1])
        return None

    def remember_refused(self, v: Version, creds: Credentials, exc: UpstreamStatus) -> None:
        """Upstream refused these credentials for this object (a discovery)."""
        until = time.time() + REFUSAL_MEMORY
        self._refused.put(creds.fingerprint(v.key), (until, exc.status, exc.message))

    def remember_accepted(self, v: Version, creds: Credentials) -> None:
        """Upstream just served this object to these credentials (a discovery)."""
        now = time.time()
        expires = creds.expires_at()
        until = now + CHECK_MEMORY if expires is None else min(now + CHECK_MEMORY, expires)
        if until > now:
            fingerprint = creds.fingerprint(v.key)
            self._accepted.put(fingerprint, until)
            self._refused.pop(fingerprint)

    async def authorize(
        self, v: Version, url: UpstreamURL, creds: Credentials, *, offline: bool = False
    ) -> None:
        """Return if the request may read ``v``; raise upstream's refusal otherwise.

        ``url`` is the request's upstream URL (its presigned query included).
        Raises UpstreamStatus (401, 403, ...), VersionChanged (after dropping
        ``v``) or the upstream fault that made the check impossible; with
        ``offline`` (only-if-cached), NotCached where upstream would be asked.
        """
        if v.private is False:
            return
        fingerprint = creds.fingerprint(v.key)
        now = time.time()
        until = self._accepted.get(fingerprint)
        if until is not None and until > now:
            return
        refusal = self.refusal(v, creds)
        if refusal is not None:
            raise refusal
        if offline:
            raise NotCached("a private object, and these credentials are not known to be good")
        task = self._checking.get(fingerprint)
        if task is None:
            task = asyncio.ensure_future(self._check(v, url, creds, fingerprint))
            self._checking[fingerprint] = task
            task.add_done_callback(lambda _t: self._checking.pop(fingerprint, None))
        # shield: a client hanging up must not cancel a check others wait on.
        await asyncio.shield(task)

    async def _check(
        self, v: Version, url: UpstreamURL, creds: Credentials, fingerprint: str
    ) -> None:
        try:
            await self.upstream.check(url, authorization=creds.authorization, expected=v.remote)
        except UpstreamStatus as exc:
            if exc.status in (401, 403):
                self._results["refused"].inc()
                self.remember_refused(v, creds, exc)
                log.info("upstream refused a request for private %s", redact_url(url.url))
            else:
                self._results["error"].inc()
            raise
        except VersionChanged:
            self._results["error"].inc()
            await self._on_version_changed(v)
            raise
        except Exception:
            self._results["error"].inc()
            raise
        self._results["accepted"].inc()
        self.remember_accepted(v, creds)
