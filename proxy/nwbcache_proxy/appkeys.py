"""The typed keys of the aiohttp application's shared state, and of per-request values."""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass
class S3Endpoint:
    """What /healthz tells clients of the S3 endpoint (s3server.py): filled in
    place once it listens, as the app is running by then."""

    url: str = ""  # "" while there is none
    regions: dict[str, str] = dataclasses.field(default_factory=dict)  # bucket -> region


S3_ENDPOINT_KEY: web.AppKey[S3Endpoint] = web.AppKey("s3_endpoint", S3Endpoint)

REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Set when a response was cut short after its headers (for the access log).
ABORTED_KEY = web.RequestKey("aborted", str)
# Body bytes sent, counted where they are sent (sendfile bypasses aiohttp's count).
SENT_KEY = web.RequestKey("sent", int)
# What a response turned out to be once sent, when not what its X-Cache
# header said (rangereader.RangeReader.outcome_sent): the access log and the
# request metrics tell this.
OUTCOME_KEY = web.RequestKey("outcome", str)
