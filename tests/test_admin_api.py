"""The admin API over HTTP (issue 13): objects listed, pinned objects kept through a
scan and a restart, the pin limit, expiry, eviction by hand, and who may call it
(no token on loopback, a token, a daemon that listens beyond loopback, a relayed
request), with bytes compared against the origin's."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from nwbcache_proxy.config import Settings
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
OFFLINE = {"Cache-Control": "only-if-cached"}
TOKEN = "admin-token-for-tests-0123456789"


def call(
    daemon: DaemonThread,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body)  # NaN and all, as a client may send
    return requests.request(method, f"{daemon.url}{path}", data=data, headers=h, timeout=30)


def upstream_url(origin: S3Emulator, key: str) -> str:
    return f"http://{origin_host(origin)}{key}"


def read(daemon: DaemonThread, origin: S3Emulator, key: str, **kw: Any) -> requests.Response:
    return requests.get(proxied(daemon.url, origin, key), timeout=30, **kw)


def cached(daemon: DaemonThread, origin: S3Emulator, key: str) -> bool:
    """Whether the whole object is served from the cache alone."""
    r = read(daemon, origin, key, headers=OFFLINE)
    return r.status_code == 200


def evict_everything(daemon: DaemonThread) -> None:
    """Evict all the policy may, as the daemon's upkeep does."""

    async def run() -> None:
        await daemon.cache.index.evict_to(0, daemon.settings.cache_size)

    daemon.call(run())


def test_objects_lists_what_is_cached_with_its_figures(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    a, b = os.urandom(5 * BS + 7), os.urandom(3 * BS)
    origin.put("/lab/a.nwb", a)
    origin.put("/lab/sub/b.nwb", b)
    daemon = make_daemon(block_size=BS)
    assert read(daemon, origin, "/lab/a.nwb").content == a
    # Every block on disk before the second read: a block still being written
    # is streamed from memory, and that is not counted as a hit (a slow CI
    # machine once counted 5 of 6).
    ua = upstream_url(origin, "/lab/a.nwb")

    def all_written() -> bool:
        listed = call(daemon, "GET", "/admin/objects").json()["objects"]
        return any(o["url"] == ua and o["blocks"] == 6 for o in listed)

    wait_until(all_written, 30, "the first read's blocks written")
    assert read(daemon, origin, "/lab/a.nwb").content == a  # hits
    r = read(daemon, origin, "/lab/sub/b.nwb", headers={"Range": f"bytes=0-{BS - 1}"})
    assert r.content == b[:BS]
    listing = call(daemon, "GET", "/admin/objects")
    assert listing.status_code == 200, listing.text
    assert listing.headers["Cache-Control"] == "no-store"
    found = {o["url"]: o for o in listing.json()["objects"]}
    ua, ub = upstream_url(origin, "/lab/a.nwb"), upstream_url(origin, "/lab/sub/b.nwb")
    assert set(found) == {ua, ub}
    assert (found[ua]["blocks"], found[ua]["size"], found[ua]["pinned"]) == (6, len(a), False)
    assert found[ua]["cached_bytes"] == len(a)  # every block of it, its bytes only
    assert (found[ub]["blocks"], found[ub]["size"]) == (1, len(b))
    assert found[ua]["hits"] >= 6 and found[ub]["hits"] == 0
    assert time.time() - 60 < found[ub]["last_use"] <= time.time()
    # Filters and orders.
    by_hits = call(daemon, "GET", "/admin/objects?sort=hits").json()["objects"]
    assert [o["url"] for o in by_hits] == [ua, ub]
    one = call(daemon, "GET", f"/admin/objects?url={quote(ua)}").json()["objects"]
    assert [o["url"] for o in one] == [ua]
    under = call(daemon, "GET", f"/admin/objects?prefix={quote(ua.rpartition('/')[0] + '/sub')}")
    assert [o["url"] for o in under.json()["objects"]] == [ub]
    assert len(call(daemon, "GET", "/admin/objects?limit=1").json()["objects"]) == 1
    bad = call(daemon, "GET", "/admin/objects?sort=size")
    assert bad.status_code == 400 and "sort must be one of" in bad.json()["error"]
    assert call(daemon, "GET", "/admin/nothing").status_code == 404


def test_a_pinned_object_is_kept_through_a_scan_and_a_restart(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    files = {f"/scan/f{n:02d}.nwb": os.urandom(8 * BS) for n in range(12)}
    for key, data in files.items():
        origin.put(key, data)
    kept, control = os.urandom(8 * BS), os.urandom(8 * BS)
    origin.put("/lab/kept.nwb", kept)
    origin.put("/lab/control.nwb", control)
    settings = {"block_size": BS, "cache_size": 40 * BS}
    daemon = make_daemon(**settings)
    r = call(daemon, "POST", "/admin/pins", {"urls": [upstream_url(origin, "/lab/kept.nwb")]})
    assert r.status_code == 200, r.text
    [pinned] = r.json()["pinned"]
    assert (pinned["size"], pinned["new"], pinned["expires"]) == (len(kept), True, None)
    assert read(daemon, origin, "/lab/kept.nwb").content == kept
    assert read(daemon, origin, "/lab/control.nwb").content == control

    def scan() -> None:
        for key, data in files.items():  # 96 blocks through a 40-block cache
            assert read(daemon, origin, key).content == data
            daemon.call(daemon.cache.upkeep.run_pass())

    scan()
    assert not cached(daemon, origin, "/lab/control.nwb")  # the scan did evict
    assert read(daemon, origin, "/lab/kept.nwb", headers=OFFLINE).content == kept
    status = requests.get(f"{daemon.url}/status.json", timeout=10).json()["cache"]
    assert status["pins"] == 1 and status["pinned_bytes"] == len(kept)
    daemon.stop()

    daemon = make_daemon(**settings)  # same cache dir
    pins = call(daemon, "GET", "/admin/pins").json()
    assert [p["key"] for p in pins["pins"]] == [upstream_url(origin, "/lab/kept.nwb")]
    assert pins["pinned_bytes"] == len(kept) and pins["pin_limit"] == 20 * BS
    scan()
    assert read(daemon, origin, "/lab/kept.nwb", headers=OFFLINE).content == kept
    # Even an eviction of everything keeps it...
    evict_everything(daemon)
    assert read(daemon, origin, "/lab/kept.nwb", headers=OFFLINE).content == kept
    # ...until it is unpinned: then it goes the way of the rest.
    r = call(daemon, "DELETE", "/admin/pins", {"urls": [upstream_url(origin, "/lab/kept.nwb")]})
    assert r.json()["unpinned"] == [upstream_url(origin, "/lab/kept.nwb")]
    evict_everything(daemon)
    assert not cached(daemon, origin, "/lab/kept.nwb")
    assert read(daemon, origin, "/lab/kept.nwb").content == kept


def test_pins_beyond_the_limit_are_refused_all_or_nothing(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    for n in range(3):
        origin.put(f"/lab/p{n}.nwb", os.urandom(4 * BS))
    daemon = make_daemon(block_size=BS, cache_size=64 * BS, pin_limit=10 * BS)
    urls = [upstream_url(origin, f"/lab/p{n}.nwb") for n in range(3)]
    assert call(daemon, "POST", "/admin/pins", {"urls": urls[:1]}).status_code == 200
    r = call(daemon, "POST", "/admin/pins", {"urls": urls[1:]})
    assert r.status_code == 409
    assert "over --pin-limit" in r.json()["error"] and r.json()["pin_limit"] == 10 * BS
    assert [p["key"] for p in call(daemon, "GET", "/admin/pins").json()["pins"]] == urls[:1]
    # Renewing a pin is not a new one; one more fits.
    assert call(daemon, "POST", "/admin/pins", {"urls": urls[:2]}).status_code == 200
    assert call(daemon, "GET", "/admin/pins").json()["pinned_bytes"] == 8 * BS


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"urls": ["http://{host}/lab/missing.nwb"]}, 404, "nothing pinned"),
        ({"urls": ["https://elsewhere.example.org/x.nwb"]}, 403, "not allowed"),
        ({"urls": []}, 400, "non-empty list"),
        ({"urls": "http://{host}/lab/p.nwb"}, 400, "non-empty list"),
        ({"urls": ["not a url"]}, 400, "not an object URL"),
        ({"urls": ["http://{host}/lab/p.nwb"], "ttl": -1}, 400, "ttl"),
        ({"urls": ["http://{host}/lab/p.nwb"], "ttl": "30d"}, 400, "ttl"),
        ({"urls": ["http://{host}/lab/p.nwb"], "ttl": float("nan")}, 400, "ttl"),
        ({"urls": ["http://{host}/lab/p.nwb"], "ttl": float("inf")}, 400, "ttl"),
    ],
)
def test_bad_pins_get_a_clear_error_and_pin_nothing(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    body: dict[str, Any],
    status: int,
    words: str,
) -> None:
    origin.put("/lab/p.nwb", os.urandom(BS))
    daemon = make_daemon(block_size=BS)
    host = origin_host(origin)
    if isinstance(body["urls"], list):
        body = {**body, "urls": [u.replace("{host}", host) for u in body["urls"]]}
    else:
        body = {**body, "urls": body["urls"].replace("{host}", host)}
    r = call(daemon, "POST", "/admin/pins", body)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert call(daemon, "GET", "/admin/pins").json()["pins"] == []
    json_type = {"Content-Type": "application/json"}
    r = requests.post(f"{daemon.url}/admin/pins", data=b"{not json", headers=json_type, timeout=10)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    deep = b"[" * 100_000 + b"]" * 100_000
    r = requests.post(f"{daemon.url}/admin/pins", data=deep, headers=json_type, timeout=10)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]


def test_a_pin_expires(origin: S3Emulator, make_daemon: Callable[..., DaemonThread]) -> None:
    origin.put("/lab/t.nwb", os.urandom(2 * BS))
    daemon = make_daemon(block_size=BS)
    url = upstream_url(origin, "/lab/t.nwb")
    r = call(daemon, "POST", "/admin/pins", {"urls": [url], "ttl": 0.3})
    assert r.json()["pinned"][0]["expires"] <= time.time() + 0.3
    read(daemon, origin, "/lab/t.nwb")
    daemon.call(daemon.admin.upkeep())
    assert len(call(daemon, "GET", "/admin/pins").json()["pins"]) == 1
    time.sleep(0.4)
    daemon.call(daemon.admin.upkeep())
    assert call(daemon, "GET", "/admin/pins").json()["pins"] == []
    [obj] = call(daemon, "GET", "/admin/objects").json()["objects"]
    assert not obj["pinned"]
    assert daemon.call(daemon.cache.index.totals()).pinned_bytes == 0  # its blocks left too


def test_evict_by_url_and_prefix_skips_pins_unless_asked(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    data = {k: os.urandom(3 * BS + 1) for k in ("/a/1.nwb", "/a/2.nwb", "/b/3.nwb")}
    for key, value in data.items():
        origin.put(key, value)
    daemon = make_daemon(block_size=BS)
    for key, value in data.items():
        assert read(daemon, origin, key).content == value
    u1 = upstream_url(origin, "/a/1.nwb")
    r = call(daemon, "POST", "/admin/evict", {"urls": [u1]})
    assert r.status_code == 200, r.text
    assert r.json()["objects"] == 1 and r.json()["bytes"] > 3 * BS
    assert not cached(daemon, origin, "/a/1.nwb")
    assert cached(daemon, origin, "/a/2.nwb") and cached(daemon, origin, "/b/3.nwb")
    origin.clear_log()
    assert read(daemon, origin, "/a/1.nwb").content == data["/a/1.nwb"]  # fetched again
    origin.wait_idle()
    assert origin.requests("/a/1.nwb")
    # By prefix; a pinned object is skipped unless asked to unpin it.
    pin = call(daemon, "POST", "/admin/pins", {"urls": [upstream_url(origin, "/a/2.nwb")]})
    assert pin.status_code == 200
    prefix = upstream_url(origin, "/a/")
    r = call(daemon, "POST", "/admin/evict", {"prefix": prefix})
    assert r.json()["objects"] == 1
    assert r.json()["skipped_pinned"] == [upstream_url(origin, "/a/2.nwb")]
    assert cached(daemon, origin, "/a/2.nwb") and not cached(daemon, origin, "/a/1.nwb")
    r = call(daemon, "POST", "/admin/evict", {"prefix": prefix, "unpin": True})
    assert r.json()["objects"] == 1 and r.json()["skipped_pinned"] == []
    assert not cached(daemon, origin, "/a/2.nwb") and cached(daemon, origin, "/b/3.nwb")
    assert call(daemon, "GET", "/admin/pins").json()["pins"] == []
    listed = [o["url"] for o in call(daemon, "GET", "/admin/objects").json()["objects"]]
    assert listed == [upstream_url(origin, "/b/3.nwb")]
    assert daemon.call(daemon.cache.index.totals()).blocks == 4


def test_with_a_token_every_call_needs_it_and_it_is_never_logged(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    daemon = make_daemon(block_size=BS, admin_token_file=token_file)
    caplog.set_level(logging.DEBUG)
    none = call(daemon, "GET", "/admin/pins")
    assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Bearer")
    assert "--admin-token-file" in none.json()["error"]
    wrong = call(daemon, "GET", "/admin/pins", token=TOKEN[:-1] + "x")
    assert wrong.status_code == 401 and wrong.json()["error"] == "the admin token is wrong"
    assert call(daemon, "GET", "/admin/pins", token=TOKEN).status_code == 200
    secret_url = upstream_url(origin, "/lab/x.nwb?X-Amz-Signature=deadbeefcafe")
    r = call(daemon, "GET", f"/admin/objects?url={quote(secret_url)}", token=TOKEN)
    assert r.status_code == 200
    # Proxied URLs do not need it.
    origin.put("/lab/x.nwb", b"x" * 10)
    assert read(daemon, origin, "/lab/x.nwb").content == b"x" * 10
    pin = call(daemon, "POST", "/admin/pins", {"urls": [secret_url]}, token=TOKEN)
    assert pin.status_code == 200
    daemon_lines = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("nwbcache")
    )
    assert "refused GET /admin/pins from 127.0.0.1" in daemon_lines
    assert f"pinned {upstream_url(origin, '/lab/x.nwb')} (10 B)" in daemon_lines
    assert TOKEN not in daemon_lines and "deadbeefcafe" not in daemon_lines


def test_without_a_token_admin_calls_need_loopback_alone_and_no_relay(
    origin: S3Emulator, tmp_path: Path
) -> None:
    base = Settings(
        port=0,
        cache_dir=tmp_path / "cache",
        allow_upstream=(origin_host(origin),),
        s3_listen="off",
    )
    # A daemon told to listen on every interface, served here on loopback.
    wide = DaemonThread(dataclasses.replace(base, host="0.0.0.0"), bind="127.0.0.1").start()
    try:
        r = call(wide, "GET", "/admin/pins")
        assert r.status_code == 403
        assert "listens beyond loopback (0.0.0.0)" in r.json()["error"]
        assert "--admin-token-file" in r.json()["error"]
    finally:
        wide.stop()
    local = DaemonThread(base).start()
    try:
        assert call(local, "GET", "/admin/pins").status_code == 200
        relayed = call(local, "GET", "/admin/pins", headers={"X-Forwarded-For": "10.0.0.9"})
        assert relayed.status_code == 403 and "relayed" in relayed.json()["error"]
    finally:
        local.stop()


# Every admin call, with a body it accepts.
EVERY_CALL = [
    ("GET", "/admin/objects", None),
    ("GET", "/admin/pins", None),
    ("POST", "/admin/pins", {"urls": ["http://{host}/lab/e.nwb"]}),
    ("DELETE", "/admin/pins", {"urls": ["http://{host}/lab/e.nwb"]}),
    ("POST", "/admin/evict", {"urls": ["http://{host}/lab/e.nwb"]}),
    ("POST", "/admin/warm", {"mode": "full", "urls": ["http://{host}/lab/e.nwb"]}),
    ("GET", "/admin/jobs", None),
    ("GET", "/admin/jobs/1-abc", None),
    ("DELETE", "/admin/jobs/1-abc", None),
]


def _body(body: Any, origin: S3Emulator) -> Any:
    return (
        None
        if body is None
        else json.loads(json.dumps(body).replace("{host}", origin_host(origin)))
    )


def test_every_call_needs_the_token_and_works_with_it(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    origin.put("/lab/e.nwb", b"e" * 100)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    daemon = make_daemon(block_size=BS, admin_token_file=token_file)
    for method, path, body in EVERY_CALL:
        body = _body(body, origin)
        assert call(daemon, method, path, body).status_code == 401, (method, path)
        assert call(daemon, method, path, body, token="x" * 32).status_code == 401, (method, path)
        r = call(daemon, method, path, body, token=TOKEN)
        assert r.status_code not in (401, 403), (method, path, r.text)
        assert r.status_code < 500 and r.json() is not None


def test_beyond_loopback_without_a_token_every_call_is_refused(
    origin: S3Emulator, tmp_path: Path
) -> None:
    settings = Settings(
        host="0.0.0.0", port=0, cache_dir=tmp_path / "cache",
        allow_upstream=(origin_host(origin),), s3_listen="off",
    )  # fmt: skip
    daemon = DaemonThread(settings, bind="127.0.0.1").start()
    try:
        for method, path, body in EVERY_CALL:
            r = call(daemon, method, path, _body(body, origin))
            assert r.status_code == 403 and "--admin-token-file" in r.json()["error"], path
    finally:
        daemon.stop()


def test_no_web_page_can_drive_the_api(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """What a page in the user's browser could send: a form-like POST to
    127.0.0.1, or any request through a name it rebinds to 127.0.0.1."""
    origin.put("/lab/keep.nwb", b"k" * 100)
    daemon = make_daemon(block_size=BS)
    assert read(daemon, origin, "/lab/keep.nwb").status_code == 200
    body = json.dumps({"prefix": upstream_url(origin, "/")})
    attempts = [
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json", "Origin": "https://evil.example"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "application/json", "Host": "evil.example"},
    ]
    for headers in attempts:
        r = requests.post(f"{daemon.url}/admin/evict", data=body, headers=headers, timeout=10)
        assert r.status_code in (403, 415), (headers, r.text)
    assert cached(daemon, origin, "/lab/keep.nwb")
    rebound = requests.get(f"{daemon.url}/admin/objects", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403 and "loopback address" in rebound.json()["error"]
    ok = requests.post(
        f"{daemon.url}/admin/evict", data=body, headers={"Content-Type": "application/json"}
    )
    assert ok.status_code == 200 and ok.json()["objects"] == 1


def test_a_short_token_file_stops_the_daemon_with_a_reason(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        Settings(admin_token_file=token_file).validate()
    with pytest.raises(ValueError, match="cannot read"):
        Settings(admin_token_file=tmp_path / "absent").validate()
    with pytest.raises(ValueError, match="--pin-limit must be between 0 and 90%"):
        Settings(block_size=BS, cache_size=10 * BS, pin_limit=10 * BS).validate()
    Settings(block_size=BS, cache_size=10 * BS, pin_limit=9 * BS).validate()
