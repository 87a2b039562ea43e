"""HTTP front of the daemon: the proxied-object route, /healthz, error mapping.

The one place where errors become responses (``error_middleware``). Range and
precondition logic is in httprange.py; what to fetch and from where is in
cache.py; this module only speaks HTTP.
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
from prometheus_client import CONTENT_TYPE_LATEST

from nwbcache.urls import AllowList, InvalidURL, UpstreamURL, redact_url, upstream_from_proxy_path

from . import __version__, httprange, status, store
from .blockfile import HEADER_SIZE
from .cache import BlockCache, CacheOutcome, FileSegment, RangeReader
from .dandi_resolver import DandiResolver, parse_dandi_path
from .errors import BadRequest, NotAllowed, ProxyError, VersionChanged
from .httprange import ByteRange, Precondition, RangeOutcome
from .lru import BoundedLRU
from .metrics import Metrics
from .objectmeta import ObjectMeta

log = logging.getLogger("nwbcache.access")

CACHE_KEY: web.AppKey[BlockCache] = web.AppKey("cache", BlockCache)
ALLOW_KEY: web.AppKey[AllowList] = web.AppKey("allow", AllowList)
DANDI_KEY: web.AppKey[DandiResolver] = web.AppKey("dandi", DandiResolver)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STATUS_KEY: web.AppKey[status.StatusTracker] = web.AppKey("status", status.StatusTracker)
SERVER_NAME = f"nwbcache/{__version__}"
# Times a request starts over after finding that the object changed upstream
# before any byte was sent (a second change in a row is answered with 503).
VERSION_RESTARTS = 1

REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Set when a response was cut short after its headers (for the access log).
ABORTED_KEY = web.RequestKey("aborted", str)
# Body bytes sent, counted where they are sent (sendfile bypasses aiohttp's count).
SENT_KEY = web.RequestKey("sent", int)
# Not client data traffic: left out of request metrics and the access log.
INFRA_PATHS = frozenset({"/", "/favicon.ico", "/healthz", "/metrics", "/status.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _RequestIds:
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


_REQUEST_IDS = _RequestIds()


class _ResponseAborted(Exception):
    """Headers went out and the body could not be completed: the connection is
    cut so the client sees a short body, never bytes of a wrong version."""


def error_response(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=f"nwbcache: {message}\n",
        headers={"Cache-Control": "no-store", "Server": SERVER_NAME, "X-Cache": "MISS"},
    )


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, errors as responses, metrics and one access-log line per
    request. One middleware, not three: each layer costs a hit a few µs."""
    started = time.monotonic()
    request_id = _REQUEST_IDS.next()
    request[REQUEST_ID_KEY] = request_id
    infra = request.path in INFRA_PATHS
    metrics = request.app[METRICS_KEY]
    if not infra:
        metrics.inflight.inc()
    status = 500
    response: web.StreamResponse | None = None
    try:
        try:
            response = await handler(request)
        except ProxyError as exc:  # the one place the daemon's errors become responses
            response = error_response(exc.status, exc.message)
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
    cache = x_cache.lower() if status < 300 and x_cache else "bypass"
    method = request.method if request.method in ("GET", "HEAD") else "other"
    metrics.count_request(method, status, cache)
    metrics.request_duration.observe(duration)
    if isinstance(response, web.Response) and request.method != "HEAD":
        sent = len(response.body) if isinstance(response.body, bytes) else 0
    else:
        sent = request.get(SENT_KEY, 0)
    record = {
        "request_id": request[REQUEST_ID_KEY],
        "method": request.method,
        "path": _redacted(request.raw_path),
        "status": status,
        "cache": x_cache or "-",
        "bytes": sent,
        "duration_ms": round(duration * 1000, 2),
    }
    aborted = request.get(ABORTED_KEY)
    if aborted is not None:
        record["aborted"] = aborted
    log.log(
        logging.WARNING if aborted else logging.INFO,
        "%(request_id)s %(method)s %(path)s %(status)s %(cache)s %(bytes)dB "
        "%(duration_ms).1fms%(tail)s",
        {**record, "tail": f" cut short: {aborted}" if aborted else ""},
        extra={"request": record},
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def status_page(request: web.Request) -> web.Response:
    """Plain HTML for labs without Grafana; readable on a phone."""
    report = await request.app[STATUS_KEY].report()
    return web.Response(text=status.render_html(report), content_type="text/html")


async def no_favicon(request: web.Request) -> web.Response:
    """Browsers ask for it with every status page view; not a proxied path."""
    return web.Response(status=404)


async def status_json(request: web.Request) -> web.Response:
    """What ``nwbcache status`` prints."""
    report = await request.app[STATUS_KEY].report()
    return web.Response(text=status.dumps(report), content_type="application/json")


# Parsed proxied paths, by raw request target: readers ask for the same object
# over and over, and parsing and validating a URL costs more than a hit's I/O.
_PARSED: BoundedLRU[str, UpstreamURL] = BoundedLRU(10_000)


# Log-ready (redacted) paths, by raw request target, for the same reason.
_REDACTED: BoundedLRU[str, str] = BoundedLRU(10_000)


def _redacted(raw_path: str) -> str:
    path = _REDACTED.get(raw_path)
    if path is None:
        path = redact_url(raw_path)
        _REDACTED.put(raw_path, path)
    return path


def _parse_target(request: web.Request) -> UpstreamURL:
    url = _PARSED.get(request.raw_path)
    if url is None:
        url = _parse_new_target(request.raw_path)
    if not request.app[ALLOW_KEY].permits(url):
        raise NotAllowed(
            f"upstream host {url.netloc} is not on this daemon's allow-list (--allow-upstream)"
        )
    _PARSED.put(request.raw_path, url)
    return url


def _parse_new_target(raw_path: str) -> UpstreamURL:
    path, _, query = raw_path.partition("?")
    try:
        return upstream_from_proxy_path(path, query)
    except InvalidURL as exc:
        raise BadRequest(
            f"not a proxied URL ({exc}); expected /<scheme>/<host>[:<port>]/<path>"
        ) from None


def _object_headers(meta: ObjectMeta) -> dict[str, str]:
    v = meta.version
    # X-Cache: HIT for answers made from cached metadata alone (HEAD, 304,
    # 416); a response with a body overwrites it with what its blocks were.
    headers = {
        "Accept-Ranges": "bytes",
        "Server": SERVER_NAME,
        "Content-Type": v.content_type,
        "X-Cache": "HIT",
    }
    if v.etag:
        headers["ETag"] = v.etag
    if v.last_modified:
        headers["Last-Modified"] = v.last_modified
    return headers


def _check_method(request: web.Request) -> None:
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(
            request.method, ["GET", "HEAD"], text="nwbcache: only GET and HEAD\n"
        )


async def proxy(request: web.Request) -> web.StreamResponse:
    _check_method(request)
    return await _serve_object(request, _parse_target(request))


async def dandi(request: web.Request) -> web.StreamResponse:
    """/dandi/<dandiset>/<version>/<path>: the asset's bytes, resolved through the DANDI API."""
    _check_method(request)
    target = parse_dandi_path(request.raw_path.partition("?")[0])
    url = await request.app[DANDI_KEY].resolve(target)
    if not request.app[ALLOW_KEY].permits(url):
        raise NotAllowed(f"asset lives on {url.netloc}, which is not on the allow-list")
    return await _serve_object(request, url)


async def _serve_object(request: web.Request, url: UpstreamURL) -> web.StreamResponse:
    cache = request.app[CACHE_KEY]
    for attempt in range(VERSION_RESTARTS + 1):
        meta = await cache.resolve(url)
        try:
            return await _answer(request, cache, url, meta)
        except VersionChanged:
            if attempt == VERSION_RESTARTS:
                raise
            log.info("object changed upstream before headers were sent; starting over")
    raise AssertionError("unreachable")


async def _answer(
    request: web.Request, cache: BlockCache, url: UpstreamURL, meta: ObjectMeta
) -> web.StreamResponse:
    v = meta.version
    headers = _object_headers(meta)
    pre = httprange.evaluate_preconditions(request.method, request.headers, v.etag, v.last_modified)
    if pre is Precondition.NOT_MODIFIED:
        return web.Response(status=304, headers=headers)
    if pre is Precondition.FAILED:
        return error_response(412, "precondition failed")
    decision = httprange.decide(
        request.method,
        request.headers.get("Range"),
        request.headers.get("If-Range"),
        v.size,
        v.etag,
        v.last_modified,
    )
    if decision.outcome is RangeOutcome.UNSATISFIABLE:
        headers["Content-Range"] = f"bytes */{v.size}"
        return web.Response(status=416, headers=headers, text="nwbcache: range not satisfiable\n")
    if decision.outcome is RangeOutcome.MULTIPART:
        return await _answer_multipart(request, cache, url, meta, decision.ranges, headers)

    rng = decision.ranges[0]
    status = 200 if decision.outcome is RangeOutcome.FULL else 206
    if status == 206:
        headers["Content-Range"] = rng.content_range(v.size)
    if request.method == "HEAD" or rng.length == 0:
        headers["X-Cache"] = CacheOutcome.HIT
        return await _bodiless(request, status, headers, rng.length)
    reader = await cache.read(meta, url, rng.start, rng.end, eager=status == 206)
    headers["X-Cache"] = reader.outcome
    if reader.body is not None:  # a small read already in memory: one write
        return web.Response(status=status, headers=headers, body=reader.body)
    try:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = rng.length
        await response.prepare(request)
        await _send(request, response, reader, rng.length)
    except _ResponseAborted as exc:
        request[ABORTED_KEY] = str(exc)
        return response
    finally:
        await reader.aclose()
    await response.write_eof()
    return response


async def _answer_multipart(
    request: web.Request,
    cache: BlockCache,
    url: UpstreamURL,
    meta: ObjectMeta,
    ranges: tuple[ByteRange, ...],
    headers: dict[str, str],
) -> web.StreamResponse:
    plan = httprange.plan_multipart(
        ranges, meta.version.size, meta.version.content_type, secrets.token_hex(12)
    )
    headers["Content-Type"] = plan.content_type
    headers["X-Cache"] = CacheOutcome.PARTIAL
    if request.method == "HEAD":
        return await _bodiless(request, 206, headers, plan.content_length)
    response = web.StreamResponse(status=206, headers=headers)
    response.content_length = plan.content_length
    await response.prepare(request)
    try:
        for part_header, rng in plan.parts:
            await response.write(part_header)
            reader = await _reader_after_headers(request, cache, url, meta, rng)
            try:
                await _send(request, response, reader, rng.length)
            finally:
                await reader.aclose()
        await response.write(plan.closing)
    except ConnectionError:
        request[ABORTED_KEY] = "client went away"
        return response
    except _ResponseAborted as exc:
        request[ABORTED_KEY] = str(exc)
        return response
    await response.write_eof()
    return response


async def _bodiless(
    request: web.Request, status: int, headers: dict[str, str], length: int
) -> web.StreamResponse:
    """HEAD (or an empty body): the headers GET would send, Content-Length included."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    await response.write_eof()
    return response


async def _reader_after_headers(
    request: web.Request, cache: BlockCache, url: UpstreamURL, meta: ObjectMeta, rng: ByteRange
) -> RangeReader:
    try:
        return await cache.read(meta, url, rng.start, rng.end, eager=True)
    except ProxyError as exc:
        _abort(request)
        raise _ResponseAborted(f"upstream failed mid-body: {exc}") from exc


async def _send(
    request: web.Request, response: web.StreamResponse, reader: RangeReader, length: int
) -> None:
    """Stream a reader's ``length`` bytes; sendfile for large cached spans.

    Raises _ResponseAborted when the body cannot be completed, after cutting
    the connection: with Content-Length already sent, a short body on a
    closed connection is how HTTP/1.1 says "this response failed".
    """
    remaining = length
    try:
        async for segment in reader:
            if isinstance(segment, FileSegment):
                await _send_file_segment(request, response, segment)
                n = segment.end - segment.start
            else:
                await response.write(segment)
                n = len(segment)
            request[SENT_KEY] = request.get(SENT_KEY, 0) + n
            remaining -= n
            if remaining > 0:
                # A write into the socket buffer succeeds after the peer closed;
                # give the loop one turn to notice a close, and stop before
                # asking for (and maybe fetching) the next block.
                await asyncio.sleep(0)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("client went away")
    except ProxyError as exc:
        _abort(request)
        raise _ResponseAborted(f"upstream failed mid-body: {exc}") from exc
    except ConnectionError as exc:  # the client hung up; fetches others wait on go on
        raise _ResponseAborted("client went away") from exc


async def _send_file_segment(
    request: web.Request, response: web.StreamResponse, seg: FileSegment
) -> None:
    block = seg.block
    try:
        in_memory = block.bytes_of(seg.start, seg.end)  # verified, or a small span read
        if in_memory is not None:
            await response.write(in_memory)
            return
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        loop = asyncio.get_running_loop()
        with os.fdopen(block.fd, "rb", buffering=0, closefd=False) as fobj:
            try:
                await loop.sendfile(transport, fobj, HEADER_SIZE + seg.start, seg.end - seg.start)
            except NotImplementedError:  # TLS transport, or no sendfile on this platform
                data = await loop.run_in_executor(
                    None, store.read_block_data, block, seg.start, seg.end
                )
                await response.write(data)
    finally:
        block.close()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID_KEY)
    if request_id:
        response.headers["X-Request-Id"] = request_id


def build_routes(app: web.Application) -> None:
    app.on_response_prepare.append(_add_request_id)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/favicon.ico", no_favicon)
    app.router.add_route("*", "/dandi/{tail:.+}", dandi)
    app.router.add_route("*", "/{tail:.+}", proxy)
