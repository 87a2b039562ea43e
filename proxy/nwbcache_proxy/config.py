"""Settings of the daemon, from command line, environment and TOML file.

Precedence, highest first: command-line flag, ``NWBCACHE_*`` environment
variable, the TOML config file (``--config`` / ``NWBCACHE_CONFIG``), the
defaults below. Stdlib only (argparse, tomllib): the CLI of the light client
package builds its ``serve`` parser from here without importing aiohttp.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nwbcache.env import split_entries
from nwbcache.urls import DANDI_HOSTS, AllowList

from .policy import Eviction, parse_eviction
from .sizes import format_size, parse_size

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
# prometheus_client's variable for the directory where --workers N processes
# keep their metrics; read when prometheus_client is first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_CACHE_SIZE = 20 * 1024**3
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
    dandi_api_url: str = DEFAULT_DANDI_API_URL

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
        if self.retry_attempts < 1:
            raise ValueError("--retry-attempts must be at least 1")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json, got {self.log_format!r}")
        if self.max_upstream_connections < 1:
            raise ValueError("--max-upstream-connections must be at least 1")
        if self.stale_if_error < 0 or self.negative_ttl < 0 or self.revalidate_after < 0:
            raise ValueError("--revalidate-after, --stale-if-error and --negative-ttl must be >= 0")
        self.allow_list  # noqa: B018 - parses, raising ValueError on a bad entry
        self.immutable_list  # noqa: B018


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Option:
    field: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    repeatable: bool = False


_OPTIONS: tuple[_Option, ...] = (
    _Option("host", "--host", str, "address to listen on (default 127.0.0.1: this machine only)"),
    _Option("port", "--port", int, "port to listen on (default 8080; 0 picks a free one)"),
    _Option(
        "cache_dir",
        "--cache-dir",
        Path,
        "where cached blocks live (default $XDG_CACHE_HOME/nwbcache or ~/.cache/nwbcache)",
        "DIR",
    ),
    _Option(
        "cache_size",
        "--cache-size",
        parse_size,
        "upper bound of the cache on disk, e.g. 500M, 20G (default 20G)",
        "SIZE",
    ),
    _Option(
        "block_size",
        "--block-size",
        parse_size,
        "unit of caching and of upstream reads, e.g. 256K, 4M (default 256K)",
        "SIZE",
    ),
    _Option(
        "eviction",
        "--eviction",
        parse_eviction,
        "which blocks go when the cache is full: s3fifo (default; scan-resistant, "
        "keeps what is reused and every file's first block) or lru",
        "POLICY",
    ),
    _Option(
        "allow_upstream",
        "--allow-upstream",
        str,
        "upstream HOST[:PORT][/path-prefix] the daemon may read from; repeat for several "
        "(default: the DANDI bucket hosts)",
        "HOST",
        repeatable=True,
    ),
    _Option(
        "workers",
        "--workers",
        int,
        "daemon processes sharing the port and the cache (default 1)",
        "N",
    ),
    _Option(
        "readahead",
        "--readahead",
        parse_size,
        "how far ahead of a sequential reader to fetch (default 16M)",
        "SIZE",
    ),
    _Option(
        "revalidate_after",
        "--revalidate-after",
        float,
        "seconds before a cached object's version is checked upstream again (default 3600)",
        "SECONDS",
    ),
    _Option(
        "immutable",
        "--immutable",
        str,
        "HOST[:PORT][/path-prefix] of objects that never change, never revalidated; repeat "
        "for several (default: DANDI blobs; a URL with versionId is immutable anyway)",
        "PREFIX",
        repeatable=True,
    ),
    _Option(
        "stale_if_error",
        "--stale-if-error",
        float,
        "seconds past --revalidate-after that cached bytes are still served when upstream "
        "cannot confirm them (default 604800, a week)",
        "SECONDS",
    ),
    _Option(
        "negative_ttl",
        "--negative-ttl",
        float,
        "seconds a 404 from upstream is remembered (default 30; 401/403 never are)",
        "SECONDS",
    ),
    _Option(
        "trace",
        "--trace",
        lambda text: Path(text) if text else None,
        "append one JSON line per range read to FILE, for bench/policysim (default off; "
        "'' for off)",
        "FILE",
    ),
    _Option(
        "max_upstream_connections",
        "--max-upstream-connections",
        int,
        "concurrent upstream requests at most (default 32)",
        "N",
    ),
    _Option(
        "connect_timeout",
        "--connect-timeout",
        float,
        "seconds to connect upstream (default 10)",
        "SECONDS",
    ),
    _Option(
        "first_byte_timeout",
        "--first-byte-timeout",
        float,
        "seconds to wait for upstream's response headers (default 30)",
        "SECONDS",
    ),
    _Option(
        "read_timeout",
        "--read-timeout",
        float,
        "seconds an upstream body may stay idle (default 30)",
        "SECONDS",
    ),
    _Option(
        "retry_attempts",
        "--retry-attempts",
        int,
        "tries per upstream read, first included (default 5)",
        "N",
    ),
    _Option(
        "retry_base_delay",
        "--retry-base-delay",
        float,
        "base of the exponential backoff in seconds (default 0.2)",
        "SECONDS",
    ),
    _Option(
        "fsync",
        "--fsync",
        _parse_bool,
        "fsync each block before publishing it (default false: blocks carry a checksum "
        "that is verified before first use)",
        "BOOL",
    ),
    _Option(
        "log_level", "--log-level", str, "debug, info, warning or error (default info)", "LEVEL"
    ),
    _Option(
        "log_format",
        "--log-format",
        str,
        "text or json, one line per event (default text)",
        "FORMAT",
    ),
    _Option(
        "dandi_api_url",
        "--dandi-api-url",
        str,
        "DANDI API that the /dandi/<dandiset>/<version>/<path> route asks "
        f"(default {DEFAULT_DANDI_API_URL})",
        "URL",
    ),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``serve`` flags. Values default to None so that unset flags
    fall through to environment, config file and defaults."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=(
            "TOML file with the same settings (keys as the flags, with _ for -); "
            "env NWBCACHE_CONFIG"
        ),
    )
    for opt in _OPTIONS:
        kwargs: dict[str, Any] = {"help": opt.help, "metavar": opt.metavar, "dest": opt.field}
        if opt.repeatable:
            kwargs["action"] = "append"
        else:
            kwargs["type"] = opt.parse
        parser.add_argument(opt.flag, **kwargs)


def _env_name(field: str) -> str:
    return "NWBCACHE_" + field.upper()


def _coerce(opt: _Option, raw: Any, source: str) -> Any:
    try:
        if opt.repeatable:
            items = split_entries(raw) if isinstance(raw, str) else tuple(str(x) for x in raw)
            return items
        if isinstance(raw, str):
            return opt.parse(raw)
        if opt.parse is parse_size and isinstance(raw, int):
            return raw
        if opt.parse is Path:
            return Path(str(raw))
        return opt.parse(str(raw)) if not isinstance(raw, bool | int | float) else raw
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def load_settings(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge flags, environment and config file over the defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_path = getattr(args, "config", None) or env.get("NWBCACHE_CONFIG")
    if config_path:
        values.update(_read_config_file(Path(config_path)))
    for opt in _OPTIONS:
        name = _env_name(opt.field)
        if name in env and env[name] != "":
            values[opt.field] = _coerce(opt, env[name], name)
    if args is not None:
        for opt in _OPTIONS:
            given = getattr(args, opt.field, None)
            if given is not None:
                values[opt.field] = tuple(given) if opt.repeatable else given
    values.setdefault("cache_dir", default_cache_dir(env))
    settings = Settings(**values)
    settings.validate()
    return settings


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path}: {exc}") from None
    # Accept both a flat file and one with a [serve] table.
    table = data.get("serve", data)
    by_field = {opt.field: opt for opt in _OPTIONS}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        field = key.replace("-", "_")
        if field not in by_field:
            known = ", ".join(sorted(by_field))
            raise ValueError(f"config file {path}: unknown setting {key!r} (known: {known})")
        values[field] = _coerce(by_field[field], raw, f"{path}: {key}")
    return values


def describe(settings: Settings) -> str:
    """One line for the start-up log."""
    return (
        f"cache {settings.cache_dir} ({format_size(settings.cache_size)}, "
        f"blocks of {format_size(settings.block_size)}, eviction {settings.eviction.value}), "
        f"upstreams {', '.join(settings.allow_upstream)}"
    )
