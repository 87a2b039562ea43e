"""The daemon's /dandi/<dandiset>/<version>/<path> route, against a fake DANDI
API on localhost and the S3 emulator: curl-style clients with no dandi package
get an asset's bytes by its path, through the cache."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
import requests

from tests.support.daemons import DaemonThread
from tests.support.dandi_fake import FakeDandiAPI
from tests.support.helpers import free_port
from tests.support.s3emu import S3Emulator

BLOB = "/dandiarchive/blobs/abc/def/0a1b2c3d-0000-4000-8000-000000000001"
DATA = os.urandom(300_000)
PATH = "sub-01/sub-01_ses-1 (copy)_ecephys.nwb"  # a space and parentheses, as real paths have


@pytest.fixture
def api() -> Iterator[FakeDandiAPI]:
    fake = FakeDandiAPI()
    fake.start_in_thread()
    try:
        yield fake
    finally:
        fake.stop_thread()


@pytest.fixture
def dandi_daemon(
    origin: S3Emulator, api: FakeDandiAPI, make_daemon: Callable[..., DaemonThread]
) -> DaemonThread:
    origin.put(BLOB, DATA)
    api.add_dandiset("000123", versions=("draft", "0.230101.1200"))
    api.add_asset("000123", PATH, origin.url_for(BLOB), len(DATA))
    api.add_asset("000123", PATH, origin.url_for(BLOB), len(DATA), version="0.230101.1200")
    return make_daemon(block_size=64 * 1024, dandi_api_url=api.api_url)


@pytest.mark.parametrize("version", ["draft", "0.230101.1200"])
def test_asset_by_path_serves_its_bytes(
    origin: S3Emulator, dandi_daemon: DaemonThread, version: str
) -> None:
    url = f"{dandi_daemon.url}/dandi/000123/{version}/{quote(PATH)}"
    full = requests.get(url, timeout=30)
    assert full.status_code == 200
    assert full.content == DATA
    part = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert part.status_code == 206
    assert part.content == DATA[1000:2000]
    head = requests.head(url, timeout=30)
    assert head.headers["Content-Length"] == str(len(DATA))
    # the bytes came from the origin through the daemon
    assert {e.user_agent for e in origin.requests(BLOB)} == {f"nwbcache/{_version()}"}


def test_resolution_is_cached(api: FakeDandiAPI, dandi_daemon: DaemonThread) -> None:
    url = f"{dandi_daemon.url}/dandi/000123/draft/{quote(PATH)}"
    requests.get(url, headers={"Range": "bytes=0-9"}, timeout=30)
    calls = len(api.log)
    for _ in range(5):
        assert requests.get(url, headers={"Range": "bytes=0-9"}, timeout=30).content == DATA[:10]
    assert len(api.log) == calls


def test_unknown_asset_is_404_with_message(dandi_daemon: DaemonThread) -> None:
    r = requests.get(f"{dandi_daemon.url}/dandi/000123/draft/sub-01/missing.nwb", timeout=30)
    assert r.status_code == 404
    assert "no asset" in r.text


def test_unknown_dandiset_is_404(dandi_daemon: DaemonThread) -> None:
    r = requests.get(f"{dandi_daemon.url}/dandi/999999/draft/x.nwb", timeout=30)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "path", ["/dandi/12/draft/x.nwb", "/dandi/000123/latest/x.nwb", "/dandi/000123/draft/"]
)
def test_malformed_dandi_paths_are_400(dandi_daemon: DaemonThread, path: str) -> None:
    r = requests.get(dandi_daemon.url + path, timeout=30)
    assert r.status_code == 400
    assert r.text.startswith("nwbcache:")


def test_asset_outside_allow_list_is_403(
    origin: S3Emulator, api: FakeDandiAPI, make_daemon: Callable[..., DaemonThread]
) -> None:
    api.add_dandiset("000124")
    api.add_asset("000124", "a.nwb", "https://elsewhere.example.org/bucket/a.nwb", 10)
    daemon = make_daemon(dandi_api_url=api.api_url)
    r = requests.get(f"{daemon.url}/dandi/000124/draft/a.nwb", timeout=30)
    assert r.status_code == 403


def test_api_down_is_502(make_daemon: Callable[..., DaemonThread]) -> None:
    port = free_port()
    daemon = make_daemon(dandi_api_url=f"http://127.0.0.1:{port}/api")
    r = requests.get(f"{daemon.url}/dandi/000123/draft/a.nwb", timeout=30)
    assert r.status_code == 502
    assert "DANDI API" in r.text


def _version() -> str:
    from nwbcache import __version__

    return __version__
