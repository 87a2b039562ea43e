"""HTTP routes of the daemon: the proxied-object and /dandi/ routes, health, metrics, status.

Range and precondition logic is in httprange.py, what to fetch and from where
behind cache.py, sending in sending.py, request ids, errors-as-responses and
the access log in observe.py; this module answers requests.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from nwbcache.urls import UpstreamURL

from . import __version__, adminserver, conditional, httprange, status
from .appkeys import (
    ABORTED_KEY,
    ALLOW_KEY,
    CACHE_KEY,
    DANDI_KEY,
    METRICS_KEY,
    NODE_ID_KEY,
    OUTCOME_KEY,
    S3_ENDPOINT_KEY,
    STATUS_KEY,
    TARGETS_KEY,
)
from .cache import BlockCache
from .conditional import Precondition
from .credentials import NONE, Credentials, of_request
from .dandi_resolver import parse_dandi_path
from .errors import (
    LoopDetected,
    NotAllowed,
    NotCached,
    PreconditionFailed,
    ProxyError,
    RangeNotSatisfiable,
    VersionChanged,
)
from .httprange import ByteRange, RangeOutcome
from .observe import SERVER_NAME, add_request_id
from .parents import INBOUND_VIA, MAX_HOPS, from_nwbcache, loops
from .rangereader import RangeReader
from .readfor import CacheOutcome, ReadFor, classify
from .sending import ResponseAborted, abort, paced, send
from .version import Version

log = logging.getLogger("nwbcache.access")

# Times a request starts over after finding that the object changed upstream
# before any byte was sent (a second change in a row is answered with 503).
VERSION_RESTARTS = 1
# The precondition fields (RFC 9110 §13.1). Most requests carry none, and
# looking for them (case-insensitively, in aiohttp's C multidict) costs far
# less than evaluating them.
PRECONDITION_FIELDS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
# What a 416 carries of the object's headers (RFC 9110 §15.5.17 asks only Content-Range).
_VALIDATORS = ("Accept-Ranges", "ETag", "Last-Modified")
# httprange.decide is pure; readers send the same few Range values for the
# same objects over and over (remfile's 100 KiB reads, h5py's chunks).
_decide = functools.lru_cache(maxsize=4096)(httprange.decide)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    # pid: which worker of --workers N answered (this connection stays with it);
    # node: this daemon's id in Via (parents.py), one for all its workers;
    # s3: the S3 endpoint's address and its buckets' regions, which clients
    # use (nwbcache env --s3, transparent mode's S3 routing).
    endpoint = request.app[S3_ENDPOINT_KEY]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "node": request.app[NODE_ID_KEY],
            "s3": endpoint.url or None,
            "s3_buckets": endpoint.regions,
        }
    )


def served_by(
    node_name: str,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """on_response_prepare: which node of a cluster answered (--node-name), for
    the people and tests behind a balancer."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Served-By"] = node_name

    return add


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


def _check_method(request: web.Request) -> None:
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(
            request.method, ["GET", "HEAD"], text="nwbcache: only GET and HEAD\n"
        )


async def proxy(request: web.Request) -> web.StreamResponse:
    _check_method(request)
    url, allowed = request.app[TARGETS_KEY].upstream(request.raw_path)
    if not allowed:
        raise NotAllowed(
            f"upstream host {url.netloc} is not on this daemon's allow-list (--allow-upstream)"
        )
    creds = of_request(url.query, request.headers.get("Authorization"))
    return await serve_object(request, url, creds)


async def dandi(request: web.Request) -> web.StreamResponse:
    """/dandi/<dandiset>/<version>/<path>: the asset's bytes, resolved through the DANDI API."""
    _check_method(request)
    target = parse_dandi_path(request.raw_path.partition("?")[0])
    url = await request.app[DANDI_KEY].resolve(target)
    if not request.app[ALLOW_KEY].permits(url):
        raise NotAllowed(f"asset lives on {url.netloc}, which is not on the allow-list")
    # The request's Authorization, if any, is meant for the DANDI API, not S3.
    return await serve_object(request, url, NONE)


def _directives(cache_control: str | None) -> dict[str, str]:
    """A Cache-Control field value's directives (case-insensitive tokens), with
    their arguments ("" for none)."""
    found = {}
    for d in (cache_control or "").split(","):
        name, _, arg = d.strip().partition("=")
        if name.strip():
            found[name.strip().lower()] = arg.strip().strip('"')
    return found


def only_if_cached(cache_control: str | None) -> bool:
    """Whether a Cache-Control field value has the only-if-cached directive
    (RFC 9111 §5.2.1.7)."""
    return "only-if-cached" in _directives(cache_control)


def wants_upstream(cache_control: str | None) -> bool:
    """Whether a request asks for upstream's word on the version before being
    served (``no-cache``, ``max-age=0``: RFC 9111 §5.2.1): a child daemon whose
    object just changed asks its parent so (parents.py). Cached blocks of an
    unchanged version are still served; only the version is confirmed."""
    directives = _directives(cache_control)
    return "no-cache" in directives or directives.get("max-age") == "0"


async def serve_object(
    request: web.Request, url: UpstreamURL, creds: Credentials
) -> web.StreamResponse:
    """Answer a GET or HEAD of upstream object ``url`` from the cache, for a
    request presenting ``creds``: every route that names an object ends here
    (proxied URLs, /dandi/, the S3 endpoint's keys)."""
    via = ", ".join(request.headers.getall("Via", ()))
    if via and loops(via, request.app[NODE_ID_KEY]):
        raise LoopDetected(f"this request has passed this daemon (or {MAX_HOPS}) already: {via}")
    INBOUND_VIA.set(via)  # fetches started while serving it carry it on (parents.py)
    readahead = not (via and from_nwbcache(via))
    cache = request.app[CACHE_KEY]
    cache_control = request.headers.get("Cache-Control")
    offline = bool(cache_control) and only_if_cached(cache_control)
    revalidate = bool(cache_control) and wants_upstream(cache_control)
    for attempt in range(VERSION_RESTARTS + 1):
        v, stale = await cache.resolve(url, creds, offline=offline, revalidate=revalidate)
        try:
            if v.private is not False:
                # Before any byte or header about it: a private object's
                # bytes go only to requests upstream would serve (access.py).
                await cache.authorize(v, url, creds, offline=offline)
            how = ReadFor(creds, stale, offline, readahead=readahead)
            return await _answer(request, cache, url, v, how)
        except VersionChanged:
            if attempt == VERSION_RESTARTS:
                raise
            log.info("object changed upstream before headers were sent; starting over")
    raise AssertionError("unreachable")


def _object_headers(v: Version, stale: bool) -> dict[str, str]:
    headers = dict(_version_headers(v))
    if stale:
        headers["X-Cache"] = classify(0, 0, stale=True)
    return headers


@functools.lru_cache(maxsize=4096)
def _version_headers(v: Version) -> tuple[tuple[str, str], ...]:
    """The headers every answer about version ``v`` carries (pure, so memoised)."""
    o = v.remote
    # X-Cache: HIT for answers made from cached metadata alone (HEAD, 304,
    # 416); a response with a body overwrites it with what its blocks were.
    headers = {
        "Accept-Ranges": "bytes",
        "Server": SERVER_NAME,
        "Content-Type": o.content_type,
        "X-Cache": CacheOutcome.HIT,
    }
    if o.etag:
        headers["ETag"] = o.etag
    if o.last_modified:
        headers["Last-Modified"] = o.last_modified
    return tuple(headers.items())


async def _answer(
    request: web.Request, cache: BlockCache, url: UpstreamURL, v: Version, how: ReadFor
) -> web.StreamResponse:
    o = v.remote
    headers = _object_headers(v, how.stale)
    if any(field in request.headers for field in PRECONDITION_FIELDS):
        pre = conditional.evaluate_preconditions(
            request.method, request.headers, o.etag, o.last_modified
        )
        if pre is Precondition.NOT_MODIFIED:
            return web.Response(status=304, headers=headers)
        if pre is Precondition.FAILED:
            raise PreconditionFailed("precondition failed")
    decision = _decide(
        request.method,
        request.headers.get("Range"),
        request.headers.get("If-Range"),
        o.size,
        o.etag,
        o.last_modified,
    )
    if decision.outcome is RangeOutcome.UNSATISFIABLE:
        raise RangeNotSatisfiable(
            "range not satisfiable",
            size=o.size,
            requested=request.headers.get("Range", ""),
            headers={
                "Content-Range": f"bytes */{o.size}",
                **{k: v for k, v in headers.items() if k in _VALIDATORS},
            },
        )
    if decision.outcome is RangeOutcome.MULTIPART:
        return await _answer_multipart(request, cache, url, v, how, decision.ranges, headers)

    rng = decision.ranges[0]
    status = 200 if decision.outcome is RangeOutcome.FULL else 206
    if status == 206:
        headers["Content-Range"] = rng.content_range(o.size)
    if request.method == "HEAD" or rng.length == 0:
        return await _bodiless(request, status, headers, rng.length)
    # A paced body is also fetched as its client takes it; any other at once.
    pace = paced(status == 200, rng.length)
    reader = await cache.read(v, url, rng.start, rng.end, eager=not pace, how=how)
    headers["X-Cache"] = reader.outcome
    if reader.body is not None:  # a small read already in memory: one write
        return web.Response(status=status, headers=headers, body=reader.body)
    try:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = rng.length
        await response.prepare(request)
        await send(request, response, reader, rng.length, pace=pace)
    except ResponseAborted as exc:
        request[ABORTED_KEY] = str(exc)
        return response
    finally:
        await reader.aclose()
        if reader.outcome_sent != reader.outcome:
            request[OUTCOME_KEY] = reader.outcome_sent
    await response.write_eof()
    return response


async def _answer_multipart(
    request: web.Request,
    cache: BlockCache,
    url: UpstreamURL,
    v: Version,
    how: ReadFor,
    ranges: tuple[ByteRange, ...],
    headers: dict[str, str],
) -> web.StreamResponse:
    plan = httprange.plan_multipart(ranges, v.size, v.remote.content_type, secrets.token_hex(12))
    headers["Content-Type"] = plan.content_type
    headers["X-Cache"] = CacheOutcome.STALE if how.stale else CacheOutcome.PARTIAL
    if request.method == "HEAD":
        return await _bodiless(request, 206, headers, plan.content_length)
    if how.offline:  # every part must be cached before the headers go out
        for rng in ranges:
            if not await cache.cached(v, rng.start, rng.end):
                raise NotCached("not all of the ranges are in the cache (only-if-cached)")
    response = web.StreamResponse(status=206, headers=headers)
    response.content_length = plan.content_length
    await response.prepare(request)
    try:
        for part_header, rng in plan.parts:
            await response.write(part_header)
            reader = await _reader_after_headers(request, cache, url, v, how, rng)
            try:
                await send(request, response, reader, rng.length)
            finally:
                await reader.aclose()
        await response.write(plan.closing)
    except ConnectionError:
        request[ABORTED_KEY] = "client went away"
        return response
    except ResponseAborted as exc:
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
    request: web.Request,
    cache: BlockCache,
    url: UpstreamURL,
    v: Version,
    how: ReadFor,
    rng: ByteRange,
) -> RangeReader:
    try:
        return await cache.read(v, url, rng.start, rng.end, eager=True, how=how)
    except ProxyError as exc:
        abort(request)
        raise ResponseAborted(f"upstream failed mid-body: {exc}") from exc


def build_routes(app: web.Application, node_name: str = "") -> None:
    app.on_response_prepare.append(add_request_id)
    if node_name:
        app.on_response_prepare.append(served_by(node_name))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/favicon.ico", no_favicon)
    app.router.add_route("*", "/dandi/{tail:.+}", dandi)
    adminserver.add_routes(app)
    app.router.add_route("*", "/{tail:.+}", proxy)
