"""``nwbcache pin / unpin / evict / ls``: the daemon's admin API from the command line.

A TARGET is an object's URL (``s3://bucket/key``, ``https://...``, or its
proxied URL under the daemon) or a DANDI asset set, ``DANDISET[@VERSION][/GLOB]``
(``000006``, ``000006@0.220126.1852/sub-anm372795/*.nwb``), listed with dandi's
own client. The token comes from ``$NWBCACHE_ADMIN_TOKEN``, else the file
``--token-file`` or ``$NWBCACHE_ADMIN_TOKEN_FILE`` names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

from . import env
from .urls import InvalidURL, _proxy, key_of, original_url, parse_upstream_url, redact_url

ENV_ADMIN_TOKEN = "NWBCACHE_ADMIN_TOKEN"
ENV_ADMIN_TOKEN_FILE = "NWBCACHE_ADMIN_TOKEN_FILE"  # also the daemon's --admin-token-file
# DANDISET[@VERSION][/GLOB]; "DANDI:" in front is allowed, as DANDI writes ids.
_DANDI_TARGET = re.compile(r"(?:DANDI:)?(\d{6})(?:@([^/\s]+))?(?:/(.+))?", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
ZARR_SKIP = "a Zarr asset: only HDF5 files are cached"
# Asset URLs looked up at once (each follows the API's redirect).
_LOOKUPS = 8
COMMANDS = ("pin", "unpin", "evict", "ls")


class AdminError(Exception):
    """A message for the user; exit status 1 (2: usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    url: str  # the object's upstream URL
    label: str  # what the user knows it by (an asset path, or the URL)
    skip: str | None = None  # why it is listed but not a file to act on (a Zarr asset)


@dataclasses.dataclass(frozen=True, slots=True)
class DandiSet:
    dandiset: str
    version: str
    glob: str | None


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"a duration is a positive number with s, m, h, d or w, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_dandi_target(text: str) -> DandiSet | None:
    m = _DANDI_TARGET.fullmatch(text.strip())
    if m is None:
        return None
    return DandiSet(m.group(1), m.group(2) or "draft", m.group(3))


def common_options() -> argparse.ArgumentParser:
    """The options every admin command takes: where the daemon is, the token."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--proxy", help=f"the daemon's base URL (default ${env.ENV_URL})")
    common.add_argument(
        "--token-file", help=f"file with the admin token (default ${ENV_ADMIN_TOKEN}, "
        f"else ${ENV_ADMIN_TOKEN_FILE})"
    )  # fmt: skip
    common.add_argument("--dandi-api-url", help="the DANDI API for DANDISET targets")
    common.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    return common


def add_commands(sub: Any) -> None:
    """The admin subcommands of ``nwbcache``."""
    common = common_options()
    targets_help = "URL, proxied URL, or DANDISET[@VERSION][/GLOB] (e.g. 000006/sub-*/*.nwb)"
    pin = sub.add_parser(
        "pin",
        parents=[common],
        help="keep objects in the cache whatever the eviction policy says",
        description="Pin objects: their blocks, cached now or later, are never evicted, by "
        "any process on the cache dir, across restarts. Pinned sizes add up against the "
        "daemon's --pin-limit; pins that do not fit are refused, all of them.",
        epilog="Example: nwbcache pin 000006@draft --ttl 7d",
    )
    pin.add_argument("targets", nargs="+", metavar="TARGET", help=targets_help)
    pin.add_argument(
        "--ttl", type=_duration, help="unpin after this long (30d, 12h; default never)"
    )
    unpin = sub.add_parser("unpin", parents=[common], help="let pinned objects go again")
    unpin.add_argument("targets", nargs="+", metavar="TARGET", help=targets_help)
    evict = sub.add_parser(
        "evict",
        parents=[common],
        help="drop objects from the cache now",
        description="Drop what the cache holds of the objects: blocks, metadata, index rows. "
        "Pinned objects are skipped unless --unpin.",
    )
    evict.add_argument("targets", nargs="*", metavar="TARGET", help=targets_help)
    evict.add_argument("--prefix", help="every cached object whose URL starts with this")
    evict.add_argument("--unpin", action="store_true", help="unpin and evict pinned ones too")
    ls = sub.add_parser(
        "ls",
        parents=[common],
        help="list cached objects: bytes, blocks, pinned, last use, hits",
        description="List what the cache holds, object by object. With a DANDISET target, "
        "objects are named by their asset paths.",
    )
    ls.add_argument("targets", nargs="*", metavar="TARGET", help=targets_help)
    ls.add_argument("--prefix", help="only objects whose URL starts with this")
    ls.add_argument(
        "--sort", default="bytes", choices=("bytes", "last-use", "hits", "url"), help="order"
    )
    ls.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(
    args: argparse.Namespace, handler: Callable[[Api, argparse.Namespace], int] | None = None
) -> int:
    """Run an admin command (``handler``, else this module's): its errors as
    one line on stderr and an exit status."""
    try:
        api = Api(_daemon(args.proxy), _token(args.token_file))
        return (handler or _COMMANDS[args.command])(api, args)
    except AdminError as exc:
        sys.stderr.write(f"nwbcache {args.command}: {exc}\n")
        return exc.status
    except KeyboardInterrupt:
        return 130


class Api:
    def __init__(self, base: str, token: str | None) -> None:
        self.base = base
        self.token = token
        # No proxies: the daemon is on this machine or the lab network.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:  # never to where a redirect points
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        try:
            with self.opener.open(request, timeout=600) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
                return answer
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise AdminError(f"the daemon said {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(f"cannot reach the daemon at {self.base}: {exc}") from None


def _daemon(proxy: str | None) -> str:
    text = proxy if proxy is not None else env.proxy() or env.DEFAULT_DAEMON_URL
    try:
        return _proxy(text).base
    except InvalidURL as exc:
        raise AdminError(str(exc), 2) from None


def _token(path: str | None) -> str | None:
    if path is None and os.environ.get(ENV_ADMIN_TOKEN):
        return os.environ[ENV_ADMIN_TOKEN].strip()
    path = path or os.environ.get(ENV_ADMIN_TOKEN_FILE)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise AdminError(f"cannot read the admin token: {exc}", 2) from None


def resolve(
    texts: Sequence[str], base: str, api_url: str | None, *, keep_skipped: bool = False
) -> list[Target]:
    """The objects the TARGETs name (a DANDI asset set through the DANDI API);
    with ``keep_skipped``, Zarr assets too, marked, for the job's report."""
    found: list[Target] = []
    for text in texts:
        dandi = parse_dandi_target(text)
        if dandi is not None:
            found += [t for t in _assets(dandi, api_url) if keep_skipped or t.skip is None]
            continue
        try:
            if text.startswith(base + "/"):
                url = original_url(text, base)
            else:
                url = parse_upstream_url(text).url
        except InvalidURL as exc:
            raise AdminError(
                f"{text!r} is neither a URL nor DANDISET[@VERSION][/GLOB]: {exc}", 2
            ) from None
        found.append(Target(url, redact_url(text)))  # a label: no signature in it
    return found


def _assets(target: DandiSet, api_url: str | None) -> list[Target]:
    from dandi.dandiapi import AssetType, DandiAPIClient  # heavy: only here

    try:
        with DandiAPIClient(api_url=api_url) as client:
            dandiset = client.get_dandiset(target.dandiset, target.version)
            assets = list(
                dandiset.get_assets_by_glob(target.glob) if target.glob else dandiset.get_assets()
            )
            zarrs = [a for a in assets if a.asset_type is AssetType.ZARR]
            for a in zarrs:
                sys.stderr.write(f"skipped {a.path}: a Zarr asset (only HDF5 files are cached)\n")
            files = [a for a in assets if a.asset_type is not AssetType.ZARR]

            def url_of(asset: Any) -> Target:
                return Target(
                    str(asset.get_content_url(follow_redirects=1, strip_query=True)), asset.path
                )

            with ThreadPoolExecutor(_LOOKUPS) as pool:
                targets = list(pool.map(url_of, files))
            skipped = [Target(a.api_url, a.path, ZARR_SKIP) for a in zarrs]
            return targets + skipped
    except AdminError:
        raise
    except Exception as exc:  # the DANDI client's: not found, HTTP, connection
        raise AdminError(
            f"DANDI {target.dandiset}@{target.version}: {type(exc).__name__}: {exc}"
        ) from None


def _pin(api: Api, args: argparse.Namespace) -> int:
    targets = _targets(api, args)
    body: dict[str, Any] = {"urls": [t.url for t in targets]}
    if args.ttl is not None:
        body["ttl"] = args.ttl
    answer = api.call("POST", "/admin/pins", body)
    if args.json:
        return _print_json(answer)
    labels = {key_of(t.url): t.label for t in targets}
    for p in answer["pinned"]:
        until = "" if p["expires"] is None else f" until {_when(p['expires'])}"
        state = "pinned" if p["new"] else "pinned already, renewed"
        print(f"{state}: {labels.get(p['url'], p['url'])} ({size_text(p['size'])}){until}")
    print(f"pinned in all: {size_text(answer['pinned_bytes'])}")
    return 0


def _unpin(api: Api, args: argparse.Namespace) -> int:
    answer = api.call("DELETE", "/admin/pins", {"urls": [t.url for t in _targets(api, args)]})
    if args.json:
        return _print_json(answer)
    for key in answer["unpinned"]:
        print(f"unpinned: {key}")
    for key in answer["not_pinned"]:
        print(f"was not pinned: {key}")
    return 0


def _evict(api: Api, args: argparse.Namespace) -> int:
    if bool(args.prefix) == bool(args.targets):
        raise AdminError("give TARGETs or --prefix (one of them)", 2)
    body: dict[str, Any] = {"unpin": args.unpin}
    if args.prefix:
        body["prefix"] = args.prefix
    else:
        body["urls"] = [t.url for t in _targets(api, args)]
    answer = api.call("POST", "/admin/evict", body)
    if args.json:
        return _print_json(answer)
    print(f"evicted {answer['objects']} objects, {size_text(answer['bytes'])}")
    for key in answer["skipped_pinned"]:
        print(f"skipped (pinned; --unpin to evict it too): {key}")
    return 0


def _ls(api: Api, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"sort": args.sort, "limit": 0 if args.targets else args.limit}
    if args.prefix:
        query["prefix"] = args.prefix
    answer = api.call("GET", f"/admin/objects?{urlencode(query)}")
    objects = answer["objects"]
    if args.targets:
        labels = {key_of(t.url): t.label for t in _targets(api, args)}
        objects = [dict(o, label=labels[o["url"]]) for o in objects if o["url"] in labels]
        answer["objects"] = objects
    if args.json:
        return _print_json(answer)
    print(
        f"{'CACHED':>10} {'SIZE':>10} {'BLOCKS':>8} {'PIN':>3} {'LAST USE':>16} {'HITS':>8}  OBJECT"
    )
    for o in objects:
        size = "?" if o["size"] is None else size_text(o["size"])
        pinned = "yes" if o["pinned"] else ""
        name = o.get("label") or o["url"] or "(metadata gone)"
        print(
            f"{size_text(o['cached_bytes']):>10} {size:>10} {o['blocks']:>8} {pinned:>3} "
            f"{_when(o['last_use']):>16} {o['hits']:>8}  {name}"
        )
    print(
        f"{len(objects)} objects; pinned {size_text(answer['pinned_bytes'])} of "
        f"{size_text(answer['pin_limit'])} (--pin-limit)"
    )
    return 0


def _targets(api: Api, args: argparse.Namespace) -> list[Target]:
    targets = resolve(args.targets, api.base, args.dandi_api_url)
    if not targets:
        raise AdminError("the targets name no object")
    return targets


def _print_json(answer: dict[str, Any]) -> int:
    print(json.dumps(answer, indent=2))
    return 0


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop returns


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


_COMMANDS = {"pin": _pin, "unpin": _unpin, "evict": _evict, "ls": _ls}
