"""The one upstream HTTP client: what to ask, retries, backoff, resume and validation.

One ``aiohttp.ClientSession`` per process (session.py, created in the app's
lifecycle); each attempt is one exchange (exchange.py: a parent or upstream,
redirects, breakers). Every response is validated (validate.py) before its
bytes are handed on; retryable faults are retried with full-jitter
exponential backoff under a shared retry budget (retry.py), and a body cut
short is resumed from the last byte received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from nwbcache.urls import AllowList, UpstreamURL, redact_url

from . import __version__
from .breaker import Breakers
from .conditional import if_match
from .errors import (
    ProxyError,
    RetryableFault,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .exchange import Exchange
from .metrics import Metrics
from .objectmeta import ObjectVersion
from .parents import Parents
from .retry import RetryBudget, RetryPolicy, RetryReason
from .validate import accept_range_response, version_from_headers
from .wire import Response, WireClient
from .wireconn import Sink

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = f"nwbcache/{__version__}"
# A stream that keeps making progress may be resumed more often than
# max_attempts, but never endlessly (a server cutting every body at 1 byte).
_MAX_RESUMES_FACTOR = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    """A small upstream answer passed on whole: its status, type and body."""

    status: int
    content_type: str
    body: bytes


class Upstream:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        wire: WireClient,
        allow: AllowList,
        policy: RetryPolicy,
        budget: RetryBudget,
        *,
        first_byte_timeout: float,
        metrics: Metrics,
        breakers: Breakers | None = None,
        parents: Parents | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.parents = parents if parents is not None else Parents([], "", group_bytes=1)
        self.breakers = breakers if breakers is not None else Breakers()
        exchange = Exchange(
            session,
            wire,
            allow,
            self.breakers,
            self.parents,
            first_byte_timeout=first_byte_timeout,
            metrics=metrics,
        )
        self._get = exchange.get
        self._ask = exchange.ask
        self._policy = policy
        self._budget = budget
        self._rng = rng
        self.metrics = metrics

    # -- public operations ---------------------------------------------------
    async def discover(
        self,
        url: UpstreamURL,
        first_len: int,
        *,
        authorization: str | None = None,
        revalidate: bool = False,
    ) -> tuple[ObjectVersion, bytes]:
        """Learn size and validators with a ranged GET of the first bytes.

        Presigned URLs refuse HEAD, so a GET of block 0 both tells the version
        and warms the first block. Returns the version and up to ``first_len``
        leading bytes. ``revalidate``: ask caches on the way (a parent) for
        upstream's word (``Cache-Control: no-cache``).
        """
        return await self._retrying(
            url, lambda: self._discover_once(url, first_len, authorization, revalidate)
        )

    async def fill(
        self,
        url: UpstreamURL,
        start: int,
        end: int,
        expected: ObjectVersion,
        sink: Sink,
        *,
        authorization: str | None = None,
    ) -> None:
        """Bytes [start, end) of ``expected``'s version into ``sink`` as they arrive
        (wireconn.Sink), resumed across faults from the first byte not received."""
        pos = start
        retries = 0
        tries = 0
        elsewhere = 0  # attempts that asked another source at once (a parent failed)
        cost = 0
        while pos < end:
            tries += 1
            progress_before = pos
            try:
                headers = {
                    "Range": f"bytes={pos}-{end - 1}",
                    **if_match(expected.etag, expected.last_modified),
                }
                async with self._get(url, headers, authorization, offset=pos) as resp:
                    accepted = accept_range_response(resp.status, resp.headers, pos, end, expected)
                    try:
                        await resp.deliver(sink, accepted.skip, accepted.length)
                    finally:
                        self.metrics.upstream_bytes.inc(resp.delivered)
                        pos += resp.delivered
                    if pos < end:
                        raise RetryableFault(
                            f"body ended at {pos}, {end - pos} bytes short",
                            reason=RetryReason.SHORT_BODY,
                        )
                self.metrics.upstream_requests.labels("ok").inc()
            except RetryableFault as fault:
                if pos > progress_before:
                    retries = 0  # progress was made: resume with a fresh count
                if tries >= self._policy.max_attempts * _MAX_RESUMES_FACTOR:
                    raise self._give_up(fault, url) from None
                if fault.elsewhere and elsewhere < len(self.parents.urls):
                    elsewhere += 1  # a parent failed: another source, at once (parents.py)
                    continue
                cost += await self._before_retry(fault, retries, url)
                retries += 1
        self._budget.record_success(cost)

    async def check(
        self,
        url: UpstreamURL,
        *,
        authorization: str | None,
        expected: ObjectVersion | None,
    ) -> None:
        """Whether upstream serves this object to this request: a GET of its first
        byte (``If-Match`` the version we hold). Returns if it does; raises
        UpstreamStatus (401, 403, 404...) if it refuses, VersionChanged if the
        object changed, or the fault that outlasted the retries."""
        headers = {"Range": "bytes=0-0"}
        if expected is not None:
            headers.update(if_match(expected.etag, expected.last_modified))

        async def attempt() -> None:
            async with self._get(url, headers, authorization):
                pass  # status checked by _get; the body (a byte) is not needed
            self.metrics.upstream_requests.labels("ok").inc()

        await self._retrying(url, attempt)

    async def revalidate(
        self, url: UpstreamURL, held: ObjectVersion, *, authorization: str | None
    ) -> ObjectVersion | None:
        """Whether upstream still has version ``held``: a conditional GET of the
        first byte (``If-None-Match``, else ``If-Modified-Since``), answered with
        304 and no body while it is. Returns None then, else what upstream has."""
        headers = {"Range": "bytes=0-0"}
        if held.etag:
            headers["If-None-Match"] = held.etag
        elif held.last_modified:
            headers["If-Modified-Since"] = held.last_modified

        async def attempt() -> ObjectVersion | None:
            async with self._get(url, headers, authorization, not_modified=True) as resp:
                if resp.status == 304:
                    found = None
                elif resp.status == 416:  # empty now (S3's answer to bytes=0-0)
                    found = None if held.size == 0 else ObjectVersion(0, None, None)
                else:
                    found = accept_range_response(resp.status, resp.headers, 0, 1, None).version
            self.metrics.upstream_requests.labels("ok").inc()
            return found

        found = await self._retrying(url, attempt)
        return None if found is None or found.same_version(held) else found

    async def is_public(self, url: UpstreamURL) -> bool:
        """Whether upstream serves the object without credentials (``url`` must
        carry none). False for 401/403; other refusals and faults raise."""
        try:
            await self.check(url, authorization=None, expected=None)
        except UpstreamStatus as exc:
            if exc.status in (401, 403):
                return False
            raise
        return True

    async def document(self, url: UpstreamURL, limit: int) -> Document:
        """A small answer that is not an object's bytes (an S3 listing), from
        upstream itself, whatever its status; 5xx, 429 and faults are retried.
        Raises UpstreamProtocolError past ``limit`` bytes."""

        async def attempt() -> Document:
            async with self._ask(url) as resp:
                body = bytearray()
                async for chunk, _ in resp.content.iter_chunks():
                    body += chunk
                    if len(body) > limit:
                        raise UpstreamProtocolError(f"upstream answered more than {limit} bytes")
                content_type = resp.headers.get("Content-Type", "application/xml")
            self.metrics.upstream_bytes.inc(len(body))
            self.metrics.upstream_requests.labels("ok").inc()
            return Document(resp.status, content_type, bytes(body))

        return await self._retrying(url, attempt)

    # -- one attempt -------------------------------------------------------
    async def _discover_once(
        self, url: UpstreamURL, first_len: int, authorization: str | None, revalidate: bool
    ) -> tuple[ObjectVersion, bytes]:
        headers = {"Range": f"bytes=0-{first_len - 1}"}
        if revalidate:
            headers["Cache-Control"] = "no-cache"
        async with self._get(url, headers, authorization) as resp:
            if resp.status == 416:
                return await self._discover_empty(url, resp, authorization)
            accepted = accept_range_response(resp.status, resp.headers, 0, first_len, None)
            data = await resp.read(accepted.skip, accepted.length)
            self.metrics.upstream_bytes.inc(len(data))
            if len(data) < accepted.length:
                raise RetryableFault("first block cut short", reason=RetryReason.SHORT_BODY)
            self.metrics.upstream_requests.labels("ok").inc()
            return accepted.version, data

    async def _discover_empty(
        self, url: UpstreamURL, resp: Response, authorization: str | None
    ) -> tuple[ObjectVersion, bytes]:
        # S3 answers 416 to `bytes=0-N` on an empty object; a plain GET then
        # gives 200 with the validators.
        if resp.headers.get("Content-Range", "") != "bytes */0":
            raise UpstreamProtocolError("upstream refused the first block with 416")
        resp.close()  # its connection is free (or closed) before another is asked for
        async with self._get(url, {}, authorization) as plain:
            if plain.status != 200 or plain.headers.get("Content-Length") != "0":
                raise RetryableFault(
                    "object changed while discovering it", reason=RetryReason.SERVER_ERROR
                )
            self.metrics.upstream_requests.labels("ok").inc()
            return version_from_headers(plain.headers, 0), b""

    # -- retry bookkeeping ---------------------------------------------------
    async def _retrying(self, url: UpstreamURL, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it succeeds, retrying RetryableFaults as the policy
        and the budget allow (a body that streams is resumed by ``stream``)."""
        retries = 0
        elsewhere = 0  # attempts that asked another source at once (a parent failed)
        cost = 0
        while True:
            try:
                result = await attempt()
            except RetryableFault as fault:
                if fault.elsewhere and elsewhere < len(self.parents.urls):
                    elsewhere += 1  # a parent failed: another source, at once (parents.py)
                    continue
                cost += await self._before_retry(fault, retries, url)
                retries += 1
                continue
            self._budget.record_success(cost)
            return result

    async def _before_retry(self, fault: RetryableFault, retries: int, url: UpstreamURL) -> int:
        """Sleep before the next attempt, or raise when attempts or budget are spent.
        Returns the budget cost taken."""
        self.metrics.upstream_requests.labels(fault.reason).inc()
        if not self._policy.should_retry(retries + 1):
            raise self._give_up(fault, url)
        reason = RetryReason(fault.reason)
        cost = self._budget.try_acquire(reason)
        if cost is None:
            raise self._give_up(fault, url, budget=True)
        self.metrics.upstream_retries.labels(fault.reason).inc()
        delay = self._policy.delay(retries, self._rng, fault.retry_after)
        log.info("retrying %s in %.2fs: %s", redact_url(url.url), delay, fault)
        await asyncio.sleep(delay)
        return cost

    def _give_up(
        self, fault: RetryableFault, url: UpstreamURL, *, budget: bool = False
    ) -> ProxyError:
        why = "retry budget exhausted" if budget else "retries exhausted"
        message = f"upstream {url.netloc} failed ({why}): {fault}"
        if fault.reason == RetryReason.TIMEOUT:
            return UpstreamTimeout(message)
        return UpstreamUnavailable(message)
