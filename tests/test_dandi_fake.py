"""The fake DANDI API (dandi_fake.py), driven by the real dandi client and by requests.

Everything stays on 127.0.0.1: the environment gets DANDI_OFFLINE_ENV (DANDI_NO_ET
skips dandi's etelemetry check, NO_PROXY keeps loopback traffic off any proxy)
and name resolution of any other host fails the test.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import requests
from dandi.dandiapi import DandiAPIClient, RemoteBlobAsset
from dandi.exceptions import NotFoundError
from dandi.utils import _get_instance, get_instance
from dandischema import models
from dandischema.consts import DANDI_SCHEMA_VERSION

from tests.support.dandi_fake import DANDI_OFFLINE_ENV, FakeAsset, FakeDandiAPI
from tests.support.helpers import wait_until
from tests.support.s3emu import S3Emulator

DANDISET = "000123"
PUBLISHED = "0.230101.1200"
OLDER = "0.221201.0900"
NWB_PATH = "sub-01/sub-01_ecephys.nwb"
KEY = "/dandiarchive/blobs/abc/def/0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
DATA = bytes(range(256)) * 16  # 4096 bytes
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SIGNED_KEYS = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """dandi's offline environment, and a failure for any non-loopback lookup."""
    for name, value in DANDI_OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    attempted: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK:
            attempted.append(str(name))
            raise socket.gaierror(f"test is offline: {name}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield attempted
    assert attempted == [], f"tried to reach {attempted}"


@pytest.fixture
def s3() -> Iterator[S3Emulator]:
    with S3Emulator() as emu:
        emu.put(KEY, DATA)
        yield emu


@pytest.fixture
def fake() -> Iterator[FakeDandiAPI]:
    with FakeDandiAPI() as api:
        yield api


@pytest.fixture
def seeded(fake: FakeDandiAPI, s3: S3Emulator) -> dict[str, FakeAsset]:
    """000123 with a draft (3 assets) and two published versions (one asset each)."""
    fake.add_dandiset(DANDISET, versions=("draft", PUBLISHED, OLDER))
    blob = s3.url_for(KEY)
    return {
        "draft": fake.add_asset(DANDISET, NWB_PATH, blob, len(DATA)),
        # Has NWB_PATH as a proper prefix: the path filter returns both.
        "sidecar": fake.add_asset(DANDISET, NWB_PATH + ".json", blob + "-json", 12),
        "other": fake.add_asset(DANDISET, "sub-02/sub-02_ecephys.nwb", blob + "-2", 34),
        "published": fake.add_asset(DANDISET, NWB_PATH, blob, len(DATA), version=PUBLISHED),
        "older": fake.add_asset(DANDISET, NWB_PATH, blob, len(DATA), version=OLDER),
    }


@pytest.fixture
def client(fake: FakeDandiAPI) -> Iterator[DandiAPIClient]:
    with DandiAPIClient(api_url=fake.api_url) as dandi_client:
        yield dandi_client


def settled(emu: S3Emulator, count: int) -> list[Any]:
    """The emulator's log once it has ``count`` entries: it logs after responding."""
    wait_until(lambda: len(emu.log) >= count, 5, interval=0.005)
    return list(emu.log)


def assert_presigned(location: str, blob_url: str) -> dict[str, list[str]]:
    assert location.startswith(blob_url + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    query = parse_qs(urlsplit(location).query)
    assert list(query) == SIGNED_KEYS
    assert query["X-Amz-Expires"] == ["3600"]
    assert query["X-Amz-SignedHeaders"] == ["host"]
    assert re.fullmatch(r"\d{8}T\d{6}Z", query["X-Amz-Date"][0])
    assert re.fullmatch(r"[^/]+/\d{8}/us-east-2/s3/aws4_request", query["X-Amz-Credential"][0])
    assert re.fullmatch(r"[0-9a-f]{64}", query["X-Amz-Signature"][0])
    return query


# ------------------------------------------------------------------ seed flow


def test_seed_tutorial_flow_gives_the_blob_url(
    fake: FakeDandiAPI, s3: S3Emulator, seeded: dict[str, FakeAsset]
) -> None:
    # dandi keeps server info per URL (an lru_cache): a fake on a port an
    # earlier test's fake had is answered from it, without the request
    # counted below (CI saw that once).
    _get_instance.cache_clear()
    with DandiAPIClient(api_url=fake.api_url) as client:
        asset = client.get_dandiset(DANDISET, "draft").get_asset_by_path(NWB_PATH)
        s3_url = asset.get_content_url(follow_redirects=1, strip_query=True)
    assert s3_url == seeded["draft"].blob_url == s3.url_for(KEY)
    assert asset.identifier == seeded["draft"].asset_id
    # follow_redirects=1: one HEAD of the API's download URL, whose Location is
    # taken without being requested; S3 sees nothing.
    heads = fake.requests(method="HEAD")
    assert [h.path for h in heads] == [f"/api/assets/{asset.identifier}/download/"]
    assert heads[0].status == 302 and heads[0].location is not None
    assert_presigned(heads[0].location, s3_url)
    assert s3.log == []
    assert [r.path for r in fake.requests(method="GET")] == [
        "/server-info",  # dandi.utils.get_instance(api_url), in DandiAPIClient.__init__
        f"/api/dandisets/{DANDISET}/versions/draft/assets/",  # ?path=: get_asset_by_path
        # get_content_url reads contentUrl from the asset's metadata:
        f"/api/dandisets/{DANDISET}/versions/draft/assets/{asset.identifier}/",
    ]
    assert parse_qs(fake.requests(method="GET")[1].query) == {"path": [NWB_PATH]}
    # The stripped URL is a plain S3 GetObject URL.
    assert requests.get(s3_url, timeout=5).content == DATA


def test_follow_redirects_true_survives_s3_refusing_head_on_presigned_url(
    client: DandiAPIClient, s3: S3Emulator, seeded: dict[str, FakeAsset]
) -> None:
    asset = client.get_dandiset(DANDISET, "draft").get_asset_by_path(NWB_PATH)
    # HEAD with redirects followed reaches S3 with the GET-signed query: 403, as on
    # real S3; dandi then takes the URL of that failed request.
    url = asset.get_content_url(follow_redirects=True)
    assert_presigned(url, seeded["draft"].blob_url)
    assert asset.get_content_url(follow_redirects=True, strip_query=True) == s3.url_for(KEY)
    heads = settled(s3, 2)
    assert [h.method for h in heads] == ["HEAD", "HEAD"]
    assert len(heads) == 2 and {h.status for h in heads} == {403}
    assert all("X-Amz-Signature=" in h.query for h in heads)


def test_unsigned_redirect_is_followed_to_the_blob(
    fake: FakeDandiAPI, client: DandiAPIClient, s3: S3Emulator, seeded: dict[str, FakeAsset]
) -> None:
    fake.presign = False
    asset = client.get_dandiset(DANDISET, "draft").get_asset_by_path(NWB_PATH)
    assert asset.get_content_url(follow_redirects=True) == s3.url_for(KEY)
    assert asset.get_content_url(follow_redirects=1) == s3.url_for(KEY)
    assert [(r.method, r.status, r.query) for r in settled(s3, 1)] == [("HEAD", 200, "")]


def test_download_follows_the_redirect_with_get(
    client: DandiAPIClient, s3: S3Emulator, seeded: dict[str, FakeAsset]
) -> None:
    asset = client.get_dandiset(DANDISET, "draft").get_asset_by_path(NWB_PATH)
    downloader = asset.get_download_file_iter(chunk_size=1024)
    assert b"".join(downloader(0)) == DATA
    assert b"".join(downloader(1000)) == DATA[1000:]
    gets = settled(s3, 2)
    assert {(g.method, g.path) for g in gets} == {("GET", KEY)}
    assert [(g.status, g.range) for g in gets] == [(200, None), (206, "bytes=1000-")]
    assert all("X-Amz-Signature=" in g.query for g in gets)
    signatures = {parse_qs(g.query)["X-Amz-Signature"][0] for g in gets}
    assert len(signatures) == 2  # a fresh presigned URL per redirect


# ------------------------------------------------------- dandisets and versions


def test_get_dandiset_without_version_is_the_most_recent_published(
    client: DandiAPIClient, seeded: dict[str, FakeAsset]
) -> None:
    dandiset = client.get_dandiset(DANDISET)
    assert dandiset.version_id == PUBLISHED
    assert dandiset.contact_person == "Doe, Jane"
    assert dandiset.draft_version.identifier == "draft"
    assert dandiset.draft_version.asset_count == 3
    assert [a.identifier for a in dandiset.get_assets()] == [seeded["published"].asset_id]
    eager = client.get_dandiset(DANDISET, lazy=False)
    assert eager.version_id == PUBLISHED
    assert eager.version.size == len(DATA)


def test_explicit_versions(client: DandiAPIClient, seeded: dict[str, FakeAsset]) -> None:
    draft = client.get_dandiset(DANDISET, "draft", lazy=False)
    assert draft.version_id == "draft"
    assert draft.version.asset_count == 3
    older = client.get_dandiset(DANDISET, OLDER, lazy=False)
    assert older.version_id == OLDER
    assert older.version.status.value == "Published"
    asset = older.get_asset_by_path(NWB_PATH)
    assert asset.identifier == seeded["older"].asset_id
    assert asset.get_content_url(follow_redirects=1, strip_query=True) == seeded["older"].blob_url
    info = draft.get_version(PUBLISHED)
    assert info.asset_validation_errors == [] and info.version_validation_errors == []
    with pytest.raises(NotFoundError):
        client.get_dandiset(DANDISET, "0.990101.0000", lazy=False)
    with pytest.raises(NotFoundError):
        list(client.get_dandiset(DANDISET, "0.990101.0000").get_assets())


def test_versions_listing_and_order(client: DandiAPIClient, seeded: dict[str, FakeAsset]) -> None:
    dandiset = client.get_dandiset(DANDISET, "draft")
    assert [str(v) for v in dandiset.get_versions()] == ["draft", OLDER, PUBLISHED]
    assert [str(v) for v in dandiset.get_versions(order="-created")] == [
        PUBLISHED,
        OLDER,
        "draft",
    ]
    assert [d.identifier for d in client.get_dandisets()] == [DANDISET]


def test_metadata_validates_against_dandischema(
    client: DandiAPIClient, fake: FakeDandiAPI, seeded: dict[str, FakeAsset]
) -> None:
    for version in ("draft", PUBLISHED):
        metadata = client.get_dandiset(DANDISET, version).get_metadata()
        assert metadata.version == version
        assert metadata.identifier == f"DANDI:{DANDISET}"
        assert (metadata.datePublished is None) == (version == "draft")
    published = client.get_dandiset(DANDISET, PUBLISHED).get_asset_by_path(NWB_PATH)
    assert published.get_metadata().datePublished is not None
    asset = client.get_dandiset(DANDISET, "draft").get_asset_by_path(NWB_PATH)
    raw = asset.get_raw_metadata()
    assert raw["contentUrl"] == [fake.download_url(seeded["draft"]), seeded["draft"].blob_url]
    assert raw["contentSize"] == len(DATA)
    assert raw["encodingFormat"] == "application/x-nwb"
    assert raw["path"] == NWB_PATH
    assert raw["schemaVersion"] == DANDI_SCHEMA_VERSION
    assert raw["id"] == f"dandiasset:{asset.identifier}"
    validated = asset.get_metadata()
    assert isinstance(validated, models.Asset)
    assert asset.get_digest().value == raw["digest"]["dandi:dandi-etag"]


def test_digests_are_real_when_given_the_data(fake: FakeDandiAPI, client: DandiAPIClient) -> None:
    fake.add_dandiset()
    asset = fake.add_asset(DANDISET, NWB_PATH, "http://127.0.0.1:9/b/k", len(DATA), data=DATA)
    remote = client.get_asset(asset.asset_id)
    assert remote.get_raw_digest("dandi:sha2-256") == hashlib.sha256(DATA).hexdigest()
    # One part: the etag is the MD5 of the part's MD5, then "-1".
    part = hashlib.md5(DATA).digest()
    assert remote.get_digest().value == hashlib.md5(part).hexdigest() + "-1"
    with pytest.raises(ValueError, match="4096 bytes of data"):
        fake.add_asset(DANDISET, "x.nwb", "http://127.0.0.1:9/b/x", 1, data=DATA)


# ------------------------------------------------------------------- assets


def test_get_assets_lists_every_asset_across_pages(
    fake: FakeDandiAPI, client: DandiAPIClient, s3: S3Emulator
) -> None:
    fake.page_size = 2  # dandi fetches pages 2.. in parallel when next is page=2
    fake.add_dandiset("000456")
    made = [
        fake.add_asset("000456", f"sub-{i:02d}/sub-{i:02d}.nwb", s3.url_for(f"/b/{i}"), i)
        for i in (3, 1, 5, 2, 4)
    ]
    dandiset = client.get_dandiset("000456", "draft")
    listed = list(dandiset.get_assets())
    assert [a.identifier for a in listed] == [a.asset_id for a in made]
    assert all(isinstance(a, RemoteBlobAsset) for a in listed)
    assert [a.size for a in dandiset.get_assets(order="-path")] == [5, 4, 3, 2, 1]
    assert [a.size for a in dandiset.get_assets(order="path")] == [1, 2, 3, 4, 5]
    pages = [parse_qs(r.query).get("page") for r in fake.requests(method="GET")]
    assert ["2"] in pages and ["3"] in pages
    assert [a.size for a in dandiset.get_assets_by_glob("sub-0[12]/*")] == [1, 2]
    assert [a.path for a in dandiset.get_assets_with_path_prefix("./sub-05/")] == [
        "sub-05/sub-05.nwb"
    ]
    assert list(dandiset.get_assets_with_path_prefix("sub-09")) == []


def test_get_asset_by_id(client: DandiAPIClient, seeded: dict[str, FakeAsset]) -> None:
    wanted = seeded["other"]
    base = client.get_asset(wanted.asset_id)
    assert (base.path, base.size) == (wanted.path, wanted.size)
    assert base.get_content_url(follow_redirects=1, strip_query=True) == wanted.blob_url
    scoped = client.get_dandiset(DANDISET, "draft").get_asset(wanted.asset_id)
    assert scoped.path == wanted.path
    assert scoped.get_raw_metadata()["contentUrl"][1] == wanted.blob_url
    with pytest.raises(NotFoundError):  # not in that version
        client.get_dandiset(DANDISET, PUBLISHED).get_asset(wanted.asset_id)


def test_not_found(client: DandiAPIClient, seeded: dict[str, FakeAsset]) -> None:
    draft = client.get_dandiset(DANDISET, "draft")
    with pytest.raises(NotFoundError):
        draft.get_asset_by_path("sub-01/missing.nwb")
    with pytest.raises(NotFoundError):
        draft.get_asset_by_path("sub-01/sub-01_ecephys")  # a prefix, not a path
    with pytest.raises(NotFoundError):
        client.get_dandiset("999999", lazy=False)
    with pytest.raises(NotFoundError):
        client.get_dandiset("999999").get_asset_by_path(NWB_PATH)
    with pytest.raises(NotFoundError):
        client.get_asset("00000000-0000-4000-8000-000000000000")


# -------------------------------------------------------------- plain HTTP


def test_download_is_a_302_to_a_fresh_presigned_url(
    fake: FakeDandiAPI, seeded: dict[str, FakeAsset]
) -> None:
    asset = seeded["draft"]
    scoped = f"{fake.api_url}/dandisets/{DANDISET}/versions/draft/assets/{asset.asset_id}/download/"
    signatures = set()
    for method, url in [
        ("GET", fake.download_url(asset)),
        ("HEAD", fake.download_url(asset)),
        ("GET", scoped),
    ]:
        response = requests.request(method, url, allow_redirects=False, timeout=5)
        assert response.status_code == 302
        signatures.add(
            assert_presigned(response.headers["Location"], asset.blob_url)["X-Amz-Signature"][0]
        )
    assert len(signatures) == 3
    fake.presign = False
    response = requests.get(fake.download_url(asset), allow_redirects=False, timeout=5)
    assert (response.status_code, response.headers["Location"]) == (302, asset.blob_url)


def test_plain_json_shapes(fake: FakeDandiAPI, seeded: dict[str, FakeAsset]) -> None:
    api = fake.api_url
    page = requests.get(
        f"{api}/dandisets/{DANDISET}/versions/draft/assets/",
        params={"page_size": "2", "metadata": "1", "order": "path"},
        timeout=5,
    ).json()
    assert page["count"] == 3 and page["previous"] is None
    assert parse_qs(urlsplit(page["next"]).query) == {
        "page_size": ["2"],
        "metadata": ["1"],
        "order": ["path"],
        "page": ["2"],
    }
    first = page["results"][0]
    assert set(first) == {
        "asset_id",
        "blob",
        "zarr",
        "path",
        "size",
        "created",
        "modified",
        "metadata",
    }
    assert first["blob"] == "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9" and first["zarr"] is None
    second = requests.get(page["next"], timeout=5).json()
    assert second["next"] is None and [r["path"] for r in second["results"]] == [
        "sub-02/sub-02_ecephys.nwb"
    ]
    assert parse_qs(urlsplit(second["previous"]).query) == {
        "page_size": ["2"],
        "metadata": ["1"],
        "order": ["path"],
    }
    info = requests.get(f"{api}/assets/{seeded['draft'].asset_id}/info/", timeout=5).json()
    assert info["metadata"]["contentUrl"][1] == seeded["draft"].blob_url
    detail = requests.get(f"{api}/dandisets/{DANDISET}/", timeout=5).json()
    assert detail["most_recent_published_version"]["version"] == PUBLISHED
    assert detail["draft_version"]["asset_count"] == 3
    assert detail["embargo_status"] == "OPEN"


@pytest.mark.parametrize(
    "path",
    [
        "/api/dandisets/999999/",
        f"/api/dandisets/{DANDISET}/versions/0.990101.0000/info/",
        f"/api/dandisets/{DANDISET}/versions/draft/assets/00000000-0000-4000-8000-000000000000/",
        "/api/assets/00000000-0000-4000-8000-000000000000/download/",
        "/api/no/such/endpoint/",
    ],
)
def test_unknown_things_are_404_json(
    fake: FakeDandiAPI, seeded: dict[str, FakeAsset], path: str
) -> None:
    response = requests.get(fake.url + path, timeout=5)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_http_details(fake: FakeDandiAPI, seeded: dict[str, FakeAsset]) -> None:
    api = fake.api_url
    posted = requests.post(f"{api}/dandisets/", timeout=5)
    assert posted.status_code == 405 and posted.json() == {"detail": 'Method "POST" not allowed.'}
    bare = requests.get(f"{api}/dandisets/{DANDISET}?x=1", allow_redirects=False, timeout=5)
    assert (bare.status_code, bare.headers["Location"]) == (301, f"/api/dandisets/{DANDISET}/?x=1")
    assert requests.get(f"{api}/dandisets/{DANDISET}", timeout=5).json()["identifier"] == DANDISET
    bad_page = requests.get(f"{api}/dandisets/{DANDISET}/versions/?page=9", timeout=5)
    assert (bad_page.status_code, bad_page.json()) == (404, {"detail": "Invalid page."})
    bad_order = requests.get(
        f"{api}/dandisets/{DANDISET}/versions/draft/assets/?order=size", timeout=5
    )
    assert bad_order.status_code == 400 and "order" in bad_order.json()
    head = requests.head(f"{api}/dandisets/{DANDISET}/", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert fake.log[-1].method == "HEAD" and fake.log[-1].status == 200


def test_server_info(fake: FakeDandiAPI, client: DandiAPIClient) -> None:
    for url in (f"{fake.api_url}/info/", f"{fake.url}/server-info"):
        info = requests.get(url, timeout=5).json()
        assert info["schema_version"] == DANDI_SCHEMA_VERSION
        assert info["services"]["api"]["url"] == fake.api_url
        assert info["cli-bad-versions"] == []
    assert client.server_schema_version == DANDI_SCHEMA_VERSION
    client.check_schema_version()
    instance = get_instance(fake.api_url)
    assert instance.api == fake.api_url
    assert instance.name == fake.url.removeprefix("http://")


def test_add_validation(fake: FakeDandiAPI) -> None:
    fake.add_dandiset(DANDISET)
    with pytest.raises(ValueError, match="already exists"):
        fake.add_dandiset(DANDISET)
    with pytest.raises(ValueError, match="6 digits"):
        fake.add_dandiset("123")
    with pytest.raises(ValueError, match=r"0\.YYMMDD\.HHMM"):
        fake.add_dandiset("000124", versions=("v1",))
    with pytest.raises(KeyError):
        fake.add_asset(DANDISET, NWB_PATH, "http://127.0.0.1:1/b/k", 1, version=PUBLISHED)
    with pytest.raises(KeyError):
        fake.add_asset("000999", NWB_PATH, "http://127.0.0.1:1/b/k", 1)
    with pytest.raises(ValueError, match="relative"):
        fake.add_asset(DANDISET, "/abs.nwb", "http://127.0.0.1:1/b/k", 1)
    fake.add_asset(DANDISET, NWB_PATH, "http://127.0.0.1:1/b/k", 1)
    with pytest.raises(ValueError, match="already has an asset"):
        fake.add_asset(DANDISET, NWB_PATH, "http://127.0.0.1:1/b/k", 1)
    assert [a.path for a in fake.assets()] == [NWB_PATH]


async def test_serves_on_the_running_loop() -> None:
    async with FakeDandiAPI(presign=False) as api:
        api.add_dandiset()
        asset = api.add_asset(DANDISET, NWB_PATH, "http://127.0.0.1:9/dandiarchive/blobs/x", 7)
        async with aiohttp.ClientSession() as session:
            async with session.get(api.download_url(asset), allow_redirects=False) as response:
                assert response.status == 302
                assert response.headers["Location"] == asset.blob_url
            async with session.get(f"{api.api_url}/assets/{asset.asset_id}/") as response:
                assert (await response.json())["contentSize"] == 7
    with pytest.raises(RuntimeError, match="not started"):
        _ = api.url
