"""Build the aiohttp application and run it, in one process or several.

The upstream session, index and cache are created in the app's lifecycle
(``cleanup_ctx``), never at import time, so tests build as many independent
apps as they like.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from . import __version__
from .admin import Admin
from .adminserver import ADMIN_KEY, GATE_KEY, LOOPBACK_KEY, WARMING_KEY, Gate
from .appkeys import (
    ALLOW_KEY,
    CACHE_KEY,
    DANDI_KEY,
    METRICS_KEY,
    NODE_ID_KEY,
    S3_ENDPOINT_KEY,
    STATUS_KEY,
    TARGETS_KEY,
    UPSTREAM_KEY,
    S3Endpoint,
)
from .breaker import Breakers
from .cache import BlockCache
from .config import Settings, describe
from .dandi_resolver import DandiResolver
from .index import CacheIndex
from .inflight import POOL, make_pool
from .jobs import JobStore
from .layout import Layout
from .metrics import Metrics
from .observe import observe_middleware
from .parents import Parents, new_node_id
from .retry import RetryBudget, RetryPolicy
from .s3server import build_s3_app
from .server import build_routes
from .session import make_session, make_wire
from .status import StatusTracker
from .targets import Targets
from .upstream import Upstream
from .warming import Loopback, Warming

log = logging.getLogger("nwbcache")

SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings", Settings)
# Start-up line that tests and scripts wait for; it names the bound address.
READY_PREFIX = "nwbcache: serving on "
# Printed just before it when the S3 endpoint is on, naming its address.
S3_READY_PREFIX = "nwbcache: S3 endpoint on "


def build_app(settings: Settings, node_id: str | None = None) -> web.Application:
    """``node_id``: this daemon's id in Via (parents.py); the workers of one
    daemon share one (runner.py), so a loop through any of them is seen."""
    app = web.Application(middlewares=[observe_middleware], client_max_size=1024)
    app[SETTINGS_KEY] = settings
    app[ALLOW_KEY] = settings.allow_list
    app[METRICS_KEY] = Metrics()
    app[TARGETS_KEY] = Targets(settings.allow_list)
    app[NODE_ID_KEY] = node_id or new_node_id(settings.node_name)
    app[S3_ENDPOINT_KEY] = S3Endpoint()
    app[GATE_KEY] = Gate(settings.admin_token(), (settings.host,), settings.allow_list)
    app[LOOPBACK_KEY] = Loopback()
    app.cleanup_ctx.append(_cache_context)
    build_routes(app, settings.node_name)
    return app


async def _cache_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    metrics = app[METRICS_KEY]
    metrics.declare_parents(len(settings.parent))
    layout = Layout(settings.cache_dir)
    index = CacheIndex(layout, settings.eviction)
    await index.open()
    session = make_session(
        max_connections=settings.max_upstream_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    wire = make_wire(
        max_connections=settings.max_upstream_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        metrics=metrics,
    )
    upstream = Upstream(
        session,
        wire,
        settings.allow_list,
        RetryPolicy(max_attempts=settings.retry_attempts, base_delay=settings.retry_base_delay),
        RetryBudget(),
        first_byte_timeout=settings.first_byte_timeout,
        metrics=app[METRICS_KEY],
        breakers=Breakers(app[METRICS_KEY].upstream_breakers_open.set),
        parents=Parents(
            settings.parent,
            app[NODE_ID_KEY],
            group_bytes=settings.parent_group,
            on_result=lambda parent, outcome: metrics.parent_requests.labels(parent, outcome).inc(),
        ),
    )
    cache = BlockCache(
        layout,
        index,
        upstream,
        block_size=settings.block_size,
        capacity=settings.cache_size,
        readahead=settings.readahead,
        revalidate_after=settings.revalidate_after,
        stale_if_error=settings.stale_if_error,
        immutable=settings.immutable_list,
        negative_ttl=settings.negative_ttl,
        trace=settings.trace,
        fsync=settings.fsync,
        metrics=app[METRICS_KEY],
        parent_group=settings.parent_group if settings.parent else None,
        buffers=settings.buffer_budget,
    )
    await cache.start()
    app[CACHE_KEY] = cache
    app[UPSTREAM_KEY] = upstream
    app[DANDI_KEY] = DandiResolver(session, settings.dandi_api_url, settings.allow_list)
    admin = Admin(cache, app[METRICS_KEY], pin_limit=settings.pin_bytes)
    app[ADMIN_KEY] = admin
    warming = Warming(cache, JobStore(layout), app[METRICS_KEY], app[LOOPBACK_KEY])
    app[WARMING_KEY] = warming
    warming.start()
    tracker = StatusTracker(app[METRICS_KEY], index, layout)
    app[STATUS_KEY] = tracker
    snapshots = asyncio.create_task(tracker.run())
    pin_upkeep = asyncio.create_task(admin.run())
    try:
        yield
    finally:
        snapshots.cancel()
        pin_upkeep.cancel()
        await warming.close()
        await cache.close()
        await session.close()
        await wire.close()
        await index.close()


async def start_s3(
    app: web.Application, settings: Settings, sock: socket.socket | None = None
) -> web.AppRunner | None:
    """Start the S3 endpoint beside ``app`` (already set up), if it is on; its
    address goes to ``app`` for /healthz. Returns its runner, to clean up first."""
    address = settings.s3_address
    if address is None:
        return None
    runner = web.AppRunner(
        build_s3_app(app, settings.s3_buckets), access_log=None, handle_signals=False
    )
    await runner.setup()
    site: web.BaseSite = (
        web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, *address)
    )
    await site.start()
    host, port = bound_address(site)
    endpoint = app[S3_ENDPOINT_KEY]
    endpoint.url = f"http://{host}:{port}"
    endpoint.regions.update((b.name, b.region) for b in settings.s3_buckets)
    return runner


async def serve_forever(
    settings: Settings,
    sock: socket.socket | None = None,
    node_id: str | None = None,
    s3_sock: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then shut down cleanly."""
    app = build_app(settings, node_id)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    s3_runner = None
    try:
        s3_runner = await start_s3(app, settings, s3_sock)
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if s3_runner is not None:
            _announce(f"{S3_READY_PREFIX}{app[S3_ENDPOINT_KEY].url}")
        host, port = bound_address(site)
        app[LOOPBACK_KEY].set(host, port)
        _announce(f"{READY_PREFIX}http://{host}:{port} (pid {os.getpid()})")
        kind = type(loop).__module__.partition(".")[0]  # uvloop or asyncio (--event-loop)
        log.info("nwbcache %s: %s; event loop %s", __version__, describe(settings), kind)
        # What start-up made lives as long as the process: out of the
        # collector's sight, its full passes stop walking it (they were a few
        # per cent of the event loop in a cold fill, perf).
        gc.collect()  # start-up's garbage first, or it would never be freed
        gc.freeze()
        # Serving already: the pool's first buffers are made in the background
        # (inflight.make_pool, buffers.START_BYTES).
        pool = asyncio.create_task(
            make_pool(POOL, settings.block_size, settings.buffer_budget.start)
        )
        await stop.wait()
        pool.cancel()
    finally:
        # Warm-up reads go through this daemon's own port: stopped while it
        # still listens, so that no file fails for the stop (its job resumes).
        if WARMING_KEY in app:
            await app[WARMING_KEY].close()
        if s3_runner is not None:
            await s3_runner.cleanup()
        await runner.cleanup()


def _announce(line: str) -> None:
    """A start-up line in one write: workers print theirs at once, and print()
    writes the newline apart when stdout is unbuffered, so lines could mix."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def bound_address(site: web.BaseSite) -> tuple[str, int]:
    server = site._server  # aiohttp keeps the asyncio Server here
    sockets = getattr(server, "sockets", None) or []
    name = sockets[0].getsockname()
    host = name[0] if ":" not in name[0] else f"[{name[0]}]"
    return host, int(name[1])
