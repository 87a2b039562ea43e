"""S3 clients through the daemon's S3 endpoint: where it is, the environment SDKs read,
and transparent mode's routing of botocore (boto3, s3fs, the AWS CLI's library).

Where the endpoint is: ``NWBCACHE_S3_URL`` if set, else what the daemon's
``/healthz`` says (its S3 port, at the host this client reaches the daemon
by, and its buckets with their regions), asked once per process.

Two ways in:

- Per bucket, always on in transparent mode: botocore's endpoint resolution
  of a read (GetObject, HeadObject, the listings, HeadBucket,
  GetBucketLocation) of one of the daemon's buckets is pointed at the
  endpoint, path-style. Other buckets, writes and clients given their own
  ``endpoint_url`` are left alone. One hook covers boto3, s3fs (through
  aiobotocore) and anything else built on botocore sessions.
- Process-wide, on request (``NWBCACHE_S3_ENV=1``, ``nwbcache run --s3``,
  ``nwbcache env --s3``): ``AWS_ENDPOINT_URL_S3`` and friends, which every
  SDK and HDF5 2.x's ros3 honour, but for every bucket, hence not by default.

Standard library only; botocore is patched only once the user's code imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
import urllib.request
from collections.abc import Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from . import env
from .routing import CONNECT_TIMEOUT, DaemonUnavailable, FallbackWarning, choose
from .urls import _proxy

__all__ = [
    "READ_OPERATIONS",
    "S3Endpoint",
    "environment",
    "find_endpoint",
    "patch_botocore",
    "patch_s3fs",
    "set_environment",
    "tuned_open",
]

# The S3 operations the daemon's endpoint answers; botocore sends every other
# one (writes above all) where it would without nwbcache.
READ_OPERATIONS = frozenset(
    {"GetObject", "HeadObject", "ListObjectsV2", "ListObjects", "HeadBucket", "GetBucketLocation"}
)
# A region for SDKs that insist on one (HDF5 2.x's ros3) when the daemon names none.
FALLBACK_REGION = "us-east-1"
# How s3fs reads a file through the daemon unless told otherwise: blocks of
# 4 MiB kept in an LRU ("blockcache"), not its 50 MiB read-ahead window,
# which exists to hide S3's latency (the cache hides it already) and which
# h5py's scattered metadata reads restart again and again. Measured (PyNWB
# io.read() + a slice of a 215 MB file, warm): 0.19 s against remfile's
# 0.20 s; s3fs's defaults 1.6 s, readahead 4 MiB 0.38 s (make bench-s3).
S3FS_BLOCK_SIZE = 4 * 1024 * 1024
S3FS_CACHE_TYPE = "blockcache"
_PATCHED = "__nwbcache_patched__"


@dataclasses.dataclass(frozen=True, slots=True)
class S3Endpoint:
    url: str  # as this client reaches it
    regions: Mapping[str, str]  # bucket -> region, the buckets the daemon serves


_lock = threading.Lock()
# (pid, daemon base URL, NWBCACHE_S3_URL) -> what the daemon said (None: no endpoint)
_found: dict[tuple[int, str, str], S3Endpoint | None] = {}


def find_endpoint(proxy: str | None = None) -> S3Endpoint | None:
    """The S3 endpoint of the daemon at ``proxy`` (default ``$NWBCACHE_URL``), or
    None when it has none. Asked once per process; raises OSError (or
    ValueError for an answer that is not the daemon's) when it cannot be asked."""
    base = _proxy(proxy if proxy is not None else env.proxy() or "").base
    override = env.s3_url() or ""
    key = (os.getpid(), base, override)
    with _lock:
        if key in _found:
            return _found[key]
    found = _ask(base, override)
    with _lock:
        _found[key] = found
    return found


def _ask(base: str, override: str) -> S3Endpoint | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base}/healthz", timeout=max(CONNECT_TIMEOUT, 5.0)) as resp:
        health = json.loads(resp.read())
    reported = health.get("s3")
    regions = health.get("s3_buckets") or {}
    if not isinstance(regions, dict):
        raise ValueError(f"{base}/healthz: s3_buckets is not an object")
    if override:
        return S3Endpoint(override.rstrip("/"), regions)
    if not isinstance(reported, str) or not reported:
        return None
    # The daemon names the address it listens on (127.0.0.1, 0.0.0.0, ...); a
    # client elsewhere reaches it by the host it reaches the daemon by.
    port = urlsplit(reported).port
    daemon = urlsplit(base)
    host = daemon.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return S3Endpoint(f"{daemon.scheme}://{host}:{port}", regions)


def forget() -> None:
    """Drop what the daemons said (tests, long-lived kernels)."""
    with _lock:
        _found.clear()


def environment(endpoint: S3Endpoint, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that send every S3 client of a process to ``endpoint``:
    botocore's (boto3, s3fs, the AWS CLI) and HDF5 2.x ros3's. A region the
    environment already has is kept; else the first bucket's."""
    environ = os.environ if environ is None else environ
    region = (
        environ.get("AWS_REGION")
        or environ.get("AWS_DEFAULT_REGION")
        or next(iter(endpoint.regions.values()), FALLBACK_REGION)
    )
    return {
        "AWS_ENDPOINT_URL_S3": endpoint.url,
        "AWS_REGION": region,
        "HDF5_ROS3_VFD_FORCE_PATH_STYLE": "1",
    }


# -- transparent mode: botocore -------------------------------------------------


def _daemon_endpoint() -> S3Endpoint | None:
    """Where to send reads, or None to leave them alone (no daemon configured,
    or it cannot be reached and falling back is allowed: warned once)."""
    proxy = env.proxy()
    if proxy is None:
        return None
    if choose("daemon", "upstream", proxy) != "daemon":
        return None
    try:
        return find_endpoint(proxy)
    except (OSError, ValueError) as exc:
        if not env.fallback_enabled():
            raise DaemonUnavailable(f"nwbcache: cannot ask the daemon at {proxy}: {exc}") from exc
        return None


def route_to_daemon(
    builtins: dict[str, Any], model: Any = None, params: Mapping[str, Any] | None = None, **_: Any
) -> None:
    """botocore's ``before-endpoint-resolution.s3``: a read of one of the
    daemon's buckets goes to its S3 endpoint, path-style."""
    if model is None or getattr(model, "name", None) not in READ_OPERATIONS:
        return
    if builtins.get("SDK::Endpoint"):  # the user's own endpoint_url or AWS_ENDPOINT_URL_S3
        return
    bucket = (params or {}).get("Bucket")
    if not isinstance(bucket, str):
        return
    endpoint = _daemon_endpoint()
    if endpoint is not None and bucket in endpoint.regions:
        builtins["SDK::Endpoint"] = endpoint.url
        builtins["AWS::S3::ForcePathStyle"] = True


def _endpoint_of(fs: Any) -> str | None:
    """The endpoint an s3fs filesystem was given, or the environment's."""
    own = getattr(fs, "endpoint_url", None) or (fs.client_kwargs or {}).get("endpoint_url")
    own = own or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(own).rstrip("/") if own else None


def tuned_open(fs: Any, path: str, mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of an s3fs ``_open``, with S3FS_BLOCK_SIZE and S3FS_CACHE_TYPE
    when the file is read through the daemon and neither the call nor the
    filesystem chose a block size or cache type."""
    if "r" not in mode or options.get("block_size") or options.get("cache_type"):
        return options
    if fs.default_block_size != type(fs).default_block_size or fs.default_cache_type != (
        "readahead"
    ):
        return options
    endpoint = _daemon_endpoint()
    if endpoint is None:
        return options
    bucket = path.removeprefix("s3://").partition("/")[0]
    own = _endpoint_of(fs)
    if (own is None and bucket in endpoint.regions) or own == endpoint.url:
        return {**options, "block_size": S3FS_BLOCK_SIZE, "cache_type": S3FS_CACHE_TYPE}
    return options


def patch_s3fs(module: ModuleType) -> None:
    """``s3fs.core.S3FileSystem._open``: files read through the daemon get
    block-sized reads suited to a nearby cache (:func:`tuned_open`)."""
    cls = module.S3FileSystem
    original = cls._open
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def _open(self: Any, path: str, mode: str = "rb", *args: Any, **options: Any) -> Any:
        if not args:  # fsspec's open() passes keywords; anything else is left alone
            options = tuned_open(self, path, mode, options)
        return original(self, path, mode, *args, **options)

    setattr(_open, _PATCHED, True)
    cls._open = _open


def set_environment() -> None:
    """``NWBCACHE_S3_ENV=1``: put :func:`environment` into this process's
    environment (and so its children's), once, at start-up. A daemon that
    cannot be asked leaves it alone, with a warning, unless falling back is
    forbidden."""
    proxy = env.proxy()
    try:
        endpoint = find_endpoint(proxy)
    except (OSError, ValueError) as exc:
        if not env.fallback_enabled():
            raise DaemonUnavailable(f"nwbcache: cannot ask the daemon at {proxy}: {exc}") from exc
        import warnings

        warnings.warn(
            f"nwbcache: cannot ask the daemon at {proxy} for its S3 endpoint ({exc}); "
            "S3 clients will read straight from S3",
            FallbackWarning,
            stacklevel=2,
        )
        return
    if endpoint is not None:
        os.environ.update(environment(endpoint))


def patch_botocore(module: ModuleType) -> None:
    """Every ``botocore.session.Session`` (aiobotocore's is one) made from now on
    sends reads of the daemon's buckets to its endpoint."""
    cls = module.Session
    original = cls.__init__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.register("before-endpoint-resolution.s3", route_to_daemon, unique_id="nwbcache-s3")

    setattr(__init__, _PATCHED, True)
    cls.__init__ = __init__
