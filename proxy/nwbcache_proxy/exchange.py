"""One GET for the upstream client: to a parent or upstream, redirects, breakers, and faults.

upstream.py decides what to ask and retries; this asks once. A parent
(parents.py) is asked while one is up for the byte wanted, and one that fails
is passed over at once. Upstream is asked with redirects followed only to
allow-listed hosts, under its host's circuit breaker (breaker.py). Every
fault that is worth another attempt becomes a RetryableFault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol, TypeVar
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from nwbcache.urls import AllowList, InvalidURL, UpstreamURL, parse_upstream_url

from .breaker import Breakers
from .errors import (
    BadRequest,
    NotAllowed,
    RetryableFault,
    UpstreamDown,
    UpstreamProtocolError,
)
from .httphead import HeadError
from .metrics import Metrics
from .parents import Parents, parent_unwell, parents_own
from .retry import RetryReason, parse_retry_after, reason_for_status
from .validate import check_status
from .wire import ConnectFailed, Response, WireClient
from .wireconn import WireError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# A parent's first byte may wait for its own upstream request and retries:
# it gets this many times --first-byte-timeout before it is taken for dead.
PARENT_PATIENCE = 2
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _Answer(Protocol):
    """What both clients' responses have: an object's bytes come on wire.py's
    connections, listings on aiohttp's."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def close(self) -> None: ...


A = TypeVar("A", bound=_Answer)


class Exchange:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        wire: WireClient,
        allow: AllowList,
        breakers: Breakers,
        parents: Parents,
        *,
        first_byte_timeout: float,
        metrics: Metrics,
    ) -> None:
        self._session = session
        self._wire = wire
        self._allow = allow
        self.breakers = breakers
        self.parents = parents
        self._first_byte_timeout = first_byte_timeout
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def get(
        self,
        url: UpstreamURL,
        headers: dict[str, str],
        authorization: str | None = None,
        *,
        not_modified: bool = False,
        offset: int = 0,
    ) -> AsyncIterator[Response]:
        """GET from the parent (parents.py) of the byte at ``offset`` while one is up,
        else from upstream, with redirects followed only to allowed hosts; faults
        mapped to RetryableFault. A parent that fails is passed over at once, for
        the next or upstream: no backoff and no retry budget is spent on it.

        ``authorization``: the client's Authorization header, sent to ``url``'s
        host (or a parent, which has it checked there) only: a redirect elsewhere
        drops it, as browsers and curl do.
        ``not_modified``: a 304 is an answer (a revalidation), not an error.
        """
        passed: set[int] = set()  # parents that refused this request
        while self.parents and (parent := self.parents.choose(url, offset, passed)) is not None:
            resp = await self._ask_parent(parent, url, headers, authorization)
            if resp is None:
                passed.add(parent)
                continue
            if resp.status == 412:
                # The parent holds another version than ours: upstream's word
                # decides whether ours changed (a parent may be behind).
                resp.release()
                break
            try:
                async with self._answer(resp, not_modified):
                    yield resp
            except RetryableFault as fault:  # cut mid-body: the next attempt asks another
                self.parents.record(parent, ok=False)
                fault.elsewhere = True
                raise
            return
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            sent = headers
            if (
                authorization is not None
                and current.netloc == url.netloc
                and current.scheme == url.scheme  # never in the clear after https
            ):
                sent = {**headers, "Authorization": authorization}
            resp = await self._send(current, sent)
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                location = resp.headers["Location"]
                resp.release()
                current = self._redirect_target(current, location)
                continue
            async with self._answer(resp, not_modified):
                yield resp
            return
        raise UpstreamProtocolError(f"more than {MAX_REDIRECTS} redirects")

    @contextlib.asynccontextmanager
    async def ask(self, url: UpstreamURL) -> AsyncIterator[aiohttp.ClientResponse]:
        """One GET of ``url`` from upstream itself, for what is not an object's
        bytes (an S3 listing): never a parent, no redirect followed. 5xx and 429
        are RetryableFault; any other status is the caller's to read."""
        resp = await self._send_session(url)
        async with self._answer(resp, passthrough=True):
            yield resp

    async def _send(self, current: UpstreamURL, sent: dict[str, str]) -> Response:
        """A GET of an object's bytes, on a wire.py connection (see ``_guarded``)."""
        return await self._guarded(current, lambda: self._wire_get(current.url, sent))

    async def _wire_get(self, url: str, sent: dict[str, str]) -> Response:
        try:
            return await self._wire.get(url, sent)
        except ValueError as exc:  # a header that would split the request (the client's)
            raise BadRequest(f"this request cannot be sent upstream: {exc}") from None

    async def _send_session(self, url: UpstreamURL) -> aiohttp.ClientResponse:
        """A GET of what is not an object's bytes, on aiohttp's session."""
        return await self._guarded(
            url,
            lambda: self._session.get(URL(url.url, encoded=True), allow_redirects=False),
        )

    async def _guarded(self, current: UpstreamURL, send: Callable[[], Awaitable[A]]) -> A:
        """One request to upstream under its host's breaker, faults mapped to RetryableFault."""
        host = current.netloc
        wait = self.breakers.before(host)
        if wait is not None:
            raise UpstreamDown(
                f"upstream {host} keeps failing; not asking it for {wait:.0f} s",
                retry_after=wait,
            )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._first_byte_timeout):
                resp = await send()
        except TimeoutError:
            self.breakers.record(host, ok=False)
            raise RetryableFault(
                "no response headers in time", reason=RetryReason.TIMEOUT
            ) from None
        except aiohttp.ClientConnectorError as exc:
            self.breakers.record(host, ok=False)
            raise RetryableFault(
                f"cannot connect: {exc.os_error}", reason=RetryReason.CONNECT
            ) from None
        except ConnectFailed as exc:
            self.breakers.record(host, ok=False)
            raise RetryableFault(str(exc), reason=RetryReason.CONNECT) from None
        except (aiohttp.ClientError, WireError, HeadError) as exc:
            self.breakers.record(host, ok=False)
            raise RetryableFault(
                f"request failed: {type(exc).__name__}", reason=RetryReason.RESET
            ) from None
        # 5xx and 429 count against the host; any other answer shows it is up.
        self.breakers.record(host, ok=resp.status < 500 and resp.status != 429)
        self.metrics.upstream_first_byte.observe(time.monotonic() - started)
        return resp

    async def _ask_parent(
        self, parent: int, url: UpstreamURL, headers: dict[str, str], authorization: str | None
    ) -> Response | None:
        """Parent ``parent``'s response, or None when it gave none this request
        can use: no answer or a 5xx/429 (it is then skipped for a while), or a
        refusal of its own (parents.py; it stays in rotation for others)."""
        sent = {**headers, "Via": self.parents.via()}
        if authorization is not None:
            sent["Authorization"] = authorization
        started = time.monotonic()
        try:
            # A parent asks upstream (with retries) before it answers: longer.
            async with asyncio.timeout(self._first_byte_timeout * PARENT_PATIENCE):
                resp = await self._wire_get(self.parents.target(parent, url), sent)
        except (TimeoutError, WireError, HeadError) as exc:
            failure, unwell = type(exc).__name__, True
        else:
            unwell = parent_unwell(resp.status)
            own = parents_own(resp.status, resp.headers) or resp.status in _REDIRECTS
            if not unwell and not own:  # upstream's answer (a daemon never redirects)
                self.parents.record(parent, ok=True)
                self.metrics.upstream_first_byte.observe(time.monotonic() - started)
                return resp
            failure = f"{resp.status} {resp.reason}"
            resp.release()
        where = self.parents.urls[parent]
        if unwell:
            log.warning("parent %s failed (%s): asking elsewhere", where, failure)
            self.parents.record(parent, ok=False)
        else:
            log.info("parent %s refused a request (%s): asking elsewhere", where, failure)
            self.parents.refused(parent)
        return None

    @contextlib.asynccontextmanager
    async def _answer(
        self, resp: A, not_modified: bool = False, *, passthrough: bool = False
    ) -> AsyncIterator[A]:
        """A response whose status is an answer, its body's faults mapped to RetryableFault.
        ``passthrough``: only faults worth another attempt raise (``ask``)."""
        try:
            if passthrough:
                reason = reason_for_status(resp.status)
                if reason is not None:
                    raise RetryableFault(
                        f"upstream answered {resp.status}",
                        reason=reason,
                        retry_after=_retry_after(resp),
                    )
            elif not (not_modified and resp.status == 304):
                check_status(resp.status, resp.headers, _retry_after(resp))
            yield resp
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError,
            WireError,
            HeadError,
        ) as exc:
            raise RetryableFault(
                f"body failed: {type(exc).__name__}", reason=RetryReason.RESET
            ) from None
        except TimeoutError:
            raise RetryableFault("body stalled", reason=RetryReason.TIMEOUT) from None
        finally:
            resp.close()  # never reuse a connection with an unread body

    def _redirect_target(self, current: UpstreamURL, location: str) -> UpstreamURL:
        try:
            target = parse_upstream_url(urljoin(current.url, location))
        except InvalidURL as exc:
            raise UpstreamProtocolError(f"upstream redirected to an invalid URL: {exc}") from None
        if not self._allow.permits(target):
            raise NotAllowed(f"upstream redirected to {target.netloc}, which is not allowed")
        return target


def _retry_after(resp: _Answer) -> float | None:
    return parse_retry_after(resp.headers.get("Retry-After"), datetime.now(UTC))
