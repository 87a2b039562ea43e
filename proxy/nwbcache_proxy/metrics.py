"""Prometheus metrics of the daemon.

Names are a public interface (dashboards and alerts in deploy/ use them).
Label values are bounded sets: never a URL, a path or a client address.

With ``--workers N`` the processes share one ``PROMETHEUS_MULTIPROC_DIR``
(set by the CLI before prometheus_client is imported, which is when the
library picks its storage) and ``/metrics`` in any worker reports the sum.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .config import MULTIPROC_ENV
from .retry import RetryReason
from .s3api import Operation

# From a loopback hit (~0.1 ms) to a slow WAN miss of a large range (~minutes).
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 30)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nwbcache_requests_total",
            "Client requests answered, by method, status and cache outcome.",
            ["method", "status", "cache"],
            registry=r,
        )
        self.request_duration = Histogram(
            "nwbcache_request_duration_seconds",
            "Time from request to the last byte of the response.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.served_bytes = Counter(
            "nwbcache_served_bytes_total",
            "Body bytes sent to clients, by where they came from.",
            ["source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "nwbcache_upstream_requests_total",
            "Upstream requests, by outcome (ok, or the fault that ended the attempt).",
            ["outcome"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "nwbcache_upstream_bytes_total", "Body bytes received from upstream.", registry=r
        )
        self.upstream_retries = Counter(
            "nwbcache_upstream_retries_total",
            "Upstream retries, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_connections = Counter(
            "nwbcache_upstream_connections_total",
            "Connections to upstream for object bytes, by how each request got one: "
            "opened, reused (kept alive), or stale (the server had closed the pooled "
            "one: the request went again on a new one).",
            ["how"],
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "nwbcache_upstream_first_byte_seconds",
            "Time to upstream response headers.",
            buckets=FIRST_BYTE_BUCKETS,
            registry=r,
        )
        self.cache_size = Gauge(
            "nwbcache_cache_size_bytes",
            "Bytes of cached blocks on disk (from the shared index).",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.cache_overhead = Gauge(
            "nwbcache_cache_overhead_bytes",
            "Bytes the cache's files take on disk beyond their blocks' (an estimate from "
            "the index: per version and per block); --cache-size bounds both.",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.cache_capacity = Gauge(
            "nwbcache_cache_capacity_bytes",
            "The --cache-size bound.",
            multiprocess_mode="max",
            registry=r,
        )
        self.cache_blocks = Gauge(
            "nwbcache_cache_blocks",
            "Cached blocks on disk (from the shared index).",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.evictions = Counter(
            "nwbcache_cache_evictions_total",
            "Blocks evicted to stay under capacity, by the queue they left (S3-FIFO's small "
            "or main; lru under --eviction lru).",
            ["queue"],
            registry=r,
        )
        self.admissions = Counter(
            "nwbcache_cache_admissions_total",
            "Blocks cached, by the queue they entered: small (new), main (an object's block "
            "0), ghost (into main, remembered from a recent eviction).",
            ["queue"],
            registry=r,
        )
        self.promotions = Counter(
            "nwbcache_cache_promotions_total",
            "Blocks moved from the small queue to main because they were hit there.",
            registry=r,
        )
        # Every label value exported from the start (at 0): a rate over a
        # series that appears later misses its first increase.
        for queue in ("small", "main", "lru"):
            self.evictions.labels(queue)
        for queue in ("small", "main", "ghost"):
            self.admissions.labels(queue)
        self.queue_bytes = Gauge(
            "nwbcache_cache_queue_bytes",
            "Cached bytes by queue: S3-FIFO's small and main (main is the protected "
            "part), and pinned (never evicted).",
            ["queue"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.pinned_bytes = Gauge(
            "nwbcache_pinned_bytes",
            "Cached bytes of pinned objects (nwbcache pin).",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.pins = Gauge(
            "nwbcache_pins",
            "Pinned objects.",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.pin_limit = Gauge(
            "nwbcache_pin_limit_bytes",
            "What pinned objects may add up to (--pin-limit); pins count objects' sizes.",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.warm_jobs_total = Counter(
            "nwbcache_warm_jobs_submitted_total",
            "Warm-up jobs submitted to this daemon.",
            registry=r,
        )
        self.warm_jobs = Gauge(
            "nwbcache_warm_jobs",
            "Warm-up jobs on record, by state (queued, running, done, cancelled).",
            ["state"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.warm_files = Counter(
            "nwbcache_warm_files_total",
            "Files a warm-up job finished, by result (done, failed).",
            ["result"],
            registry=r,
        )
        self.warm_fetched_bytes = Counter(
            "nwbcache_warm_fetched_bytes_total",
            "Bytes warm-up jobs added to the cache.",
            registry=r,
        )
        for state in ("queued", "running", "done", "cancelled"):
            self.warm_jobs.labels(state)
        for result in ("done", "failed"):
            self.warm_files.labels(result)
        self.pinned_size = Gauge(
            "nwbcache_pinned_size_bytes",
            "The sizes of the pinned objects, added up (what --pin-limit bounds).",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.evicted_recent = Counter(
            "nwbcache_cache_evictions_recent_total",
            "Evicted blocks that had been used in the last 10 minutes (thrashing).",
            registry=r,
        )
        self.reconciled_files = Counter(
            "nwbcache_reconciled_files_total",
            "Block files the reconciler compared with the index (after an unclean stop).",
            registry=r,
        )
        self.reconciling = Gauge(
            "nwbcache_reconciling",
            "1 while this process reconciles the index with the files, else 0.",
            multiprocess_mode="max",
            registry=r,
        )
        self.coalesced = Counter(
            "nwbcache_coalesced_requests_total",
            "Reads that joined a fetch already in flight instead of going upstream.",
            registry=r,
        )
        self.awaited = Counter(
            "nwbcache_awaited_fetches_total",
            "Blocks (kind=block) and object discoveries (kind=discovery) this process "
            "waited for instead of asking upstream, because another worker or daemon on the "
            "cache dir was fetching them.",
            ["kind"],
            registry=r,
        )
        self.parent_requests = Counter(
            "nwbcache_parent_requests_total",
            "Requests to parent daemons (--parent), by the parent's position in the "
            "--parent list and outcome: ok; failed (no answer, 5xx: skipped for a while "
            "after); refused (its own 4xx for this request, a loop or a host it does not "
            "allow: the request asks elsewhere).",
            ["parent", "outcome"],
            registry=r,
        )
        self.upstream_breakers_open = Gauge(
            "nwbcache_upstream_breakers_open",
            "Upstream hosts this daemon has stopped asking for a while because they kept "
            "failing (circuit breaker open or probing), summed over workers.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.stale_served = Counter(
            "nwbcache_stale_served_total",
            "Responses served from cached bytes that upstream has not confirmed since "
            "--revalidate-after (X-Cache: STALE): revalidating, or upstream failing.",
            registry=r,
        )
        self.auth_checks = Counter(
            "nwbcache_auth_checks_total",
            "Checks with upstream that a request's credentials may read a private object, "
            "by result (accepted, refused, error).",
            ["result"],
            registry=r,
        )
        self.s3_requests = Counter(
            "nwbcache_s3_requests_total",
            "Requests to the S3 endpoint (--s3-listen), by S3 operation; their bytes and "
            "cache outcomes are in nwbcache_requests_total with every other request.",
            ["operation"],
            registry=r,
        )
        self.inflight = Gauge(
            "nwbcache_inflight_requests",
            "Client requests being answered now.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.buffer_pool = Gauge(
            "nwbcache_buffer_pool_bytes",
            "Bytes of buffers the workers' pools keep for reuse, in use or free (blocks "
            "on their way and just written, reads from the page cache): at most the pools' "
            "share of nwbcache_buffer_memory_bytes.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.buffer_memory = Gauge(
            "nwbcache_buffer_memory_bytes",
            "What the workers may keep for bytes on their way between uses (--buffer-memory).",
            multiprocess_mode="livesum",
            registry=r,
        )

        self._declare_label_values()
        self._request_counters: dict[tuple[str, str, str], Any] = {}

    def _declare_label_values(self) -> None:
        """Create the bounded label values at start, at zero.

        A labelled series that first appears at its first increment loses that
        increment to rate()/increase(), so a fresh daemon's hit ratio would
        read low or empty until each series has moved twice.
        """
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for reason in RetryReason:
            self.upstream_requests.labels(reason.value)
            self.upstream_retries.labels(reason.value)
        self.upstream_requests.labels("ok")
        for how in ("opened", "reused", "stale"):
            self.upstream_connections.labels(how)
        for result in ("accepted", "refused", "error"):
            self.auth_checks.labels(result)
        for kind in ("block", "discovery"):
            self.awaited.labels(kind)
        for operation in Operation:
            self.s3_requests.labels(operation.value)
        for method in ("GET", "HEAD"):
            for status in ("200", "206"):
                for cache in ("hit", "miss", "partial", "stale"):
                    self.requests.labels(method, status, cache)

    def declare_parents(self, count: int) -> None:
        for parent in range(count):
            for outcome in ("ok", "failed", "refused"):
                self.parent_requests.labels(str(parent), outcome)

    def count_request(self, method: str, status: int, cache: str) -> None:
        """requests.labels(...).inc(), with the labelled child memoised: a
        labels() lookup takes a lock and builds a tuple on every hit."""
        key = (method, str(status), cache)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.requests.labels(*key)
        child.inc()

    def exposition(self) -> bytes:
        """The text format of every metric, summed over workers when there are several."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight requests) from the sums."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
