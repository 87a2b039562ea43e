"""The admin API: ``/admin/...`` on the daemon's port, JSON in and out.

    GET    /admin/objects?url=U|prefix=P&sort=bytes|last-use|hits|url&limit=N
    GET    /admin/pins
    POST   /admin/pins    {"urls": [...], "ttl": SECONDS}   pin (all or nothing)
    DELETE /admin/pins    {"urls": [...]}                   unpin
    POST   /admin/evict   {"urls": [...]} or {"prefix": P}, "unpin": false
    POST   /admin/warm    {"files": [{"url": U, "label": L, "skip": WHY}] or "urls": [...],
                           "mode": "metadata"|"full", "jobs": N}        a job (202)
    GET    /admin/jobs[/ID]                                    jobs, or one with its files
    DELETE /admin/jobs/ID                                      cancel

Who may call it is adminauth.py's rule; what the calls do is admin.py's.
Refusals and errors are JSON too: ``{"error": "..."}``. What changes the cache
is logged (``nwbcache.admin``), as are refusals, with the caller's address;
never a token, and URLs only as cache keys (no signatures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from nwbcache.urls import (
    AllowList,
    InvalidURL,
    UpstreamURL,
    cache_key,
    key_of,
    parse_upstream_url,
    redact_url,
)

from . import adminauth
from .admin import Admin, Order, PinLimit
from .errors import ProxyError
from .jobs import MAX_FILES, FileState, Mode, WarmFile
from .sizes import format_size
from .warming import MAX_JOBS, Loopback, Warming

log = logging.getLogger("nwbcache.admin")

# The largest request body: a dandiset's thousands of URLs fit.
MAX_BODY = 8 * 1024 * 1024
# Objects listed when the request does not say.
DEFAULT_LIMIT = 100
# Files a warm-up job reads at once when the request does not say.
DEFAULT_WARM_JOBS = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Gate:
    """Who may pass (adminauth.authorize): the token, and where the daemon listens."""

    token: bytes | None
    listen_hosts: tuple[str, ...]
    allow: AllowList


ADMIN_KEY: web.AppKey[Admin] = web.AppKey("admin", Admin)
WARMING_KEY: web.AppKey[Warming] = web.AppKey("warming", Warming)
# Where the daemon listens, for its warm-up workers: set once it does.
LOOPBACK_KEY: web.AppKey[Loopback] = web.AppKey("loopback", Loopback)
GATE_KEY: web.AppKey[Gate] = web.AppKey("admin_gate", Gate)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def add_routes(app: web.Application) -> None:
    """Before the catch-all proxy route: ``/admin/...`` is never a proxied URL."""
    app.router.add_get("/admin/objects", _guarded(objects))
    app.router.add_get("/admin/pins", _guarded(list_pins))
    app.router.add_post("/admin/pins", _guarded(pin))
    app.router.add_delete("/admin/pins", _guarded(unpin))
    app.router.add_post("/admin/evict", _guarded(evict))
    app.router.add_post("/admin/warm", _guarded(warm))
    app.router.add_get("/admin/jobs", _guarded(list_jobs))
    app.router.add_get("/admin/jobs/{id}", _guarded(get_job))
    app.router.add_delete("/admin/jobs/{id}", _guarded(cancel_job))
    app.router.add_route("*", "/admin/{tail:.*}", _guarded(not_found))


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        gate = request.app[GATE_KEY]
        refusal = adminauth.authorize(
            gate.token, request.headers, listen_hosts=gate.listen_hosts, method=request.method
        )
        if refusal is not None:
            log.warning(
                "refused %s %s from %s: %s",
                request.method,
                request.path,
                request.remote,
                refusal.message.partition(":")[0],
            )
            challenge = {"WWW-Authenticate": 'Bearer realm="nwbcache-admin"'}
            headers = challenge if refusal.challenge else None
            return _json({"error": refusal.message}, refusal.status, headers)
        try:
            return await handler(request)
        except AdminError as exc:
            return _json({"error": exc.message, **exc.extra}, exc.status)

    return guarded


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        value, status=status, headers={"Cache-Control": "no-store", **(headers or {})}
    )


async def objects(request: web.Request) -> web.StreamResponse:
    q = request.query
    if "url" in q and "prefix" in q:
        raise AdminError(400, "give url or prefix, not both")
    try:
        order = Order(q.get("sort", Order.BYTES.value))
    except ValueError:
        raise AdminError(400, f"sort must be one of {', '.join(o.value for o in Order)}") from None
    limit = _int(q.get("limit", str(DEFAULT_LIMIT)), "limit")
    key = _key(q["url"]) if "url" in q else None
    prefix = _key(q["prefix"], prefix=True) if "prefix" in q else None
    admin = request.app[ADMIN_KEY]
    found = await admin.objects(key=key, prefix=prefix, order=order, limit=limit or None)
    pinned, count = await admin.pin_totals()
    return _json(
        {
            "objects": [e.to_json() for e in found],
            "pinned_bytes": pinned,
            "pins": count,
            "pin_limit": admin.pin_limit,
        }
    )


async def list_pins(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN_KEY]
    pinned, _ = await admin.pin_totals()
    return _json(
        {
            "pins": [dataclasses.asdict(p) for p in await admin.pins()],
            "pinned_bytes": pinned,
            "pin_limit": admin.pin_limit,
        }
    )


async def pin(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    urls = [_allowed(request, u) for u in _urls(body)]
    ttl = body.get("ttl")
    if ttl is not None and (
        not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl < math.inf
    ):
        raise AdminError(400, "ttl must be a positive number of seconds (or absent: no expiry)")
    admin = request.app[ADMIN_KEY]
    try:
        done = await admin.pin(urls, float(ttl) if ttl is not None else None)
    except PinLimit as exc:
        raise AdminError(409, str(exc), pin_limit=exc.limit, pinned_bytes=exc.pinned) from None
    except ProxyError as exc:
        # Upstream's 401/403 is not an answer about the admin token: 502, saying whose.
        status = exc.status if exc.status in (400, 404, 410, 416) else 502
        raise AdminError(
            status, f"nothing pinned: {exc.message}", upstream_status=exc.status
        ) from None
    pinned, _ = await admin.pin_totals()
    for p in done:
        log.info("pinned %s (%s)%s", p.url, format_size(p.size), "" if p.new else ", renewed")
    return _json({"pinned": [p.to_json() for p in done], "pinned_bytes": pinned})


async def unpin(request: web.Request) -> web.StreamResponse:
    keys = [_key(u) for u in _urls(await _body(request))]
    admin = request.app[ADMIN_KEY]
    unpinned: list[str] = []
    not_pinned: list[str] = []
    for key in keys:
        (unpinned if await admin.unpin(key) else not_pinned).append(key)
    pinned, _ = await admin.pin_totals()
    for key in unpinned:
        log.info("unpinned %s", key)
    return _json({"unpinned": unpinned, "not_pinned": not_pinned, "pinned_bytes": pinned})


async def evict(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    unpin_too = body.get("unpin", False)
    if not isinstance(unpin_too, bool):
        raise AdminError(400, "unpin must be true or false")
    admin = request.app[ADMIN_KEY]
    if "prefix" in body:
        if "urls" in body:
            raise AdminError(400, "give urls or prefix, not both")
        prefix = body["prefix"]
        if not isinstance(prefix, str) or not prefix:
            raise AdminError(400, "prefix must be a URL prefix")
        done = await admin.evict(prefix=_key(prefix, prefix=True), unpin=unpin_too)
        _log_eviction(f"under {_key(prefix, prefix=True)}", done.objects, done.bytes)
        return _json(done.to_json())
    total: dict[str, Any] = {"objects": 0, "bytes": 0, "skipped_pinned": []}
    for key in [_key(u) for u in _urls(body)]:
        one = (await admin.evict(key=key, unpin=unpin_too)).to_json()
        total["objects"] += one["objects"]
        total["bytes"] += one["bytes"]
        total["skipped_pinned"] += one["skipped_pinned"]
    _log_eviction("named", total["objects"], total["bytes"])
    return _json(total)


def _log_eviction(which: str, objects: int, nbytes: int) -> None:
    log.info("evicted by hand: %d objects %s, %s", objects, which, format_size(nbytes))


async def warm(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    try:
        mode = Mode(body.get("mode", Mode.METADATA.value))
    except ValueError:
        raise AdminError(400, "mode must be metadata or full") from None
    jobs = body.get("jobs", DEFAULT_WARM_JOBS)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= MAX_JOBS:
        raise AdminError(400, f"jobs must be a whole number from 1 to {MAX_JOBS}")
    files = []
    if "files" in body:
        entries = body["files"]
        if not isinstance(entries, list) or not entries:
            raise AdminError(400, 'give "files": a non-empty list of {"url": ..., "label": ...}')
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise AdminError(400, 'each of "files" needs a "url"')
            files.append(_warm_file(request, entry["url"], entry.get("label"), entry.get("skip")))
    else:
        files = [_warm_file(request, u, None, None) for u in _urls(body)]
    if len(files) > MAX_FILES:
        raise AdminError(413, f"{len(files)} files: a job takes at most {MAX_FILES}; split it")
    job = request.app[WARMING_KEY].submit(files, mode, jobs)
    return _json(job.to_json(), 202, {"Location": f"/admin/jobs/{job.id}"})


def _warm_file(request: web.Request, url: str, label: Any, skip: Any) -> WarmFile:
    """A file of the job: its cache key (never a signature: job files are kept
    a week and shown to every admin), and a label redacted likewise."""
    name = redact_url(str(label)) if label else None
    if skip is not None:  # listed by the client, not warmed (a Zarr asset): kept for the report
        return WarmFile(redact_url(url), name or redact_url(url), FileState.SKIPPED, str(skip))
    key = cache_key(_allowed(request, url))
    return WarmFile(key, name or key)


async def list_jobs(request: web.Request) -> web.StreamResponse:
    found = request.app[WARMING_KEY].all()
    return _json({"jobs": [j.to_json(files=False) for j in found]})


async def get_job(request: web.Request) -> web.StreamResponse:
    job = request.app[WARMING_KEY].get(request.match_info["id"])
    if job is None:
        raise AdminError(404, f"no job {request.match_info['id']}")
    # ?files=0: the summary alone (what a progress bar polls for).
    return _json(job.to_json(files=request.query.get("files") != "0"))


async def cancel_job(request: web.Request) -> web.StreamResponse:
    job = request.app[WARMING_KEY].cancel(request.match_info["id"])
    if job is None:
        raise AdminError(404, f"no job {request.match_info['id']}")
    log.info("warm-up job %s: cancel asked", job.id)
    return _json(job.to_json(files=False))


async def not_found(request: web.Request) -> web.StreamResponse:
    raise AdminError(404, f"no admin call {request.method} {request.path}; see the README")


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the body (the app's own body limit is for the proxy)."""
    chunks = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY:
            raise AdminError(413, f"request body over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        value = json.loads(b"".join(chunks) or b"{}")
    except (ValueError, RecursionError) as exc:
        raise AdminError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AdminError(400, "the body must be a JSON object")
    return value


def _urls(body: dict[str, Any]) -> list[str]:
    urls = body.get("urls")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise AdminError(400, 'give "urls": a non-empty list of URLs')
    return urls


def _key(url: str, *, prefix: bool = False) -> str:
    try:
        return key_of(url, prefix=prefix)
    except InvalidURL as exc:
        raise AdminError(400, f"not an object URL{' prefix' if prefix else ''}: {exc}") from None


def _allowed(request: web.Request, url: str) -> UpstreamURL:
    try:
        parsed = parse_upstream_url(url)
    except InvalidURL as exc:
        raise AdminError(400, f"not an object URL: {exc}") from None
    if not request.app[GATE_KEY].allow.permits(parsed):
        raise AdminError(403, f"upstream not allowed (--allow-upstream): {redact_url(url)}")
    return parsed


def _int(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise AdminError(400, f"{name} must be a whole number, got {text!r}")
    return int(text)
