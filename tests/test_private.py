"""Private objects: their bytes go only to requests whose own credentials upstream accepts.

The origin requires a presigned signature under /private/ (an embargoed
DANDI blob, a private bucket): missing, wrong or expired signatures get 403.
The owner reads through the daemon once; from then on every other request,
in every form, must get upstream's refusal and no byte, while the owner's
requests cost one upstream check per credential, not one per request.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from dandi.dandiapi import DandiAPIClient

import nwbcache
from nwbcache.urls import proxied_url
from tests.support.client_support import require_hook, script_env
from tests.support.daemons import DaemonThread
from tests.support.dandi_fake import EMBARGO_TOKEN, FakeDandiAPI
from tests.support.helpers import origin_host, proxied, scrape, value, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
DATA = os.urandom(5 * BS + 17)
KEY = "/private/blobs/abc/def/0001"


@pytest.fixture
def private(origin: S3Emulator) -> S3Emulator:
    origin.require_signature("/private/")
    origin.put(KEY, DATA)
    return origin


def signed(daemon: DaemonThread, emu: S3Emulator, key: str = KEY, **presign: float) -> str:
    return proxied(daemon.url, emu, key, emu.presign(key, **presign))  # type: ignore[arg-type]


def checks(daemon: DaemonThread) -> dict[str, float]:
    """nwbcache_auth_checks_total by result."""
    samples = scrape(daemon.url)
    results = ("accepted", "refused", "error")
    return {r: value(samples, "nwbcache_auth_checks_total", result=r) for r in results}


def owner_reads_everything(daemon: DaemonThread, emu: S3Emulator) -> None:
    r = requests.get(signed(daemon, emu), timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == DATA
    emu.wait_idle()


def meta_on_disk(cache_dir: Path) -> dict[str, object]:
    [path] = list(cache_dir.rglob("meta.json"))
    value = json.loads(path.read_text())
    assert isinstance(value, dict)
    return value


def test_the_owner_reads_and_the_object_is_private_on_disk(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    daemon = make_daemon(block_size=BS)
    r = requests.get(signed(daemon, private), headers={"Range": "bytes=100-40000"}, timeout=30)
    assert r.status_code == 206
    assert r.content == DATA[100:40001]
    private.wait_idle()
    # One request went without the signature: the probe that found it private.
    unsigned = [e for e in private.requests(KEY) if "X-Amz-Signature" not in e.query]
    assert [(e.range, e.status) for e in unsigned] == [("bytes=0-0", 403)]
    meta = meta_on_disk(tmp_path / "cache")
    assert meta["private"] is True
    assert meta["format"] == 2


# (name, method, headers) of every form a request for the object can take
FORMS: list[tuple[str, str, dict[str, str]]] = [
    ("one range", "GET", {"Range": "bytes=0-99"}),
    ("suffix range", "GET", {"Range": "bytes=-100"}),
    ("several ranges", "GET", {"Range": "bytes=0-9,5000-5099,-3"}),
    ("plain GET", "GET", {}),
    ("HEAD", "HEAD", {}),
    ("HEAD with a range", "HEAD", {"Range": "bytes=0-9"}),
    ("range past the end", "GET", {"Range": f"bytes={len(DATA) + 10}-"}),
    ("If-None-Match *", "GET", {"If-None-Match": "*"}),
    ("If-Modified-Since", "GET", {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}),
    ("If-Match *", "GET", {"If-Match": "*", "Range": "bytes=0-99"}),
    ("If-Range", "GET", {"If-Range": "Fri, 01 Jan 2100 00:00:00 GMT", "Range": "bytes=9-"}),
    ("If-Unmodified-Since", "GET", {"If-Unmodified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}),
]


@pytest.mark.parametrize("credentials", ["none", "wrong signature", "expired signature"])
def test_requests_without_valid_credentials_get_a_refusal_and_no_byte(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread], credentials: str
) -> None:
    daemon = make_daemon(block_size=BS)
    owner_reads_everything(daemon, private)
    if credentials == "none":
        url = proxied(daemon.url, private, KEY)
    elif credentials == "wrong signature":
        query = private.presign(KEY)
        url = proxied(daemon.url, private, KEY, query.replace("Signature=", "Signature=0"))
    else:
        url = signed(daemon, private, signed_at=time.time() - 7200, expires_in=3600)
    for name, method, headers in FORMS:
        r = requests.request(method, url, headers=headers, timeout=30)
        assert r.status_code == 403, (name, r.status_code)
        assert r.content[:10] != DATA[:10] and DATA[100:164] not in r.content, name
        assert len(r.content) < 200, name  # the daemon's one-line refusal, nothing else
        assert "ETag" not in r.headers and "Content-Range" not in r.headers, name
        assert r.headers["X-Cache"] == "MISS", name
    # The owner still reads, from the cache.
    r = requests.get(signed(daemon, private), headers={"Range": "bytes=7-7007"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[7:7008])


def test_one_upstream_check_per_credential_not_per_request(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon(block_size=BS)
    owner = signed(daemon, private)
    first = requests.get(owner, timeout=30)
    assert first.content == DATA
    private.wait_idle()
    private.clear_log()
    for start in range(0, len(DATA), 3000):  # the discovering credential is known
        r = requests.get(owner, headers={"Range": f"bytes={start}-{start + 2999}"}, timeout=30)
        assert r.content == DATA[start : start + 3000]
    private.wait_idle()
    assert private.requests(KEY) == []
    assert checks(daemon)["accepted"] == 0

    second = signed(daemon, private, signed_at=time.time() - 5)  # another credential
    for _ in range(10):
        assert requests.get(second, headers={"Range": "bytes=1-5"}, timeout=30).content == DATA[1:6]
    private.wait_idle()
    [check] = private.requests(KEY)
    assert (check.range, check.status, "X-Amz-Signature" in check.query) == ("bytes=0-0", 206, True)
    assert check.headers.get("If-Match") == first.headers["ETag"]  # bound to the cached version
    assert checks(daemon)["accepted"] == 1

    anonymous = proxied(daemon.url, private, KEY)
    for _ in range(5):  # a refusal is remembered for a few seconds
        assert requests.get(anonymous, timeout=30).status_code == 403
    private.wait_idle()
    assert len(private.requests(KEY)) == 2
    assert checks(daemon)["refused"] == 1


def test_checks_happen_in_the_daemon_that_serves_and_after_restart(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    first = make_daemon(block_size=BS)
    owner_reads_everything(first, private)
    other = make_daemon(block_size=BS)  # same cache dir, its own memory
    assert requests.get(proxied(other.url, private, KEY), timeout=30).status_code == 403
    first.stop()
    restarted = make_daemon(block_size=BS)
    assert requests.head(proxied(restarted.url, private, KEY), timeout=30).status_code == 403
    private.wait_idle()
    private.clear_log()
    r = requests.get(signed(restarted, private), timeout=30)
    assert (r.status_code, r.content) == (200, DATA)
    private.wait_idle()
    assert [(e.range, e.status) for e in private.requests(KEY)] == [("bytes=0-0", 206)]


def test_an_object_believed_public_turns_private_when_upstream_refuses_it(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    key = "/later/blob"
    origin.put(key, DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.3, stale_if_error=0.0)
    url = proxied(daemon.url, origin, key)
    assert requests.get(url, timeout=30).content == DATA
    assert meta_on_disk(tmp_path / "cache")["private"] is False
    origin.require_signature("/later/")  # embargoed after release
    time.sleep(0.4)
    assert requests.get(url, timeout=30).status_code == 403
    assert meta_on_disk(tmp_path / "cache")["private"] is True
    for _ in range(3):
        r = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=30)
        assert r.status_code == 403 and DATA[:100] not in r.content
    owner = proxied(daemon.url, origin, key, origin.presign(key))
    r = requests.get(owner, headers={"Range": "bytes=0-99"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[:100])


def test_a_released_embargo_lets_requests_without_credentials_in(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon(block_size=BS)
    owner_reads_everything(daemon, private)
    private.allow_anonymous("/private/")
    r = requests.get(proxied(daemon.url, private, KEY), headers={"Range": "bytes=-50"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[-50:])
    assert checks(daemon)["accepted"] == 1


def test_an_authorization_header_is_a_credential_too(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, private, KEY)
    auth = {"Authorization": private.authorization(KEY)}
    r = requests.get(url, headers={**auth, "Range": "bytes=0-40000"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[:40001])
    assert requests.get(url, headers={"Range": "bytes=0-9"}, timeout=30).status_code == 403
    wrong = {"Authorization": "S3EMU-HMAC 00"}
    assert requests.get(url, headers={**wrong, "Range": "bytes=0-9"}, timeout=30).status_code == 403
    r = requests.get(url, headers={**auth, "Range": "bytes=40001-"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[40001:])
    private.wait_idle()
    fetched = [e for e in private.requests(KEY) if e.status == 206]
    assert all(e.headers.get("Authorization") == auth["Authorization"] for e in fetched)


def test_an_authorization_that_cannot_be_sent_upstream_is_a_400(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """A header value with bytes outside visible ASCII would be re-encoded, or
    split the request, on its way upstream: the client is told, and nothing
    is asked upstream."""
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, private, KEY)
    r = requests.get(url, headers={"Authorization": "S3EMU-HMAC caf\xe9"}, timeout=30)
    assert r.status_code == 400
    assert "cannot be sent upstream" in r.text and "caf" not in r.text
    private.wait_idle()
    assert private.requests(KEY) == []


def test_public_objects_cost_no_check(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/open/blob", DATA)
    daemon = make_daemon(block_size=BS)
    # Discovered by a presigned URL: asked once without it, served: public.
    presigned = proxied(daemon.url, origin, "/open/blob", "X-Amz-Signature=abc&X-Amz-Expires=60")
    assert requests.get(presigned, timeout=30).content == DATA
    origin.wait_idle()
    origin.clear_log()
    plain = proxied(daemon.url, origin, "/open/blob")
    for _ in range(5):
        assert (
            requests.get(plain, headers={"Range": "bytes=10-20"}, timeout=30).content
            == (DATA[10:21])
        )
    origin.wait_idle()
    assert origin.requests("/open/blob") == []
    assert checks(daemon) == {"accepted": 0, "refused": 0, "error": 0}


def test_credentials_stay_out_of_logs_and_metrics(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    daemon = make_daemon(block_size=BS)
    query = private.presign(KEY)
    signature = query.rsplit("X-Amz-Signature=", 1)[1]
    auth = private.authorization(KEY)
    url = proxied(daemon.url, private, KEY, query)
    assert requests.get(url, timeout=30).status_code == 200
    requests.get(proxied(daemon.url, private, KEY), headers={"Authorization": auth}, timeout=30)
    requests.get(url.replace("Signature=", "Signature=1"), timeout=30)
    wait_until(lambda: len([r for r in caplog.records if r.name == "nwbcache.access"]) >= 3, 5)
    daemon_records = [r for r in caplog.records if r.name.startswith(("nwbcache", "aiohttp"))]
    text = "\n".join(caplog.handler.format(r) for r in daemon_records)
    assert signature not in text and auth.split()[1] not in text
    metrics = requests.get(f"{daemon.url}/metrics", timeout=30).text
    assert signature not in metrics and auth.split()[1] not in metrics


EMBARGOED = "/dandiarchive/blobs/emb/arg/0a1b2c3d-0000-4000-8000-00000000e000"


def test_an_embargoed_dandisets_blob_reaches_only_its_token_holders(
    origin: S3Emulator, dandi_api: FakeDandiAPI, make_daemon: Callable[..., DaemonThread]
) -> None:
    """DANDI's embargo: the API answers only to a token, and its download URL is
    presigned; the same bucket refuses the blob without the signature."""
    origin.require_signature("/dandiarchive/blobs/emb/")
    origin.put(EMBARGOED, DATA)
    dandi_api.presigner = lambda url: f"{url}?{origin.presign(urlsplit(url).path)}"
    dandi_api.add_dandiset("000999", embargoed=True)
    dandi_api.add_asset("000999", "sub-01/sub-01_ecephys.nwb", origin.url_for(EMBARGOED), len(DATA))
    daemon = make_daemon(block_size=BS, dandi_api_url=dandi_api.api_url)

    # The owner: dandi's own client with a token gives a presigned URL.
    with DandiAPIClient(api_url=dandi_api.api_url, token=EMBARGO_TOKEN) as client:
        asset = client.get_dandiset("000999", "draft").get_asset_by_path(
            "sub-01/sub-01_ecephys.nwb"
        )
        s3_url = asset.get_content_url(follow_redirects=1, strip_query=False)
    assert "X-Amz-Signature=" in s3_url
    r = requests.get(proxied_url(s3_url, daemon.url), headers={"Range": "bytes=0-999"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[:1000])

    # Everyone else: the /dandi/ route (no token), or the blob's plain URL.
    by_path = f"{daemon.url}/dandi/000999/draft/sub-01/sub-01_ecephys.nwb"
    for method in ("GET", "HEAD"):
        r = requests.request(method, by_path, headers={"Range": "bytes=0-999"}, timeout=30)
        assert r.status_code == 401 and DATA[:100] not in r.content
    plain = proxied_url(origin.url_for(EMBARGOED), daemon.url)
    r = requests.get(plain, headers={"Range": "bytes=0-999"}, timeout=30)
    assert r.status_code == 403 and DATA[:100] not in r.content


TRANSPARENT_SCRIPT = """
import sys
import remfile

signed, unsigned = sys.argv[1], sys.argv[2]
with open(sys.argv[3], "wb") as out:
    f = remfile.File(signed)
    out.write(f.read(f.length))
try:
    g = remfile.File(unsigned)
    g.read(10)
except Exception as exc:  # remfile fails on the refusal: what a user would see
    print("REFUSED", type(exc).__name__)
else:
    print("SERVED")
"""


@pytest.mark.slow
def test_transparent_mode_passes_presigned_urls_through_the_cache(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """An unmodified remfile script with NWBCACHE_URL set: the owner's presigned
    URL reads through the daemon; the same URL unsigned gets nothing."""
    require_hook()
    daemon = make_daemon(block_size=BS)
    signed_url = f"{private.url_for(KEY)}?{private.presign(KEY)}"
    script = tmp_path / "read.py"
    script.write_text(TRANSPARENT_SCRIPT)
    out = tmp_path / "bytes"
    proc = subprocess.run(
        [sys.executable, str(script), signed_url, private.url_for(KEY), str(out)],
        env=script_env(NWBCACHE_URL=daemon.url, NWBCACHE_HOSTS=origin_host(private)),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == DATA
    assert "REFUSED" in proc.stdout
    private.wait_idle()
    assert {e.user_agent for e in private.requests(KEY)} == {f"nwbcache/{nwbcache.__version__}"}


def test_a_bad_signature_does_not_make_a_public_object_private_or_fail_others(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """S3 refuses a wrong signature even on a public object: that refusal is the
    request's, and must not make the object private for everyone."""
    origin.reject_bad_signatures = True
    origin.put("/open2/blob", DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.2, stale_if_error=0.0)
    plain = proxied(daemon.url, origin, "/open2/blob")
    assert read_all(plain) == DATA
    time.sleep(0.3)  # due: the next request rediscovers it, with its credentials
    bogus = proxied(daemon.url, origin, "/open2/blob", "X-Amz-Signature=00&X-Amz-Expires=60")
    r = requests.get(bogus, headers={"Range": "bytes=0-99"}, timeout=30)
    assert r.status_code == 403 and DATA[:50] not in r.content  # upstream refused *it*
    assert meta_on_disk(tmp_path / "cache")["private"] is False
    r = requests.get(plain, headers={"Range": "bytes=0-99"}, timeout=30)
    assert (r.status_code, r.content) == (206, DATA[:100])
    assert checks(daemon) == {"accepted": 0, "refused": 0, "error": 0}


def read_all(url: str) -> bytes:
    r = requests.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def test_an_embargo_after_release_is_noticed_while_only_owners_read(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """Background revalidation of a public object asks without credentials,
    so the owners' signed reads cannot hide that anonymous ones are refused now."""
    key = "/later2/blob"
    origin.put(key, DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.3)
    assert read_all(proxied(daemon.url, origin, key)) == DATA
    origin.require_signature("/later2/")
    owner = proxied(daemon.url, origin, key, origin.presign(key))
    time.sleep(0.4)
    assert requests.get(owner, headers={"Range": "bytes=0-9"}, timeout=30).content == DATA[:10]
    wait_until(lambda: meta_on_disk(tmp_path / "cache")["private"] is True, 5)
    r = requests.get(proxied(daemon.url, origin, key), headers={"Range": "bytes=0-9"}, timeout=30)
    assert r.status_code == 403 and DATA[:10] not in r.content
    assert requests.get(owner, headers={"Range": "bytes=0-9"}, timeout=30).content == DATA[:10]


def test_the_status_page_does_not_name_private_objects(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon(block_size=BS)
    owner_reads_everything(daemon, private)

    def top() -> list[str]:
        report = requests.get(f"{daemon.url}/status.json", timeout=30).json()
        return [o["url"] for o in report["top_objects"]]

    # Found in the background when the index is slow (status.TOP_WAIT).
    wait_until(
        lambda: top() == ["(a private object)"], 5, "the private object, unnamed, in the report"
    )
    page = requests.get(f"{daemon.url}/", timeout=30).text
    assert "blobs/abc/def" not in page


def test_refusals_at_rediscovery_are_remembered_too(
    private: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """A private object due for discovery (--stale-if-error 0): requests without
    credentials are refused by upstream once, then from memory for a few seconds."""
    daemon = make_daemon(block_size=BS, revalidate_after=0.2, stale_if_error=0.0)
    owner_reads_everything(daemon, private)
    time.sleep(0.3)
    private.clear_log()
    anonymous = proxied(daemon.url, private, KEY)
    for _ in range(5):
        assert (
            requests.get(anonymous, headers={"Range": "bytes=0-9"}, timeout=30).status_code == 403
        )
    private.wait_idle()
    assert len(private.requests(KEY)) == 1
