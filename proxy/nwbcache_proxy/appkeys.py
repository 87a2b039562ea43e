"""The typed keys of the aiohttp application's shared state, and of per-request values."""

from __future__ import annotations

from aiohttp import web

from nwbcache.urls import AllowList

from .cache import BlockCache
from .dandi_resolver import DandiResolver
from .metrics import Metrics
from .status import StatusTracker
from .targets import Targets
from .upstream import Upstream

CACHE_KEY: web.AppKey[BlockCache] = web.AppKey("cache", BlockCache)
ALLOW_KEY: web.AppKey[AllowList] = web.AppKey("allow", AllowList)
DANDI_KEY: web.AppKey[DandiResolver] = web.AppKey("dandi", DandiResolver)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STATUS_KEY: web.AppKey[StatusTracker] = web.AppKey("status", StatusTracker)
TARGETS_KEY: web.AppKey[Targets] = web.AppKey("targets", Targets)
UPSTREAM_KEY: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)
# This daemon's id in Via headers (parents.py): a request naming it is a loop.
NODE_ID_KEY: web.AppKey[str] = web.AppKey("node_id", str)
# The S3 endpoint's address (s3server.py), once it listens.
S3_URL_KEY: web.AppKey[str] = web.AppKey("s3_url", str)

REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Set when a response was cut short after its headers (for the access log).
ABORTED_KEY = web.RequestKey("aborted", str)
# Body bytes sent, counted where they are sent (sendfile bypasses aiohttp's count).
SENT_KEY = web.RequestKey("sent", int)
