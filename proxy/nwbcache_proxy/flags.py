"""Where the daemon's settings come from: flags, ``NWBCACHE_*`` variables, a TOML file.

Precedence, highest first: command-line flag, ``NWBCACHE_*`` environment
variable, the TOML config file (``--config`` / ``NWBCACHE_CONFIG``), the
defaults (config.py). One table (``_OPTIONS``) names each setting's flag,
parser and help for all three. Stdlib only (argparse, tomllib): the CLI of
the light client package builds its ``serve`` parser from here without
importing aiohttp.
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

from .buffers import AUTO_TEXT
from .config import DEFAULT_DANDI_API_URL, Settings, default_cache_dir
from .cpus import parse_workers
from .policy import parse_eviction
from .sizes import parse_size


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
        parse_workers,
        "daemon processes sharing the port and the cache; auto: one per CPU (default 1)",
        "N|auto",
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
        "event_loop",
        "--event-loop",
        str,
        "auto, uvloop or asyncio: the event loop the daemon runs on (default auto: uvloop "
        "where it is installed, else asyncio's own)",
        "LOOP",
    ),
    _Option(
        "dandi_api_url",
        "--dandi-api-url",
        str,
        "DANDI API that the /dandi/<dandiset>/<version>/<path> route asks "
        f"(default {DEFAULT_DANDI_API_URL})",
        "URL",
    ),
    _Option(
        "parent",
        "--parent",
        str,
        "a parent nwbcache daemon to fetch misses from instead of upstream, e.g. "
        "http://labcache:8080; repeat for several (each part of an object has one, by "
        "rendezvous hashing); upstream is asked when none is up",
        "URL",
        repeatable=True,
    ),
    _Option(
        "parent_group",
        "--parent-group",
        parse_size,
        "with several --parent, bytes of an object that go to one parent (default 16M)",
        "SIZE",
    ),
    _Option(
        "s3_listen",
        "--s3-listen",
        str,
        "HOST:PORT of the S3-compatible endpoint (boto3, s3fs, the AWS CLI, HDF5's ros3), "
        "path-style; off to turn it off (default 127.0.0.1:8081)",
        "HOST:PORT",
    ),
    _Option(
        "s3_bucket",
        "--s3-bucket",
        str,
        "NAME=URL: a bucket of the S3 endpoint and the upstream URL of its keys (must be "
        "allowed by --allow-upstream); repeat for several (default "
        "dandiarchive=https://dandiarchive.s3.amazonaws.com)",
        "NAME=URL",
        repeatable=True,
    ),
    _Option(
        "admin_token_file",
        "--admin-token-file",
        lambda text: Path(text) if text else None,
        "file holding the token the admin API (/admin/...) requires as 'Authorization: "
        "Bearer TOKEN'; without one, admin calls are accepted only while the daemon "
        "listens on loopback alone",
        "FILE",
    ),
    _Option(
        "pin_limit",
        "--pin-limit",
        lambda text: parse_size(text) if text.strip() else None,
        "what pinned objects may add up to, e.g. 5T (default: half of --cache-size); "
        "a pin beyond it is refused",
        "SIZE",
    ),
    _Option(
        "buffer_memory",
        "--buffer-memory",
        lambda text: None if text.strip().lower() in ("", "auto") else parse_size(text),
        "memory all workers together keep for bytes on their way (pooled buffers, "
        f"blocks just written, what responses gather), shared equally (default auto: "
        f"{AUTO_TEXT})",
        "SIZE|auto",
    ),
    _Option(
        "node_name",
        "--node-name",
        str,
        "this daemon's name in a cluster, sent as X-Served-By on every response "
        "(default: none, no header)",
        "NAME",
    ),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``serve`` flags. An unset flag sets nothing (SUPPRESS), so
    that it falls through to environment, config file and defaults, while one
    given as ``auto`` or empty (None) still overrides them."""
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
        kwargs["default"] = argparse.SUPPRESS
        if opt.repeatable:
            kwargs["action"] = "append"
        else:
            plain = opt.parse in (int, float, str, Path)  # argparse words those well
            kwargs["type"] = opt.parse if plain else _argument_type(opt.parse)
        parser.add_argument(opt.flag, **kwargs)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its own message in argparse's error, not "invalid <function
    name> value"."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _env_name(field: str) -> str:
    return "NWBCACHE_" + field.upper()


def _coerce(opt: _Option, raw: Any, source: str) -> Any:
    """A value from the environment (text) or the TOML file (any TOML type) as
    the setting's type, checked by its parser; a ValueError naming ``source``."""
    try:
        if opt.repeatable:
            if isinstance(raw, str):
                return split_entries(raw)
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise ValueError(f"expected a list of strings, got {raw!r}")
            return tuple(raw)
        if isinstance(raw, str):
            return opt.parse(raw)
        boolean = opt.parse is _parse_bool
        if isinstance(raw, bool) != boolean or not isinstance(raw, int | float):
            raise ValueError(
                f"expected {'true or false' if boolean else 'text or a number'}: {raw!r}"
            )
        # A number through the parser as text, whole ones without a point or an
        # exponent: 1.5e9 for a size is 1500000000 bytes, 1e16 is 10**16.
        return opt.parse(str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw))
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
            if hasattr(args, opt.field):
                given = getattr(args, opt.field)
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
