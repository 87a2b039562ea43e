"""The daemon's DANDI route: /dandi/<dandiset>/<version>/<path> -> S3 URL.

For tools that have no dandi package (curl, a browser, MATLAB): the daemon
asks the DANDI API which asset lives at that path and where its bytes are,
then serves them like any proxied object. Resolutions are cached for a TTL:
short for the draft (paths can be re-pointed), long for published versions
(immutable). Talks plain HTTP to the API; the dandi package is not needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from yarl import URL

from nwbcache.urls import AllowList, InvalidURL, UpstreamURL, parse_upstream_url

from .errors import BadRequest, NotAllowed, UpstreamStatus, UpstreamUnavailable
from .lru import BoundedLRU

# Draft paths can be re-pointed at new assets; published versions never change.
DRAFT_TTL = 300.0
PUBLISHED_TTL = 24 * 3600.0
_DANDISET_ID = re.compile(r"\d{6}")
_VERSION = re.compile(r"draft|\d+\.\d{6}\.\d{4}")
_API_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True, slots=True)
class DandiTarget:
    dandiset: str
    version: str
    path: str  # decoded, as the API stores asset paths


def parse_dandi_path(raw_path: str) -> DandiTarget:
    """``/dandi/000123/draft/sub-01/x.nwb`` (raw, percent-encoded) -> target. Pure."""
    parts = raw_path.split("/", 4)
    if len(parts) < 5 or parts[1] != "dandi" or not parts[4]:
        raise BadRequest("expected /dandi/<dandiset>/<version>/<path>")
    _, _, dandiset, version, encoded = parts
    if not _DANDISET_ID.fullmatch(dandiset):
        raise BadRequest(f"not a dandiset identifier: {dandiset!r} (six digits)")
    if not _VERSION.fullmatch(version):
        raise BadRequest(f"not a dandiset version: {version!r} (draft or 0.YYMMDD.HHMM)")
    path = unquote(encoded, errors="strict")
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments) or any(ord(c) < 32 for c in path):
        raise BadRequest("asset path has empty, '.' or '..' segments or control characters")
    return DandiTarget(dandiset, version, path)


def choose_content_url(content_urls: list[Any], allow: AllowList) -> UpstreamURL | None:
    """The first contentUrl the daemon may fetch (an allow-listed S3 URL). Pure."""
    for candidate in content_urls:
        if not isinstance(candidate, str):
            continue
        try:
            url = parse_upstream_url(candidate)
        except InvalidURL:
            continue
        if allow.permits(url):
            return url
    return None


class DandiResolver:
    def __init__(self, session: aiohttp.ClientSession, api_url: str, allow: AllowList) -> None:
        self._session = session
        self._api = api_url.rstrip("/")
        self._allow = allow
        self._cache: BoundedLRU[DandiTarget, tuple[float, UpstreamURL]] = BoundedLRU(10_000)
        self._pending: dict[DandiTarget, asyncio.Task[UpstreamURL]] = {}

    async def resolve(self, target: DandiTarget) -> UpstreamURL:
        cached = self._cache.get(target)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        task = self._pending.get(target)
        if task is None:
            task = asyncio.create_task(self._resolve(target))
            self._pending[target] = task
            task.add_done_callback(lambda _t: self._pending.pop(target, None))
        return await asyncio.shield(task)

    async def _resolve(self, target: DandiTarget) -> UpstreamURL:
        version_path = f"/dandisets/{target.dandiset}/versions/{target.version}"
        listing = await self._get_json(
            f"{version_path}/assets/", {"path": target.path, "page_size": "100"}
        )
        asset_id = next(
            (
                a.get("asset_id")
                for a in listing.get("results", [])
                if isinstance(a, dict) and a.get("path") == target.path
            ),
            None,
        )
        if not isinstance(asset_id, str):
            raise UpstreamStatus(
                f"no asset at {target.path!r} in dandiset {target.dandiset} {target.version}",
                status=404,
            )
        metadata = await self._get_json(f"{version_path}/assets/{quote(asset_id)}/", {})
        url = choose_content_url(list(metadata.get("contentUrl", [])), self._allow)
        if url is None:
            raise NotAllowed(
                f"asset {asset_id} has no contentUrl on this daemon's allow-list (--allow-upstream)"
            )
        ttl = DRAFT_TTL if target.version == "draft" else PUBLISHED_TTL
        self._cache.put(target, (time.monotonic() + ttl, url))
        return url

    async def _get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = URL(self._api + path).with_query(params) if params else URL(self._api + path)
        last_error = ""
        for attempt in range(_API_ATTEMPTS):
            try:
                async with self._session.get(url, headers={"Accept": "application/json"}) as resp:
                    if resp.status == 404:
                        raise UpstreamStatus(f"DANDI API: not found ({path})", status=404)
                    if resp.status in (401, 403):
                        # An embargoed dandiset: the API's refusal, passed on as it is.
                        raise UpstreamStatus(
                            f"DANDI API answered {resp.status} (embargoed?) for {path}",
                            status=resp.status,
                        )
                    if resp.status >= 500 or resp.status == 429:
                        last_error = f"DANDI API answered {resp.status}"
                    elif resp.status != 200:
                        raise UpstreamStatus(f"DANDI API answered {resp.status}", status=502)
                    else:
                        data = await resp.json(content_type=None)
                        if not isinstance(data, dict):
                            raise UpstreamUnavailable(
                                "DANDI API answered something other than JSON"
                            )
                        return data
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = f"DANDI API unreachable: {type(exc).__name__}"
            await asyncio.sleep(0.2 * 2**attempt)
        raise UpstreamUnavailable(last_error)
