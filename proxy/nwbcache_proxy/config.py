"""What the daemon's settings are: their defaults, their checks, and a line describing them.

Where they come from (flags, ``NWBCACHE_*`` variables, a TOML file) is
flags.py. Stdlib only: the CLI of the light client package imports both
without importing aiohttp.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from nwbcache.urls import DANDI_HOSTS, AllowList

from .buffers import Budget, share
from .policy import Eviction
from .s3api import Bucket
from .sizes import format_size

# Why 256 KiB: remfile asks for 100 KiB at least and h5py's metadata reads are
# small and scattered, so a larger block multiplies upstream bytes on a cold
# open; sequential reads do not suffer from small blocks because consecutive
# missing blocks are fetched with a single upstream request (see fetcher.py).
DEFAULT_BLOCK_SIZE = 256 * 1024
# Objects that never change: DANDI blobs are written once under a fresh key
# (a changed asset gets a new blob), in every addressing style of the bucket.
DANDI_IMMUTABLE: tuple[str, ...] = tuple(f"{host}/blobs" for host in DANDI_HOSTS)
# How long cached bytes of a mutable object are served while upstream cannot
# confirm them (RFC 5861 stale-if-error): a week of S3 or network trouble.
DEFAULT_STALE_IF_ERROR = 7 * 24 * 3600.0
# How long a 404 is remembered, so a script asking in a loop does not hammer S3.
DEFAULT_NEGATIVE_TTL = 30.0
# The public DANDI Archive's API, behind the /dandi/... route.
DEFAULT_DANDI_API_URL = "https://api.dandiarchive.org/api"
# With several --parent, each group of this many bytes of an object has one
# parent (parents.py). The read-ahead's size (16 MiB): a sequential reader's
# window then spans two groups, so two parents fill it at once, and a 256 MiB
# file spreads over 16 groups. Measured (make bench-sharing, two parents, a
# 256 MiB scan, two runs), a cold child against a daemon reading the origin:
# 1.10-1.28x at 16 MiB, 1.24-1.40x at 4 MiB, 1.40-1.44x at 64 MiB (which put
# all four groups on one parent in one run).
DEFAULT_PARENT_GROUP = 16 * 1024 * 1024
# prometheus_client's variable for the directory where --workers N processes
# keep their metrics; read when prometheus_client is first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# --event-loop: auto (uvloop where installed), uvloop, asyncio (runner.new_loop).
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
DEFAULT_CACHE_SIZE = 20 * 1024**3
# The S3 endpoint (s3server.py): beside the proxied URLs' port, loopback only.
DEFAULT_S3_LISTEN = "127.0.0.1:8081"
# Its buckets when none are given: DANDI's, at the URL its proxied URLs use, so
# an object read both ways is one cache entry.
DEFAULT_S3_BUCKETS: tuple[str, ...] = ("dandiarchive=https://dandiarchive.s3.amazonaws.com",)
# --pin-limit's largest share of --cache-size.
MAX_PIN_SHARE = 0.9
# The shortest admin token accepted: a guessable token is no protection.
MIN_TOKEN_BYTES = 16
# --s3-listen values that turn the endpoint off ("" cannot be said in a variable).
_S3_OFF = frozenset({"", "off", "none", "no"})
# Read-ahead for sequential readers and plain GETs. Measured (bench/suite.py
# sweep, 30 ms / 80 MB/s per connection, cold scan of a 1 GB series): 1M
# 46.7 s, 4M 20.2 s, 16M 14.3 s (remfile direct: 17.1 s). Fetched as parallel
# requests (fetcher.MAX_RUN_BYTES) to beat per-connection caps, and only for
# readers that keep reading sequentially, never scattered metadata reads.
DEFAULT_READAHEAD = 16 * 1024 * 1024
# How long pure hits may serve an object that changed upstream (a changed ETag
# is caught on every upstream fetch anyway, by If-Match).
DEFAULT_REVALIDATE_AFTER = 3600.0


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nwbcache"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    cache_size: int = DEFAULT_CACHE_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    eviction: Eviction = Eviction.S3FIFO
    allow_upstream: tuple[str, ...] = DANDI_HOSTS
    workers: int = 1
    readahead: int = DEFAULT_READAHEAD
    revalidate_after: float = DEFAULT_REVALIDATE_AFTER
    immutable: tuple[str, ...] = DANDI_IMMUTABLE
    stale_if_error: float = DEFAULT_STALE_IF_ERROR
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    trace: Path | None = None
    max_upstream_connections: int = 32
    connect_timeout: float = 10.0
    first_byte_timeout: float = 30.0
    read_timeout: float = 30.0
    retry_attempts: int = 5
    retry_base_delay: float = 0.2
    fsync: bool = False
    log_level: str = "info"
    log_format: str = "text"
    event_loop: str = "auto"  # one of EVENT_LOOPS (runner.new_loop)
    dandi_api_url: str = DEFAULT_DANDI_API_URL
    node_name: str = ""
    parent: tuple[str, ...] = ()
    parent_group: int = DEFAULT_PARENT_GROUP
    s3_listen: str = DEFAULT_S3_LISTEN
    s3_bucket: tuple[str, ...] | None = None  # None: DEFAULT_S3_BUCKETS, those allowed
    admin_token_file: Path | None = None
    pin_limit: int | None = None  # None: half of cache_size
    buffer_memory: int | None = None  # None: auto (buffers.share)

    @property
    def buffer_budget(self) -> Budget:
        """One worker's share of --buffer-memory, by use (buffers.py)."""
        return Budget.of(share(self.buffer_memory, self.workers))

    @property
    def pin_bytes(self) -> int:
        """What pinned objects may add up to (--pin-limit)."""
        return self.cache_size // 2 if self.pin_limit is None else self.pin_limit

    def admin_token(self) -> bytes | None:
        """The admin API's token, read from --admin-token-file (surrounding
        whitespace dropped: ``echo`` adds a newline); None when none is set."""
        if self.admin_token_file is None:
            return None
        try:
            token = self.admin_token_file.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"--admin-token-file: cannot read it: {exc}") from None
        if len(token) < MIN_TOKEN_BYTES:
            raise ValueError(
                f"--admin-token-file holds {len(token)} bytes; use at least "
                f"{MIN_TOKEN_BYTES} random ones, e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))' > FILE"
            )
        return token

    @property
    def s3_address(self) -> tuple[str, int] | None:
        """Where the S3 endpoint listens; None when it is off."""
        text = self.s3_listen.strip()
        if text.lower() in _S3_OFF:
            return None
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--s3-listen takes HOST:PORT (or off), got {self.s3_listen!r}")
        return host, int(port)

    @property
    def s3_buckets(self) -> tuple[Bucket, ...]:
        """The S3 endpoint's buckets. Given ones must be allow-listed; of the
        default, only what the allow-list permits (a daemon for another
        store does not serve DANDI's bucket)."""
        allow = self.allow_list
        if self.s3_bucket is None:
            defaults = (Bucket.parse(entry) for entry in DEFAULT_S3_BUCKETS)
            return tuple(b for b in defaults if allow.permits(b.root))
        buckets = tuple(Bucket.parse(entry) for entry in self.s3_bucket)
        for bucket in buckets:
            if not allow.permits(bucket.root):
                raise ValueError(
                    f"--s3-bucket {bucket.name}: {bucket.base} is not on --allow-upstream"
                )
        if len({b.name for b in buckets}) < len(buckets):
            raise ValueError("--s3-bucket: a bucket name is given twice")
        return buckets

    @property
    def allow_list(self) -> AllowList:
        return AllowList.parse(self.allow_upstream)

    @property
    def immutable_list(self) -> AllowList:
        return AllowList.parse(self.immutable)

    def validate(self) -> None:
        """Raise ValueError with a message a newcomer can act on."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if not 4 <= self.block_size <= 64 * 1024**2:
            raise ValueError(f"--block-size must be between 4 B and 64 MiB, got {self.block_size}")
        if self.cache_size < self.block_size * 4:
            raise ValueError(
                f"--cache-size {format_size(self.cache_size)} is too small for "
                f"--block-size {format_size(self.block_size)} (need at least 4 blocks)"
            )
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        self.buffer_budget  # noqa: B018 - raises ValueError below buffers.MIN_SHARE
        if self.retry_attempts < 1:
            raise ValueError("--retry-attempts must be at least 1")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(
                f"--event-loop must be {', '.join(EVENT_LOOPS[:-1])} or {EVENT_LOOPS[-1]}, "
                f"got {self.event_loop!r}"
            )
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json, got {self.log_format!r}")
        if self.max_upstream_connections < 1:
            raise ValueError("--max-upstream-connections must be at least 1")
        if self.stale_if_error < 0 or self.negative_ttl < 0 or self.revalidate_after < 0:
            raise ValueError("--revalidate-after, --stale-if-error and --negative-ttl must be >= 0")
        if self.node_name and not _NODE_NAME.fullmatch(self.node_name):
            raise ValueError(
                f"--node-name must be 1-64 letters, digits, '.', '_' or '-', got {self.node_name!r}"
            )
        for url in self.parent:
            if not _PARENT_URL.fullmatch(url):
                raise ValueError(
                    "--parent must be a daemon's base URL, http(s)://HOST:PORT[/prefix], "
                    f"got {url!r}"
                )
        if self.parent_group < self.block_size or self.parent_group % self.block_size:
            raise ValueError("--parent-group must be a whole number of blocks (--block-size)")
        self.allow_list  # noqa: B018 - parses, raising ValueError on a bad entry
        self.immutable_list  # noqa: B018
        self.s3_address  # noqa: B018
        self.s3_buckets  # noqa: B018
        if not 0 <= self.pin_bytes <= self.cache_size * MAX_PIN_SHARE:
            raise ValueError(
                f"--pin-limit must be between 0 and {MAX_PIN_SHARE:.0%} of --cache-size "
                f"({format_size(int(self.cache_size * MAX_PIN_SHARE))}), got "
                f"{format_size(self.pin_bytes)}: pinned objects keep their block headers "
                "and a new version of them beside the old, and the rest of the cache "
                "needs room to work"
            )
        self.admin_token()


# A parent daemon's base URL: no query, no fragment, no credentials in it.
_PARENT_URL = re.compile(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?(/[A-Za-z0-9._~\-/]*)?")
# A header value and a log field: no spaces, no control characters.
_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def describe(settings: Settings) -> str:
    """One line for the start-up log."""
    return (
        f"cache {settings.cache_dir} ({format_size(settings.cache_size)}, "
        f"blocks of {format_size(settings.block_size)}, eviction {settings.eviction.value}), "
        f"buffers {format_size(settings.buffer_budget.total)} per worker, "
        f"upstreams {', '.join(settings.allow_upstream)}"
    )
