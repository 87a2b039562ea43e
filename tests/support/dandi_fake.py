"""A fake of the DANDI Archive REST API, served over real HTTP on 127.0.0.1.

Enough of https://api.dandiarchive.org/api for ``dandi.dandiapi.DandiAPIClient``
(``dandi`` >= 0.60) and for plain HTTP clients to find an asset and follow its
``/download/`` redirect to the S3 URL of its bytes (e.g. an ``S3Emulator``).
Read-only: GET and HEAD; other methods answer 405 as the real (DRF) API does.

In-process use::

    with S3Emulator() as s3, FakeDandiAPI() as api:   # each on its own loop thread
        s3.put(KEY, data)
        api.add_dandiset("000123", versions=("draft", "0.230101.1200"))
        api.add_asset("000123", "sub-01/sub-01_ecephys.nwb", s3.url_for(KEY), len(data))
        with DandiAPIClient(api_url=api.api_url) as client:   # env: DANDI_OFFLINE_ENV
            ...

    async with FakeDandiAPI() as api:                  # serves on this loop
        ...

Keeping ``dandi`` off the internet: set ``DANDI_OFFLINE_ENV`` in the environment
before creating a client (``DANDI_NO_ET=1``: ``DandiAPIClient.__init__`` skips its
etelemetry "newer version?" check, which otherwise queries rig.mit.edu;
``NO_PROXY``: requests never sends loopback traffic to a configured proxy) and
always pass ``api_url=fake.api_url`` (without it the client resolves the "dandi"
instance, i.e. api.dandiarchive.org). With an explicit api_url the client's only
other request is ``GET <url>/server-info`` (dandi.utils.get_instance, cached per
URL), which this fake answers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import mimetypes
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from aiohttp import web
from dandischema.consts import ALLOWED_INPUT_SCHEMAS, DANDI_SCHEMA_VERSION
from dandischema.digests.dandietag import ETagHashlike
from yarl import URL

from tests.support.served import ServedApp

__all__ = [
    "DANDI_OFFLINE_ENV",
    "DRAFT",
    "ApiRequest",
    "FakeAsset",
    "FakeDandiAPI",
]

DRAFT = "draft"
#: Environment that keeps ``dandi`` from contacting anything but the given api_url.
DANDI_OFFLINE_ENV: dict[str, str] = {
    "DANDI_NO_ET": "1",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
}

_DANDISET_ID_RE = re.compile(r"\d{6}")
_PUBLISHED_RE = re.compile(r"0\.\d{6}\.\d{4}")
_PAGE_SIZE = 100  # the real API's default and maximum page sizes
_MAX_PAGE_SIZE = 1000
_ORDERS = ("created", "modified", "path")
_TRUE = ("1", "true", "True", "yes")
_CONTACT = "Doe, Jane"
_FAKE_ACCESS_KEY = "AKIAFAKEDANDIARCHIVE"
_EPOCH = datetime(2023, 1, 1, 12, 0, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeAsset:
    """One asset of one version; ``blob_url`` is where its bytes are (unsigned)."""

    asset_id: str  # uuid4 string
    path: str  # e.g. "sub-01/sub-01_ecephys.nwb"
    size: int
    blob_url: str  # e.g. "http://127.0.0.1:PORT/dandiarchive/blobs/abc/def/<uuid>"
    dandiset_id: str = ""
    version_id: str = DRAFT
    blob_id: str = ""  # the "blob" field: the blob's uuid (last segment of its key)
    encoding_format: str = "application/x-nwb"
    etag: str = ""  # dandi-etag digest: real when add_asset got data, else made up
    sha256: str = ""  # likewise
    created: datetime = _EPOCH
    modified: datetime = _EPOCH


@dataclass
class ApiRequest:
    """One request as the fake saw and answered it."""

    method: str
    path: str
    query: str  # raw, still percent-encoded
    headers: dict[str, str]
    status: int
    location: str | None = None  # the Location header of a redirect
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Version:
    identifier: str
    created: datetime
    modified: datetime
    assets: dict[str, FakeAsset] = field(default_factory=dict)  # by asset_id, in order


@dataclass
class _Dandiset:
    identifier: str
    name: str
    created: datetime
    versions: dict[str, _Version] = field(default_factory=dict)  # draft first
    embargoed: bool = False  # the API answers only to a token; blobs need a signature

    def published(self) -> list[_Version]:
        return [v for v in self.versions.values() if v.identifier != DRAFT]


class _NotFound(Exception):
    def __init__(self, detail: str = "Not found.") -> None:
        super().__init__(detail)
        self.detail = detail


class _BadRequest(Exception):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.body = body


_Handler = Callable[["FakeDandiAPI", web.Request, "re.Match[str]"], web.StreamResponse]


def _blob_id(blob_url: str) -> str:
    last = URL(blob_url).path.rstrip("/").rsplit("/", 1)[-1]
    try:
        return str(uuid.UUID(last))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, blob_url))


def _encoding_format(path: str) -> str:
    if path.endswith(".nwb"):
        return "application/x-nwb"
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def _publish_activity(moment: datetime) -> dict[str, Any]:
    """``publishedBy`` of published metadata, shaped like the real archive's."""
    return {
        "id": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, _iso(moment))}",
        "name": "DANDI publish",
        "schemaKey": "PublishActivity",
        "startDate": _iso(moment),
        "endDate": _iso(moment),
        "wasAssociatedWith": [
            {
                "id": "RRID:SCR_017571",
                "identifier": "RRID:SCR_017571",
                "name": "DANDI API",
                "version": "0.1.0",
                "schemaKey": "Software",
            }
        ],
    }


# The token that ``FakeDandiAPI.tokens`` holds from the start.
EMBARGO_TOKEN = "nwbcache-test-token"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class FakeDandiAPI(ServedApp):
    thread_name = "dandi-fake"

    """The DANDI REST API over real HTTP on 127.0.0.1, with a request log.

    presign: ``/download/`` redirects to a fresh presigned-looking S3 URL
        (``X-Amz-*`` query, new signature each time), as the real archive does;
        False: to the plain ``blob_url``. May be changed while serving.
    presigner: turns a blob URL into one the S3 emulator accepts (e.g. with
        ``S3Emulator.presign``); used for the downloads of embargoed dandisets.
    tokens: API tokens (``Authorization: token <t>``) that may see embargoed
        dandisets; without one the API answers 401, with another 403.
    page_size: the default page size of paginated listings (the real one: 100).
    """

    def __init__(self, *, presign: bool = True, page_size: int = _PAGE_SIZE) -> None:
        super().__init__()
        self.presign = presign
        self.presigner: Callable[[str], str] | None = None
        self.tokens: set[str] = {EMBARGO_TOKEN}
        self.page_size = page_size
        self.log: list[ApiRequest] = []
        self._lock = threading.Lock()
        self._dandisets: dict[str, _Dandiset] = {}
        self._assets: dict[str, FakeAsset] = {}
        self._last_time = _EPOCH

    # ------------------------------------------------------------------ content

    def _tick(self) -> datetime:
        """A strictly increasing timestamp (caller holds the lock)."""
        now = datetime.now(UTC)
        self._last_time = max(now, self._last_time + timedelta(microseconds=1))
        return self._last_time

    def add_dandiset(
        self,
        identifier: str = "000123",
        *,
        versions: Sequence[str] = (DRAFT,),
        name: str | None = None,
        embargoed: bool = False,
    ) -> None:
        """Create a Dandiset; "draft" always exists, other versions are published ones.

        Published identifiers look like "0.230101.1200"; they are created in sorted
        order, so the greatest is the most recent published version.
        """
        if not _DANDISET_ID_RE.fullmatch(identifier):
            raise ValueError(f"Dandiset identifier must be 6 digits: {identifier!r}")
        published = sorted({v for v in versions if v != DRAFT})
        for version in published:
            if not _PUBLISHED_RE.fullmatch(version):
                raise ValueError(f"published version must look like 0.YYMMDD.HHMM: {version!r}")
        with self._lock:
            if identifier in self._dandisets:
                raise ValueError(f"Dandiset {identifier} already exists")
            created = self._tick()
            dandiset = _Dandiset(
                identifier, name or f"Fake Dandiset {identifier}", created, embargoed=embargoed
            )
            dandiset.versions[DRAFT] = _Version(DRAFT, created, created)
            for version in published:
                moment = self._tick()
                dandiset.versions[version] = _Version(version, moment, moment)
            self._dandisets[identifier] = dandiset

    def add_asset(
        self,
        dandiset: str,
        path: str,
        blob_url: str,
        size: int,
        *,
        version: str = DRAFT,
        data: bytes | None = None,
    ) -> FakeAsset:
        """Add a blob asset (a new asset_id) at ``path`` in one version of a Dandiset.

        The version must exist (KeyError). Given the blob's ``data``, the metadata's
        digests are the real dandi-etag and sha2-256; otherwise well-formed fakes.
        """
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"asset path must be relative and normalized: {path!r}")
        if size < 0:
            raise ValueError("size must be >= 0")
        if data is not None and len(data) != size:
            raise ValueError(f"size {size} but {len(data)} bytes of data")
        if data is not None:
            hashlike = ETagHashlike(size)
            hashlike.update(data)
            etag, sha256 = hashlike.hexdigest(), hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.md5(blob_url.encode()).hexdigest() + "-1"
            sha256 = hashlib.sha256(blob_url.encode()).hexdigest()
        with self._lock:
            target = self._version(dandiset, version)
            if any(a.path == path for a in target.assets.values()):
                raise ValueError(f"{dandiset}/{version} already has an asset at {path!r}")
            moment = self._tick()
            asset_id = str(uuid.uuid4())
            asset = FakeAsset(
                asset_id=asset_id,
                path=path,
                size=size,
                blob_url=blob_url,
                dandiset_id=dandiset,
                version_id=version,
                blob_id=_blob_id(blob_url),
                encoding_format=_encoding_format(path),
                etag=etag,
                sha256=sha256,
                created=moment,
                modified=moment,
            )
            target.assets[asset_id] = asset
            target.modified = moment
            self._assets[asset_id] = asset
            return asset

    def _version(self, dandiset_id: str, version_id: str) -> _Version:
        dandiset = self._dandisets.get(dandiset_id)
        if dandiset is None:
            raise KeyError(f"no Dandiset {dandiset_id}")
        version = dandiset.versions.get(version_id)
        if version is None:
            raise KeyError(f"Dandiset {dandiset_id} has no version {version_id}")
        return version

    # --------------------------------------------------------------------- log

    def clear_log(self) -> None:
        self.log.clear()

    def requests(self, path: str | None = None, method: str | None = None) -> list[ApiRequest]:
        """Logged requests, optionally only those for ``path`` and/or ``method``."""
        wanted = method.upper() if method else None
        return [
            r
            for r in list(self.log)
            if (path is None or r.path == path) and (wanted is None or r.method == wanted)
        ]

    # -------------------------------------------------------------- JSON shapes

    def _server_info(self) -> dict[str, Any]:
        return {
            "schema_version": DANDI_SCHEMA_VERSION,
            "schema_url": (
                "https://raw.githubusercontent.com/dandi/schema/master/releases/"
                f"{DANDI_SCHEMA_VERSION}/dandiset.json"
            ),
            "allowed_schema_versions": list(ALLOWED_INPUT_SCHEMAS),
            "version": "0.0.0+nwbcache.fake",
            "cli-minimal-version": "0.60.0",
            "cli-bad-versions": [],
            "services": {
                "api": {"url": self.api_url},
                "webui": {"url": self.url},
            },
        }

    @staticmethod
    def _dandiset_brief(d: _Dandiset) -> dict[str, Any]:
        return {
            "identifier": d.identifier,
            "created": _iso(d.created),
            "modified": _iso(max(v.modified for v in d.versions.values())),
            "contact_person": _CONTACT,
            "embargo_status": "EMBARGOED" if d.embargoed else "OPEN",
            "star_count": 0,
            "is_starred": False,
        }

    def _version_json(self, d: _Dandiset, v: _Version, *, nested: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": v.identifier,
            "name": d.name,
            "asset_count": len(v.assets),
            "active_uploads": 0,
            "size": sum(a.size for a in v.assets.values()),
            "status": "Valid" if v.identifier == DRAFT else "Published",
            "created": _iso(v.created),
            "modified": _iso(v.modified),
        }
        if nested:
            body["dandiset"] = self._dandiset_brief(d)
        return body

    def _dandiset_json(self, d: _Dandiset) -> dict[str, Any]:
        published = d.published()
        return {
            **self._dandiset_brief(d),
            "most_recent_published_version": (
                self._version_json(d, published[-1], nested=False) if published else None
            ),
            "draft_version": self._version_json(d, d.versions[DRAFT], nested=False),
        }

    def _dandiset_metadata(self, d: _Dandiset, v: _Version) -> dict[str, Any]:
        """Dandiset metadata (valid for dandischema.models.Dandiset)."""
        vid = v.identifier
        url = f"{self.url}/dandiset/{d.identifier}/{vid}"
        meta: dict[str, Any] = {
            "@context": (
                "https://raw.githubusercontent.com/dandi/schema/master/releases/"
                f"{DANDI_SCHEMA_VERSION}/context.json"
            ),
            "schemaKey": "Dandiset",
            "schemaVersion": DANDI_SCHEMA_VERSION,
            "id": f"DANDI:{d.identifier}/{vid}",
            "identifier": f"DANDI:{d.identifier}",
            "version": vid,
            "name": d.name,
            "description": "A fake Dandiset served by nwbcache's tests.",
            "url": url,
            "repository": self.url,
            "dateCreated": _iso(d.created),
            "contributor": [
                {
                    "schemaKey": "Person",
                    "name": _CONTACT,
                    "email": "jane.doe@example.com",
                    "roleName": ["dcite:ContactPerson"],
                    "includeInCitation": True,
                }
            ],
            "license": ["spdx:CC-BY-4.0"],
            "access": [{"schemaKey": "AccessRequirements", "status": "dandi:OpenAccess"}],
            "citation": (
                f"{_CONTACT} ({d.created.year}) {d.name} (Version {vid}) [Data set]. "
                f"DANDI Archive. {url}"
            ),
            "assetsSummary": {
                "schemaKey": "AssetsSummary",
                "numberOfBytes": sum(a.size for a in v.assets.values()),
                "numberOfFiles": len(v.assets),
            },
            "manifestLocation": [f"{self.api_url}/dandisets/{d.identifier}/versions/{vid}/assets/"],
        }
        if vid != DRAFT:
            meta["doi"] = f"10.48324/dandi.{d.identifier}/{vid}"
            meta["datePublished"] = _iso(v.created)
            meta["publishedBy"] = _publish_activity(v.created)
        return meta

    def _asset_metadata(self, a: FakeAsset) -> dict[str, Any]:
        """Asset metadata (valid for dandischema.models.Asset)."""
        meta: dict[str, Any] = {
            "@context": (
                "https://raw.githubusercontent.com/dandi/schema/master/releases/"
                f"{DANDI_SCHEMA_VERSION}/context.json"
            ),
            "schemaKey": "Asset",
            "schemaVersion": DANDI_SCHEMA_VERSION,
            "id": f"dandiasset:{a.asset_id}",
            "identifier": a.asset_id,
            "path": a.path,
            "contentSize": a.size,
            "encodingFormat": a.encoding_format,
            "digest": {"dandi:dandi-etag": a.etag, "dandi:sha2-256": a.sha256},
            "contentUrl": [f"{self.api_url}/assets/{a.asset_id}/download/", a.blob_url],
            "access": [{"schemaKey": "AccessRequirements", "status": "dandi:OpenAccess"}],
            "repository": self.url,
            "dateModified": _iso(a.modified),
            "blobDateModified": _iso(a.created),
        }
        if a.version_id != DRAFT:
            published = self._dandisets[a.dandiset_id].versions[a.version_id].created
            meta["datePublished"] = _iso(published)
            meta["publishedBy"] = _publish_activity(published)
        return meta

    @staticmethod
    def _asset_json(a: FakeAsset) -> dict[str, Any]:
        return {
            "asset_id": a.asset_id,
            "blob": a.blob_id,
            "zarr": None,
            "path": a.path,
            "size": a.size,
            "created": _iso(a.created),
            "modified": _iso(a.modified),
        }

    def _asset_info(self, a: FakeAsset) -> dict[str, Any]:
        return {**self._asset_json(a), "metadata": self._asset_metadata(a)}

    # -------------------------------------------------------------- pagination

    def _paginate(self, request: web.Request, items: Sequence[dict[str, Any]]) -> web.Response:
        """A DRF PageNumberPagination page: count, next, previous, results."""
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get("page_size", str(self.page_size)))
        except ValueError:
            raise _NotFound("Invalid page.") from None
        size = max(1, min(size, _MAX_PAGE_SIZE))
        pages = max(1, -(-len(items) // size))
        if not 1 <= page <= pages:
            raise _NotFound("Invalid page.")
        here = request.url

        def link(number: int) -> str:
            if number == 1:  # DRF drops the page parameter for the first page
                query = [(k, v) for k, v in here.query.items() if k != "page"]
                return str(here.with_query(query))
            return str(here.update_query(page=number))

        return _json(
            {
                "count": len(items),
                "next": link(page + 1) if page < pages else None,
                "previous": link(page - 1) if page > 1 else None,
                "results": list(items[(page - 1) * size : page * size]),
            }
        )

    # ---------------------------------------------------------------- handlers

    def _get_dandiset(self, identifier: str) -> _Dandiset:
        dandiset = self._dandisets.get(identifier)
        if dandiset is None:
            raise _NotFound()
        return dandiset

    def _get_version(self, identifier: str, version: str) -> tuple[_Dandiset, _Version]:
        dandiset = self._get_dandiset(identifier)
        found = dandiset.versions.get(version)
        if found is None:
            raise _NotFound()
        return dandiset, found

    def _get_asset(self, asset_id: str, version: _Version | None = None) -> FakeAsset:
        asset = (version.assets if version is not None else self._assets).get(asset_id)
        if asset is None:
            raise _NotFound()
        return asset

    def _h_info(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return _json(self._server_info())

    def _h_auth_token(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        """What ``DandiAPIClient(token=...)`` asks to check its token."""
        token = request.headers.get("Authorization", "").removeprefix("token ").strip()
        if token in self.tokens:
            return _json(token)
        return _json({"detail": "Invalid token."}, status=401)

    def _h_dandisets(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return self._paginate(request, [self._dandiset_json(d) for d in self._dandisets.values()])

    def _h_dandiset(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return _json(self._dandiset_json(self._get_dandiset(m["d"])))

    def _h_versions(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        dandiset = self._get_dandiset(m["d"])
        versions = sorted(dandiset.versions.values(), key=lambda v: v.created)
        order = request.query.get("order")
        if order not in (None, "created", "-created"):
            raise _BadRequest(
                {"order": [f"Select a valid choice. {order} is not one of the available choices."]}
            )
        if order == "-created":
            versions.reverse()
        return self._paginate(
            request, [self._version_json(dandiset, v, nested=True) for v in versions]
        )

    def _h_version(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return _json(self._dandiset_metadata(*self._get_version(m["d"], m["v"])))

    def _h_version_info(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        dandiset, version = self._get_version(m["d"], m["v"])
        return _json(
            {
                **self._version_json(dandiset, version, nested=True),
                "metadata": self._dandiset_metadata(dandiset, version),
                "contact_person": _CONTACT,
                "asset_validation_errors": [],
                "version_validation_errors": [],
            }
        )

    def _h_assets(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        _, version = self._get_version(m["d"], m["v"])
        assets = list(version.assets.values())
        query = request.query
        if (prefix := query.get("path")) is not None:
            assets = [a for a in assets if a.path.startswith(prefix)]
        if (pattern := query.get("glob")) is not None:
            assets = [a for a in assets if fnmatch.fnmatchcase(a.path, pattern)]
        order = query.get("order", "created")
        if order.removeprefix("-") not in _ORDERS:
            raise _BadRequest(
                {"order": [f"Select a valid choice. {order} is not one of the available choices."]}
            )
        key: Callable[[FakeAsset], Any] = {
            "created": lambda a: a.created,
            "modified": lambda a: (a.modified, a.created),
            "path": lambda a: a.path,
        }[order.removeprefix("-")]
        assets.sort(key=key, reverse=order.startswith("-"))
        with_metadata = query.get("metadata") in _TRUE
        return self._paginate(
            request,
            [self._asset_info(a) if with_metadata else self._asset_json(a) for a in assets],
        )

    def _h_version_asset(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        _, version = self._get_version(m["d"], m["v"])
        return _json(self._asset_metadata(self._get_asset(m["a"], version)))

    def _h_version_asset_info(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        _, version = self._get_version(m["d"], m["v"])
        return _json(self._asset_info(self._get_asset(m["a"], version)))

    def _h_version_asset_download(
        self, request: web.Request, m: re.Match[str]
    ) -> web.StreamResponse:
        _, version = self._get_version(m["d"], m["v"])
        return self._redirect(self._get_asset(m["a"], version))

    def _h_asset(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return _json(self._asset_metadata(self._get_asset(m["a"])))

    def _h_asset_info(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return _json(self._asset_info(self._get_asset(m["a"])))

    def _h_asset_download(self, request: web.Request, m: re.Match[str]) -> web.StreamResponse:
        return self._redirect(self._get_asset(m["a"]))

    def _redirect(self, asset: FakeAsset) -> web.StreamResponse:
        if self._dandisets[asset.dandiset_id].embargoed and self.presigner is not None:
            location = self.presigner(asset.blob_url)
        elif self.presign:
            location = self.presigned_url(asset.blob_url)
        else:
            location = asset.blob_url
        return web.Response(status=302, headers={"Location": location})

    @staticmethod
    def presigned_url(blob_url: str, *, expires: int = 3600) -> str:
        """``blob_url`` with a fresh SigV4-looking query, as S3 presigning yields."""
        now = time.gmtime()
        credential = f"{_FAKE_ACCESS_KEY}/{time.strftime('%Y%m%d', now)}/us-east-2/s3/aws4_request"
        query = (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={quote(credential, safe='')}"
            f"&X-Amz-Date={time.strftime('%Y%m%dT%H%M%SZ', now)}"
            f"&X-Amz-Expires={expires}"
            "&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature={secrets.token_hex(32)}"
        )
        return f"{blob_url}{'&' if '?' in blob_url else '?'}{query}"

    # ----------------------------------------------------------------- routing

    _ID = r"(?P<d>\d{6})"
    _VER = r"(?P<v>draft|0\.\d{6}\.\d{4})"
    _ASSET = r"(?P<a>[0-9a-fA-F-]{36})"
    _ROUTES: tuple[tuple[re.Pattern[str], _Handler], ...] = (
        (re.compile(r"/server-info"), _h_info),
        (re.compile(r"/api/info/"), _h_info),
        (re.compile(r"/api/auth/token/"), _h_auth_token),
        (re.compile(r"/api/dandisets/"), _h_dandisets),
        (re.compile(rf"/api/dandisets/{_ID}/"), _h_dandiset),
        (re.compile(rf"/api/dandisets/{_ID}/versions/"), _h_versions),
        (re.compile(rf"/api/dandisets/{_ID}/versions/{_VER}/"), _h_version),
        (re.compile(rf"/api/dandisets/{_ID}/versions/{_VER}/info/"), _h_version_info),
        (re.compile(rf"/api/dandisets/{_ID}/versions/{_VER}/assets/"), _h_assets),
        (re.compile(rf"/api/dandisets/{_ID}/versions/{_VER}/assets/{_ASSET}/"), _h_version_asset),
        (
            re.compile(rf"/api/dandisets/{_ID}/versions/{_VER}/assets/{_ASSET}/info/"),
            _h_version_asset_info,
        ),
        (
            re.compile(rf"/api/dandisets/{_ID}/versions/{_VER}/assets/{_ASSET}/download/"),
            _h_version_asset_download,
        ),
        (re.compile(rf"/api/assets/{_ASSET}/"), _h_asset),
        (re.compile(rf"/api/assets/{_ASSET}/info/"), _h_asset_info),
        (re.compile(rf"/api/assets/{_ASSET}/download/"), _h_asset_download),
    )

    @classmethod
    def _route(cls, path: str) -> tuple[_Handler, re.Match[str]] | None:
        for pattern, handler in cls._ROUTES:
            if (match := pattern.fullmatch(path)) is not None:
                return handler, match
        return None

    def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        found = self._route(path)
        if found is None:
            if not path.endswith("/") and self._route(path + "/") is not None:
                # Django's APPEND_SLASH: a permanent redirect to the slashed URL.
                target = path + "/"
                if request.rel_url.raw_query_string:
                    target += "?" + request.rel_url.raw_query_string
                return web.Response(status=301, headers={"Location": target})
            return _json({"detail": "Not found."}, status=404)
        if request.method not in ("GET", "HEAD"):
            return _json(
                {"detail": f'Method "{request.method}" not allowed.'},
                status=405,
            )
        handler, match = found
        refusal = self._embargo_refusal(request, match)
        if refusal is not None:
            return refusal
        try:
            with self._lock:
                return handler(self, request, match)
        except _NotFound as exc:
            return _json({"detail": exc.detail}, status=404)
        except _BadRequest as exc:
            return _json(exc.body, status=400)

    def _embargo_refusal(self, request: web.Request, match: re.Match[str]) -> web.Response | None:
        """401/403 for a request about an embargoed dandiset without a valid token."""
        groups = match.groupdict()
        with self._lock:
            if "a" in groups and groups["a"] in self._assets:
                dandiset = self._dandisets.get(self._assets[groups["a"]].dandiset_id)
            else:
                dandiset = self._dandisets.get(groups.get("d") or "")
        if dandiset is None or not dandiset.embargoed:
            return None
        auth = request.headers.get("Authorization", "")
        if not auth:
            return _json({"detail": "Authentication credentials were not provided."}, status=401)
        if auth.removeprefix("token ").strip() not in self.tokens:
            return _json({"detail": "You do not have permission to perform this action."}, 403)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = self._dispatch(request)
        self.log.append(  # list.append is atomic: readers in other threads are safe
            ApiRequest(
                method=request.method,
                path=request.path,
                query=request.rel_url.raw_query_string,
                headers=dict(request.headers),
                status=response.status,
                location=response.headers.get("Location"),
            )
        )
        return response

    def app(self) -> web.Application:
        """A fresh aiohttp app bound to this fake's state."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # ----------------------------------------------------------------- serving

    @property
    def api_url(self) -> str:
        """What to give ``DandiAPIClient(api_url=...)``."""
        return self.url + "/api"

    def download_url(self, asset: FakeAsset | str) -> str:
        asset_id = asset if isinstance(asset, str) else asset.asset_id
        return f"{self.api_url}/assets/{asset_id}/download/"

    def assets(self) -> list[FakeAsset]:
        """Every asset of every version, in creation order."""
        with self._lock:
            return list(self._assets.values())
