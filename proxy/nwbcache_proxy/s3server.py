"""The S3-compatible endpoint: a second listener whose requests name ``/<bucket>/<key>``.

Objects are served by the same code and from the same cache entries as the
proxied URLs (server.serve_object): the key of a configured bucket becomes
the upstream URL a proxied URL of the object names. What the S3 API means is
in s3api.py; this module answers.

Credentials: a request signed for this endpoint (SigV4 header or presigned
query) carries a signature upstream would reject, so it is never forwarded.
Objects are fetched anonymously, and a private object is served only to
requests upstream accepts (access.py): an anonymous request to an object
upstream refuses anonymously is AccessDenied, whatever it was signed with.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from .appkeys import (
    ALLOW_KEY,
    CACHE_KEY,
    METRICS_KEY,
    NODE_ID_KEY,
    REQUEST_ID_KEY,
    TARGETS_KEY,
    UPSTREAM_KEY,
)
from .credentials import NONE
from .errors import NotAllowed, ProxyError
from .observe import SERVER_NAME, add_request_id, observing
from .s3api import (
    LIST_V1_PARAMS,
    LIST_V2_PARAMS,
    Bucket,
    Operation,
    S3Error,
    S3Request,
    buckets_xml,
    check_listing,
    classify,
    error_xml,
    location_xml,
)
from .s3listing import Listings
from .server import serve_object

BUCKETS_KEY: web.AppKey[dict[str, Bucket]] = web.AppKey("s3_buckets", dict)
LISTINGS_KEY: web.AppKey[Listings] = web.AppKey("s3_listings", Listings)
S3_REQUEST_KEY = web.RequestKey("s3_request", S3Request)
_XML = "application/xml"


def s3_error(request: web.Request, exc: ProxyError) -> web.Response:
    """An error as S3 words it: its status, an ``<Error>`` document (none for HEAD)."""
    req = request.get(S3_REQUEST_KEY)
    bucket, key = (req.bucket, req.key) if req is not None else ("", "")
    request_id = request.get(REQUEST_ID_KEY, "")
    body = error_xml(exc, request.path, request_id, bucket, key)
    headers = {"Server": SERVER_NAME, "Cache-Control": "no-store", **(exc.headers or {})}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    headers.pop("Content-Type", None)
    return web.Response(status=exc.status, body=body, content_type=_XML, headers=headers)


async def _amz_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: S3's name for the request id every response carries."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id:
        response.headers["x-amz-request-id"] = request_id


async def handle(request: web.Request) -> web.StreamResponse:
    # Both raw: aiohttp's query_string is decoded once already, and classify
    # decodes (a key prefix "x%2541" must not become "xA").
    path, _, query = request.raw_path.partition("?")
    req = classify(request.method, path, query)
    request[S3_REQUEST_KEY] = req
    request.app[METRICS_KEY].s3_requests.labels(req.operation.value).inc()
    buckets = request.app[BUCKETS_KEY]
    if req.operation is Operation.LIST_BUCKETS:
        return _xml(buckets_xml(sorted(buckets)))
    bucket = buckets.get(req.bucket)
    if bucket is None:
        raise S3Error(404, "NoSuchBucket", "this endpoint serves no such bucket (--s3-bucket)")
    if req.operation is Operation.WRITE:
        raise S3Error(
            403,
            "AccessDenied",
            "nwbcache's S3 endpoint is a read-only cache; write to the bucket's own endpoint",
        )
    if req.operation is Operation.UNSUPPORTED:
        raise S3Error(501, "NotImplemented", "nwbcache's S3 endpoint does not do this operation")
    if req.operation is Operation.HEAD_BUCKET:
        return web.Response(headers={"x-amz-bucket-region": bucket.region, "Server": SERVER_NAME})
    if req.operation is Operation.GET_BUCKET_LOCATION:
        return _xml(location_xml(bucket.region))
    if req.operation in (Operation.LIST_OBJECTS_V2, Operation.LIST_OBJECTS):
        return await _list(request, bucket, req)
    url = bucket.object_url(req.key, req.query)
    if not request.app[ALLOW_KEY].permits(url):
        raise NotAllowed(f"{req.key!r} is not under {bucket.base}")
    return await serve_object(request, url, NONE)


async def _list(request: web.Request, bucket: Bucket, req: S3Request) -> web.Response:
    check_listing(req.query)
    v2 = req.operation is Operation.LIST_OBJECTS_V2
    url = bucket.list_url(req.query, LIST_V2_PARAMS if v2 else LIST_V1_PARAMS)
    answer = await request.app[LISTINGS_KEY].get(url)
    return web.Response(
        status=answer.status,
        body=answer.body,
        headers={"Content-Type": answer.content_type, "Server": SERVER_NAME},
    )


def _xml(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=_XML, headers={"Server": SERVER_NAME})


def build_s3_app(main: web.Application, buckets: Iterable[Bucket]) -> web.Application:
    """The S3 endpoint's app; it serves from ``main``'s cache, so it must start
    after ``main`` (its cache exists from ``main``'s start-up on)."""
    app = web.Application(middlewares=[observing(s3_error, frozenset())], client_max_size=1024)
    app[BUCKETS_KEY] = {b.name: b for b in buckets}

    async def share(app: web.Application) -> None:
        app[ALLOW_KEY] = main[ALLOW_KEY]
        app[CACHE_KEY] = main[CACHE_KEY]
        app[METRICS_KEY] = main[METRICS_KEY]
        app[NODE_ID_KEY] = main[NODE_ID_KEY]
        app[TARGETS_KEY] = main[TARGETS_KEY]
        app[LISTINGS_KEY] = Listings(main[UPSTREAM_KEY])

    app.on_startup.append(share)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(_amz_request_id)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
