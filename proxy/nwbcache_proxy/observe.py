"""What every request leaves behind: a request id, errors turned into responses, metrics, and
one access-log line.

The one place where the daemon's errors (errors.ProxyError) become HTTP
responses. One middleware, not three: each layer costs a hit a few µs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.payload import Payload
from aiohttp.typedefs import Middleware

from . import __version__
from .adminauth import ADMIN_PREFIX
from .appkeys import (
    ABORTED_KEY,
    METRICS_KEY,
    OUTCOME_KEY,
    REQUEST_ID_KEY,
    SENT_KEY,
    TARGETS_KEY,
)
from .errors import ProxyError
from .metrics import Metrics
from .parents import ERROR_KIND_HEADER, UPSTREAM_KIND

log = logging.getLogger("nwbcache.access")

SERVER_NAME = f"nwbcache/{__version__}"
# Not client data traffic: left out of request metrics and the access log.
INFRA_PATHS = frozenset({"/", "/favicon.ico", "/healthz", "/metrics", "/status.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How a listener words the daemon's errors: text for proxied URLs, S3's XML
# on the S3 endpoint (s3server.py).
Renderer = Callable[[web.Request, ProxyError], web.Response]


class RequestIds:
    """A random prefix per process and a counter: unique across workers and
    restarts, and cheaper than drawing random bytes for every request."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # workers are forked

    def reset(self) -> None:
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):06x}"


# Process-wide by design: ids must be unique across every app of the process.
_REQUEST_IDS = RequestIds()


def error_response(
    status: int, message: str, retry_after: float | None = None, kind: str = UPSTREAM_KIND
) -> web.Response:
    """``kind``: whose answer this is, for a child daemon asking this one as its
    parent (parents.py): upstream's, passed on, or this daemon's own."""
    headers = {
        "Cache-Control": "no-store",
        "Server": SERVER_NAME,
        "X-Cache": "MISS",
        ERROR_KIND_HEADER: kind,
    }
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.Response(status=status, text=f"nwbcache: {message}\n", headers=headers)


def text_error(request: web.Request, exc: ProxyError) -> web.Response:
    """An error of the proxied-URL listener: a line of text, and whose answer it is."""
    kind = UPSTREAM_KIND if exc.about_object else type(exc).__name__
    response = error_response(exc.status, exc.message, exc.retry_after, kind)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def observing(
    render: Renderer, infra_paths: frozenset[str] = INFRA_PATHS, infra_prefix: str | None = None
) -> Middleware:
    """The middleware of a listener whose errors ``render`` words, and whose
    ``infra_paths`` (and paths under ``infra_prefix``) are not client traffic
    (the S3 endpoint has none: its ``/`` is ListBuckets)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        infra = path in infra_paths or (infra_prefix is not None and path.startswith(infra_prefix))
        return await _observe_request(request, handler, render, infra)

    return middleware


async def _observe_request(
    request: web.Request, handler: Handler, render: Renderer, infra: bool
) -> web.StreamResponse:
    started = time.monotonic()
    request[REQUEST_ID_KEY] = _REQUEST_IDS.next()
    metrics = request.app[METRICS_KEY]
    if not infra:
        metrics.inflight.inc()
    status = 500
    response: web.StreamResponse | None = None
    try:
        try:
            response = await handler(request)
        except ProxyError as exc:
            response = render(request, exc)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # client closed the request (nginx's convention)
        raise
    finally:
        if not infra:
            metrics.inflight.dec()
            _observe(request, response, status, time.monotonic() - started, metrics)


def _observe(
    request: web.Request,
    response: web.StreamResponse | None,
    status: int,
    duration: float,
    metrics: Metrics,
) -> None:
    x_cache = response.headers.get("X-Cache", "") if response is not None else ""
    x_cache = request.get(OUTCOME_KEY, x_cache)  # what it turned out to be
    cache = x_cache.lower() if status < 300 and x_cache else "bypass"
    method = request.method
    metrics.count_request(method if method in ("GET", "HEAD") else "other", status, cache)
    if cache == "stale":
        metrics.stale_served.inc()
    metrics.request_duration.observe(duration)
    aborted = request.get(ABORTED_KEY)
    level = logging.WARNING if aborted else logging.INFO
    if not log.isEnabledFor(level):
        return
    if isinstance(response, web.Response) and method != "HEAD":
        sent = _body_bytes(response)
    else:
        sent = request.get(SENT_KEY, 0)
    record = {
        "request_id": request[REQUEST_ID_KEY],
        "method": method,
        "path": request.app[TARGETS_KEY].redacted(request.raw_path),
        "status": status,
        "cache": x_cache or "-",
        "bytes": sent,
        "duration_ms": round(duration * 1000, 2),
    }
    # Formatted here, once, rather than by logging from a dict of arguments.
    line = (
        f"{record['request_id']} {method} {record['path']} {status} {record['cache']} "
        f"{sent}B {duration * 1000:.1f}ms"
    )
    if aborted is not None:
        record["aborted"] = aborted
        line += f" cut short: {aborted}"
    log.log(level, line, extra={"request": record})


def _body_bytes(response: web.Response) -> int:
    """The length of a one-write response's body: bytes or a bytearray, or a
    payload (a memoryview becomes one: a hit answered from memory)."""
    body = response.body
    if isinstance(body, bytes | bytearray):
        return len(body)
    if isinstance(body, Payload) and body.size is not None:
        return body.size
    return 0


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries the id its log line has."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id:
        response.headers["X-Request-Id"] = request_id


observe_middleware = observing(text_error, INFRA_PATHS, ADMIN_PREFIX)
