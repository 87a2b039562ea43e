"""The status report behind ``GET /``, ``GET /status.json`` and ``nwbcache status``.

For labs without Grafana: the same figures as the dashboard, now and over
the last hour, and the objects that take most of the cache. History is a
ring of snapshots of this process's view of the metrics (summed over
workers when there are several), taken every SNAPSHOT_INTERVAL seconds.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import html
import json
import logging
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import __version__, store
from .buffers import Budget
from .index import CacheIndex
from .layout import Layout
from .metrics import Metrics
from .sizes import format_size

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 10.0
HOUR = 3600.0
TOP_OBJECTS = 10
# A report waits at most TOP_WAIT for the objects that take most of the
# cache (a flush and a query on the index's thread), then gives the last
# ones found (a second old, or more under load); it asks again when those
# are older than TOP_MAX_AGE. Waiting for the query (and the flush before
# it, which is CPU work per version used) took /status.json to 200-900 ms
# while clients read hits, 4 s during a fill.
TOP_WAIT = 0.01
TOP_MAX_AGE = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    values: dict[str, float]


def summarize(exposition: bytes) -> dict[str, float]:
    """The figures the status page shows, summed from the metrics text. Pure."""
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            name, labels = s.name, s.labels
            if name == "nwbcache_requests_total":
                out["requests"] += s.value
                out[f"requests_{labels.get('cache', 'bypass')}"] += s.value
                if labels.get("status", "").startswith("5"):
                    out["requests_5xx"] += s.value
            elif name == "nwbcache_awaited_fetches_total":
                out["awaited"] += s.value
            elif name == "nwbcache_parent_requests_total":
                out[f"parent_{labels.get('outcome', 'ok')}"] += s.value
            elif name == "nwbcache_served_bytes_total":
                out[f"served_{labels.get('source', 'cache')}"] += s.value
            elif name == "nwbcache_upstream_requests_total":
                out["upstream_requests"] += s.value
                if labels.get("outcome") != "ok":
                    out["upstream_errors"] += s.value
            elif name == "nwbcache_cache_queue_bytes":
                out[f"cache_queue_bytes_{labels.get('queue', '')}"] += s.value
            elif name == "nwbcache_warm_jobs":
                # Every process reports the jobs on record (one dir): the largest.
                key = f"warm_jobs_{labels.get('state', '')}"
                out[key] = max(out[key], s.value)
            elif name in (
                "nwbcache_cache_admissions_total",
                "nwbcache_cache_promotions_total",
                "nwbcache_upstream_bytes_total",
                "nwbcache_upstream_retries_total",
                "nwbcache_cache_evictions_total",
                "nwbcache_cache_evictions_recent_total",
                "nwbcache_coalesced_requests_total",
                "nwbcache_cache_size_bytes",
                "nwbcache_cache_overhead_bytes",
                "nwbcache_cache_capacity_bytes",
                "nwbcache_pins",
                "nwbcache_pin_limit_bytes",
                "nwbcache_pinned_size_bytes",
                "nwbcache_cache_blocks",
                "nwbcache_inflight_requests",
                "nwbcache_buffer_pool_bytes",
                "nwbcache_buffer_memory_bytes",
                "nwbcache_upstream_breakers_open",
                "nwbcache_stale_served_total",
                "nwbcache_reconciling",
            ):
                out[name.removeprefix("nwbcache_").removesuffix("_total")] += s.value
    return dict(out)


def _delta(now: Snapshot, then: Snapshot | None, key: str) -> float:
    return now.values.get(key, 0.0) - (then.values.get(key, 0.0) if then else 0.0)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def window(now: Snapshot, then: Snapshot | None) -> dict[str, Any]:
    """Counters as increases between two snapshots (then=None: since start). Pure."""
    served_cache = _delta(now, then, "served_cache")
    served_upstream = _delta(now, then, "served_upstream")
    requests = _delta(now, then, "requests")
    # A stale answer is still one served from the cache.
    hits = _delta(now, then, "requests_hit") + _delta(now, then, "requests_stale")
    return {
        "seconds": now.at - then.at if then else None,
        "requests": requests,
        "hit_ratio_requests": _ratio(hits, requests - _delta(now, then, "requests_bypass")),
        "hit_ratio_bytes": _ratio(served_cache, served_cache + served_upstream),
        "served_from_cache_bytes": served_cache,
        "served_from_upstream_bytes": served_upstream,
        "upstream_bytes": _delta(now, then, "upstream_bytes"),
        "upstream_requests": _delta(now, then, "upstream_requests"),
        "upstream_errors": _delta(now, then, "upstream_errors"),
        "upstream_retries": _delta(now, then, "upstream_retries"),
        "server_errors": _delta(now, then, "requests_5xx"),
        "evictions": _delta(now, then, "cache_evictions"),
        "evictions_recent": _delta(now, then, "cache_evictions_recent"),
        "admissions": _delta(now, then, "cache_admissions"),
        "promotions": _delta(now, then, "cache_promotions"),
        "coalesced": _delta(now, then, "coalesced_requests"),
        "stale_served": _delta(now, then, "stale_served"),
        "awaited": _delta(now, then, "awaited"),
        "parent_ok": _delta(now, then, "parent_ok"),
        "parent_failed": _delta(now, then, "parent_failed") + _delta(now, then, "parent_refused"),
    }


class StatusTracker:
    def __init__(self, metrics: Metrics, index: CacheIndex, layout: Layout) -> None:
        self._metrics = metrics
        self._index = index
        self._layout = layout
        self._history: collections.deque[Snapshot] = collections.deque(
            maxlen=int(HOUR / SNAPSHOT_INTERVAL) + 2
        )
        self.started = time.time()
        self._top: list[dict[str, Any]] = []
        self._top_at = float("-inf")  # (monotonic) when self._top was found
        self._finding: asyncio.Task[None] | None = None

    def snapshot(self) -> Snapshot:
        return Snapshot(time.time(), summarize(self._metrics.exposition()))

    async def run(self) -> None:
        while True:
            self._history.append(self.snapshot())
            await asyncio.sleep(SNAPSHOT_INTERVAL)

    def _at_least(self, age: float, now: float) -> Snapshot | None:
        """The newest snapshot at least ``age`` old, else the oldest one."""
        chosen = None
        for snap in self._history:
            if now - snap.at >= age:
                chosen = snap
        return chosen if chosen is not None else (self._history[0] if self._history else None)

    async def report(self) -> dict[str, Any]:
        now = self.snapshot()
        v = now.values
        top = await self.top_objects()
        return {
            "version": __version__,
            "uptime_seconds": now.at - self.started,
            "cache": {
                "size_bytes": v.get("cache_size_bytes", 0.0),
                "capacity_bytes": v.get("cache_capacity_bytes", 0.0),
                "blocks": v.get("cache_blocks", 0.0),
                # Its files beyond the blocks' bytes (footprint.py): --cache-size
                # bounds both, and the fill counts both.
                "overhead_bytes": v.get("cache_overhead_bytes", 0.0),
                "fill": _ratio(
                    v.get("cache_size_bytes", 0.0) + v.get("cache_overhead_bytes", 0.0),
                    v.get("cache_capacity_bytes", 0.0),
                ),
                # S3-FIFO's main queue: what a scan cannot push out.
                "protected": _ratio(
                    v.get("cache_queue_bytes_main", 0.0), v.get("cache_size_bytes", 0.0)
                ),
                # Pinned objects (nwbcache pin): cached bytes kept whatever the
                # policy says, how many, and their sizes against --pin-limit.
                "pinned_bytes": v.get("cache_queue_bytes_pinned", 0.0),
                "pins": v.get("pins", 0.0),
                "pinned_size_bytes": v.get("pinned_size_bytes", 0.0),
                "pin_limit_bytes": v.get("pin_limit_bytes", 0.0),
                # Warm-up jobs (nwbcache warm) under way.
                "warm_jobs_running": v.get("warm_jobs_running", 0.0),
                "warm_jobs_queued": v.get("warm_jobs_queued", 0.0),
                # After an unclean stop, sizes are approximate until this is done.
                "reconciling": v.get("reconciling", 0.0) > 0,
            },
            "inflight_requests": v.get("inflight_requests", 0.0),
            # What the buffer pools keep (in use or free), the most they may, and
            # --buffer-memory (of which the pools' is a share: buffers.py).
            "buffers": {
                "kept_bytes": v.get("buffer_pool_bytes", 0.0),
                "pool_limit_bytes": Budget.of(int(v.get("buffer_memory_bytes", 0))).pool,
                "limit_bytes": v.get("buffer_memory_bytes", 0.0),
            },
            # Upstream hosts not being asked now (circuit breaker open): misses fail fast.
            "upstream_breakers_open": v.get("upstream_breakers_open", 0.0),
            "last_minute": window(now, self._at_least(60, now.at)),
            "last_hour": window(now, self._at_least(HOUR, now.at)),
            "since_start": window(now, None),
            "top_objects": top,
        }

    async def top_objects(self) -> list[dict[str, Any]]:
        """The objects that take most of the cache, found at most TOP_WAIT ago
        or the last ones found (see TOP_WAIT)."""
        if time.monotonic() - self._top_at > TOP_MAX_AGE:
            if self._finding is None or self._finding.done():
                self._finding = asyncio.ensure_future(self._find_top())
            await asyncio.wait([self._finding], timeout=TOP_WAIT)
        return self._top

    async def _find_top(self) -> None:
        try:
            rows = await self._index.top_versions(TOP_OBJECTS)
            paths = [self._layout.meta_path_of_version(version) for version, _, _ in rows]
            metas = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [store.read_meta(p) for p in paths]
            )
        except Exception:  # the report goes on with the last ones found
            log.exception("could not list the objects that take most of the cache")
            return
        result = []
        for (_, nbytes, blocks), meta in zip(rows, metas, strict=True):
            url = meta.get("cache_key") if meta else None
            if meta and meta.get("private") is not False:
                # Anyone who reaches the status page may not read it, nor learn its name.
                url = "(a private object)" if meta.get("private") else "(privacy unknown)"
            result.append({"url": url or "(metadata gone)", "bytes": nbytes, "blocks": blocks})
        self._top, self._top_at = result, time.monotonic()


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f} %"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _b(x: float) -> str:
    return format_size(int(x))


ROWS: tuple[tuple[str, str, Any], ...] = (
    ("Hit ratio (bytes)", "hit_ratio_bytes", _pct),
    ("Hit ratio (requests)", "hit_ratio_requests", _pct),
    ("Requests", "requests", _n),
    ("Served from cache", "served_from_cache_bytes", _b),
    ("Served from upstream", "served_from_upstream_bytes", _b),
    ("Upstream bytes", "upstream_bytes", _b),
    ("Upstream requests", "upstream_requests", _n),
    ("Upstream errors", "upstream_errors", _n),
    ("Upstream retries", "upstream_retries", _n),
    ("Server errors (5xx)", "server_errors", _n),
    ("Joined a fetch in flight", "coalesced", _n),
    ("Left to another worker or daemon", "awaited", _n),
    ("Asked of parents", "parent_ok", _n),
    ("Parents failed or refused", "parent_failed", _n),
    ("Served stale (upstream unconfirmed)", "stale_served", _n),
    ("Evictions", "evictions", _n),
    ("Evictions of recently used blocks", "evictions_recent", _n),
    ("Blocks cached (admitted)", "admissions", _n),
    ("Promoted to the protected queue (reused)", "promotions", _n),
)


def _buffers_text(b: dict[str, Any]) -> str:
    return (
        f"; buffer pools keep {_b(b['kept_bytes'])} of at most {_b(b['pool_limit_bytes'])} "
        f"(--buffer-memory {_b(b['limit_bytes'])})"
    )


def render_text(report: dict[str, Any]) -> str:
    cache = report["cache"]
    buffers = report.get("buffers", {})  # (a daemon before --buffer-memory has none)
    lines = [
        f"nwbcache {report['version']}  up {report['uptime_seconds'] / 60:.0f} min",
        f"cache   {_b(cache['size_bytes'])} of blocks and "
        f"{_b(cache.get('overhead_bytes', 0))} of their files: {_pct(cache['fill'])} of "
        f"{_b(cache['capacity_bytes'])}, {_n(cache['blocks'])} blocks, "
        f"{_pct(cache.get('protected'))} protected; "
        f"{_n(report['inflight_requests'])} requests in flight"
        + (_buffers_text(buffers) if buffers else ""),
        f"upstream hosts cut off (failing, circuit open): {_n(report['upstream_breakers_open'])}",
        f"pinned  {_b(cache.get('pinned_bytes', 0))} cached of {_n(cache.get('pins', 0))} "
        f"objects ({_b(cache.get('pinned_size_bytes', 0))} of "
        f"{_b(cache.get('pin_limit_bytes', 0))} --pin-limit); warm-up jobs: "
        f"{_n(cache.get('warm_jobs_running', 0))} running, "
        f"{_n(cache.get('warm_jobs_queued', 0))} queued",
        *(
            ["reconciling the index with the files after an unclean stop: sizes approximate"]
            if cache.get("reconciling")
            else []
        ),
        "",
        f"{'':36} {'last minute':>14} {'last hour':>14}",
    ]
    for label, key, fmt in ROWS:
        lines.append(
            f"{label:36} {fmt(report['last_minute'][key]):>14} {fmt(report['last_hour'][key]):>14}"
        )
    lines += ["", "Objects taking most of the cache:"]
    for obj in report["top_objects"] or [{"url": "(cache empty)", "bytes": 0, "blocks": 0}]:
        lines.append(f"  {_b(obj['bytes']):>10}  {obj['blocks']:>7} blocks  {obj['url']}")
    return "\n".join(lines) + "\n"


STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;max-width:52rem;color:#222}
h1{font-size:1.3rem} h2{font-size:1.05rem;margin-top:1.5rem}
table{border-collapse:collapse;width:100%}
th,td{padding:.3rem .4rem;border-bottom:1px solid #ddd;text-align:right}
th{text-align:left;font-weight:500}
.url{text-align:left;word-break:break-all;font-size:.85rem}
.bar{background:#eee;height:.8rem;border-radius:.4rem}
.bar>div{background:#2a7;height:100%;border-radius:.4rem}
"""


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    cache = report["cache"]
    buffers = report["buffers"]
    fill = cache["fill"] or 0.0
    rows = "".join(
        f"<tr><th>{e(label)}</th><td>{e(fmt(report['last_minute'][key]))}</td>"
        f"<td>{e(fmt(report['last_hour'][key]))}</td></tr>"
        for label, key, fmt in ROWS
    )
    objects = (
        "".join(
            f"<tr><td>{e(_b(o['bytes']))}</td><td>{o['blocks']}</td>"
            f"<td class=url>{e(o['url'])}</td></tr>"
            for o in report["top_objects"]
        )
        or "<tr><td colspan=3>(cache empty)</td></tr>"
    )
    reconciling = (
        " <b id=reconciling>Reconciling the index with the files after an unclean stop:"
        " sizes are approximate.</b>"
        if cache.get("reconciling")
        else ""
    )
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<meta http-equiv=refresh content=30>
<title>nwbcache status</title>
<style>{STYLE}</style></head><body>
<h1>nwbcache {e(report["version"])}</h1>
<p>Cache: <b id=cache-size>{e(_b(cache["size_bytes"]))}</b> of blocks and
{e(_b(cache.get("overhead_bytes", 0)))} of their files:
<span id=cache-fill>{e(_pct(cache["fill"]))}</span> of {e(_b(cache["capacity_bytes"]))},
{e(_n(cache["blocks"]))} blocks, <span id=protected>{e(_pct(cache.get("protected")))}</span>
protected (reused, kept through scans); {e(_n(report["inflight_requests"]))} requests in flight;
buffer pools keep <span id=buffers>{e(_b(buffers["kept_bytes"]))}</span> of at most
{e(_b(buffers["pool_limit_bytes"]))} (--buffer-memory {e(_b(buffers["limit_bytes"]))});
up {report["uptime_seconds"] / 60:.0f} min.
Upstream hosts cut off (failing, circuit open):
<b id=breakers>{e(_n(report["upstream_breakers_open"]))}</b>.
Pinned: <b id=pinned>{e(_b(cache.get("pinned_bytes", 0)))}</b> cached of
<span id=pins>{e(_n(cache.get("pins", 0)))}</span> objects
({e(_b(cache.get("pinned_size_bytes", 0)))} of {e(_b(cache.get("pin_limit_bytes", 0)))}
allowed by --pin-limit). Warm-up jobs:
<span id=warm-running>{e(_n(cache.get("warm_jobs_running", 0)))}</span> running,
<span id=warm-queued>{e(_n(cache.get("warm_jobs_queued", 0)))}</span> queued
(<code>nwbcache jobs</code>).{reconciling}</p>
<div class=bar><div style="width:{min(fill, 1.0) * 100:.1f}%"></div></div>
<h2>Traffic</h2>
<table id=traffic><tr><th></th><th>last minute</th><th>last hour</th></tr>{rows}</table>
<h2>Objects taking most of the cache</h2>
<table id=objects><tr><th>size</th><th>blocks</th><th class=url>object</th></tr>{objects}</table>
<p><a href="/metrics">metrics</a> · <a href="/status.json">status.json</a></p>
</body></html>
"""


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
