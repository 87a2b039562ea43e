"""The S3 emulator itself, driven over real HTTP (aiohttp, requests, raw sockets)."""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from yarl import URL

from tests.support.helpers import REPO, wait_until_async
from tests.support.s3emu import Fault, S3Emulator, parse_bandwidth

KEY = "/dandiarchive/blobs/abc/def/0f1e2d3c-uuid"
DATA = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable mod 256
MD5_ETAG = '"' + hashlib.md5(DATA).hexdigest() + '"'
# The command line, as the benchmark and a developer run it (from the repository root).
S3EMU = [sys.executable, "-m", "tests.support.s3emu"]


@pytest.fixture
async def emu() -> AsyncIterator[S3Emulator]:
    async with S3Emulator() as server:
        server.put(KEY, DATA)
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def fetch(
    session: aiohttp.ClientSession,
    url: str | URL,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with session.request(method, url, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


def error_code(body: bytes) -> str:
    text = body.decode()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    return text.split("<Code>")[1].split("</Code>")[0]


def raw_get(url: str, path: str, extra: str = "") -> tuple[bytes, BaseException | None]:
    """One GET on a fresh socket: everything received until EOF, and the error that ended it."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
    received = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            return received, exc
    return received, None


def split_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status_line, headers, body


# --------------------------------------------------------------------------- GetObject


async def test_get_whole_object(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    status, headers, body = await fetch(session, emu.url_for(KEY))
    assert status == 200
    assert body == DATA
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["ETag"] == MD5_ETAG
    assert email.utils.parsedate_to_datetime(headers["Last-Modified"]).tzinfo is not None
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/octet-stream"
    assert len(headers["x-amz-request-id"]) == 16
    assert "Content-Range" not in headers


@pytest.mark.parametrize(
    ("rng", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=0-0", 0, 0),
        ("bytes=1000-5000", 1000, 1023),  # end clamped to size - 1
        ("bytes=1023-1023", 1023, 1023),
        ("bytes=1000-", 1000, 1023),
        ("bytes=0-", 0, 1023),
        ("bytes=-24", 1000, 1023),
        ("bytes=-5000", 0, 1023),  # suffix longer than the object: all of it
    ],
)
async def test_single_range(
    emu: S3Emulator, session: aiohttp.ClientSession, rng: str, start: int, end: int
) -> None:
    status, headers, body = await fetch(session, emu.url_for(KEY), headers={"Range": rng})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == DATA[start : end + 1]
    assert headers["ETag"] == MD5_ETAG


@pytest.mark.parametrize(
    ("size", "rng"),
    [
        (1024, "bytes=1024-"),
        (1024, "bytes=1024-2000"),
        (1024, "bytes=-0"),
        (0, "bytes=0-0"),
        (0, "bytes=-1"),
        (0, "bytes=5-"),
    ],
)
async def test_unsatisfiable_range(session: aiohttp.ClientSession, size: int, rng: str) -> None:
    async with S3Emulator() as emu:
        emu.put(KEY, DATA[:size])
        status, headers, body = await fetch(session, emu.url_for(KEY), headers={"Range": rng})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"
    assert error_code(body) == "InvalidRange"


async def test_empty_object_open_range_is_plain_200(session: aiohttp.ClientSession) -> None:
    async with S3Emulator() as emu:
        emu.put(KEY, b"")
        status, headers, body = await fetch(
            session, emu.url_for(KEY), headers={"Range": "bytes=0-"}
        )
    assert (status, body, headers["Content-Length"]) == (200, b"", "0")
    assert "Content-Range" not in headers


@pytest.mark.parametrize(
    "rng",
    [
        "bytes=9-2",
        "bytes=abc",
        "bytes=-",
        "items=0-9",
        "bytes 0-9",
        "bytes=0-1,5-6",
        "bytes=0-1, 5-",
    ],
)
async def test_invalid_or_multiple_ranges_are_ignored(
    emu: S3Emulator, session: aiohttp.ClientSession, rng: str
) -> None:
    status, headers, body = await fetch(session, emu.url_for(KEY), headers={"Range": rng})
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers


async def test_if_match(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    url = emu.url_for(KEY)
    status, _, body = await fetch(session, url, headers={"If-Match": '"0000"'})
    assert (status, error_code(body)) == (412, "PreconditionFailed")
    # Checked before Range: a bad range does not turn a failed precondition into 416.
    mismatch_and_bad_range = {"If-Match": '"0000"', "Range": "bytes=5000-"}
    status, _, _ = await fetch(session, url, headers=mismatch_and_bad_range)
    assert status == 412
    status, _, body = await fetch(
        session, url, headers={"If-Match": MD5_ETAG, "Range": "bytes=0-3"}
    )
    assert (status, body) == (206, DATA[:4])
    status, _, _ = await fetch(session, url, headers={"If-Match": f'"x", {MD5_ETAG}'})
    assert status == 200
    status, _, _ = await fetch(session, url, headers={"If-Match": "*"})
    assert status == 200


async def test_if_none_match(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    url = emu.url_for(KEY)
    matching = {"If-None-Match": MD5_ETAG, "Range": "bytes=0-3"}
    status, headers, body = await fetch(session, url, headers=matching)
    assert (status, body, headers["ETag"]) == (304, b"", MD5_ETAG)
    status, _, body = await fetch(session, url, headers={"If-None-Match": '"other"'})
    assert (status, body) == (200, DATA)


# --------------------------------------------------------------------------- HeadObject


async def test_head_has_get_headers_without_body(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    url = emu.url_for(KEY)
    _, get_headers, _ = await fetch(session, url)
    status, headers, body = await fetch(session, url, "HEAD")
    assert (status, body) == (200, b"")
    for name in ("Content-Length", "ETag", "Last-Modified", "Accept-Ranges", "Content-Type"):
        assert headers[name] == get_headers[name]
    status, headers, _ = await fetch(session, url, "HEAD", {"Range": "bytes=10-19"})
    assert (status, headers["Content-Range"], headers["Content-Length"]) == (
        206,
        "bytes 10-19/1024",
        "10",
    )
    status, headers, _ = await fetch(session, url, "HEAD", {"Range": "bytes=2000-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */1024")
    assert all(r.bytes_sent == 0 for r in emu.requests(method="HEAD"))


async def test_head_refused_setting(session: aiohttp.ClientSession) -> None:
    async with S3Emulator(head_refused=True) as emu:
        emu.put(KEY, DATA)
        assert (await fetch(session, emu.url_for(KEY), "HEAD"))[0] == 403
        assert (await fetch(session, emu.url_for(KEY)))[0] == 200


PRESIGNED = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature=abc%2Fdef"


async def test_presigned_query_is_ignored_for_get_and_refuses_head(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    url = URL(f"{emu.url_for(KEY)}?{PRESIGNED}", encoded=True)  # sent as written
    status, _, body = await fetch(session, url)
    assert (status, body) == (200, DATA)
    assert emu.log[-1].query == PRESIGNED  # raw, still encoded
    assert emu.log[-1].path == KEY
    assert (await fetch(session, url, "HEAD"))[0] == 403
    assert (await fetch(session, emu.url_for(KEY), "HEAD"))[0] == 200


async def test_presigned_head_allowed_when_switched_off(session: aiohttp.ClientSession) -> None:
    async with S3Emulator(presigned_refuse_head=False) as emu:
        emu.put(KEY, DATA)
        url = URL(f"{emu.url_for(KEY)}?{PRESIGNED}", encoded=True)
        assert (await fetch(session, url, "HEAD"))[0] == 200


async def test_unknown_and_deleted_keys(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    status, _, body = await fetch(session, emu.url_for("/dandiarchive/nope"))
    assert (status, error_code(body)) == (404, "NoSuchKey")
    assert (await fetch(session, emu.url_for("/dandiarchive/nope"), "HEAD"))[0] == 404
    emu.delete(KEY)
    assert (await fetch(session, emu.url_for(KEY)))[0] == 404


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_other_methods_405(
    emu: S3Emulator, session: aiohttp.ClientSession, method: str
) -> None:
    status, headers, body = await fetch(session, emu.url_for(KEY), method)
    assert (status, error_code(body), headers["Allow"]) == (405, "MethodNotAllowed", "GET, HEAD")


async def test_keep_alive_one_connection_serves_all(emu: S3Emulator) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        url = emu.url_for(KEY)
        await fetch(client, url)
        await fetch(client, url, headers={"Range": "bytes=0-9"})
        await fetch(client, url, headers={"Range": "bytes=5000-"})
        await fetch(client, url, "HEAD")
        await fetch(client, emu.url_for("/missing"))
    assert len(emu.log) == 5
    assert len({r.peer for r in emu.log}) == 1


async def test_aiohttp_client_fixture_pattern(aiohttp_client: Any) -> None:
    emu = S3Emulator()
    emu.put(KEY, DATA)
    client = await aiohttp_client(emu.app())
    resp = await client.get(KEY, headers={"Range": "bytes=-4"})
    assert (resp.status, await resp.read()) == (206, DATA[-4:])
    assert emu.log[-1].status == 206


# --------------------------------------------------------------------------- objects


async def test_put_replaces_object(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    _, before, _ = await fetch(session, emu.url_for(KEY))
    new_etag = emu.put(KEY, b"version two")
    status, after, body = await fetch(session, emu.url_for(KEY))
    assert (status, body) == (200, b"version two")
    assert after["ETag"] == new_etag == '"' + hashlib.md5(b"version two").hexdigest() + '"'
    assert new_etag != before["ETag"]
    # Replaced within the same second, yet Last-Modified moves on.
    assert email.utils.parsedate_to_datetime(after["Last-Modified"]) > (
        email.utils.parsedate_to_datetime(before["Last-Modified"])
    )


async def test_put_custom_etag_and_content_type(session: aiohttp.ClientSession) -> None:
    async with S3Emulator() as emu:
        assert emu.put("no/leading/slash", DATA, etag="abc-2", content_type="x/y") == '"abc-2"'
        _, headers, body = await fetch(session, emu.url_for("/no/leading/slash"))
    assert (headers["ETag"], headers["Content-Type"], body) == ('"abc-2"', "x/y", DATA)


async def test_put_file_reads_ranges_from_disk(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    content = os.urandom(300_000)
    path = tmp_path / "blob.nwb"
    path.write_bytes(content)
    async with S3Emulator(chunk_size=4096) as emu:  # many preads per response
        etag = emu.put_file(KEY, path)
        status, headers, body = await fetch(session, emu.url_for(KEY))
        assert (status, body, headers["ETag"]) == (200, content, etag)
        assert etag != '"' + hashlib.md5(content).hexdigest() + '"'  # not a content hash
        rng = {"Range": "bytes=100000-200001"}
        status, headers, body = await fetch(session, emu.url_for(KEY), headers=rng)
        assert (status, body) == (206, content[100_000:200_002])
        assert headers["Content-Range"] == "bytes 100000-200001/300000"
        assert emu.put_file(KEY, path, etag='"pinned"') == '"pinned"'


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.SLOWDOWN, 503, "SlowDown"),
        (Fault.INTERNAL_ERROR, 500, "InternalError"),
        (Fault.THROTTLE_429, 429, "TooManyRequests"),
        (Fault.NOT_FOUND, 404, "NoSuchKey"),
    ],
)
async def test_error_faults(
    emu: S3Emulator, session: aiohttp.ClientSession, fault: Fault, status: int, code: str
) -> None:
    emu.inject(fault)
    got, headers, body = await fetch(session, emu.url_for(KEY))
    assert (got, error_code(body)) == (status, code)
    assert "Retry-After" not in headers
    assert (await fetch(session, emu.url_for(KEY)))[:3:2] == (200, DATA)  # one shot
    assert [r.fault for r in emu.log] == [fault, None]


@pytest.mark.parametrize(("retry_after", "header"), [(2, "2"), (0.25, "0.25")])
async def test_retry_after(
    emu: S3Emulator, session: aiohttp.ClientSession, retry_after: float, header: str
) -> None:
    emu.inject(Fault.SLOWDOWN, retry_after=retry_after)
    emu.inject(Fault.THROTTLE_429, retry_after=retry_after)
    for expected in (503, 429):
        status, headers, _ = await fetch(session, emu.url_for(KEY))
        assert (status, headers["Retry-After"]) == (expected, header)


def test_reset_mid_body_delivers_exact_prefix_then_rst() -> None:
    with S3Emulator() as emu:
        emu.put(KEY, DATA)
        emu.inject(Fault.RESET_MID_BODY, after_bytes=300)
        emu.inject(Fault.RESET_MID_BODY)  # default: half
        for expected in (300, len(DATA) // 2):
            raw, error = raw_get(emu.url, KEY)
            status_line, headers, body = split_response(raw)
            assert status_line == "HTTP/1.1 200 OK"
            assert headers["Content-Length"] == str(len(DATA))
            assert body == DATA[:expected]
            assert isinstance(error, ConnectionResetError)
        assert [r.bytes_sent for r in emu.log] == [300, len(DATA) // 2]
        assert {r.fault for r in emu.log} == {Fault.RESET_MID_BODY}


async def test_reset_mid_body_seen_by_aiohttp(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    emu.inject(Fault.RESET_MID_BODY, after_bytes=100, with_range=True)
    async with session.get(emu.url_for(KEY), headers={"Range": "bytes=24-"}) as resp:
        assert resp.status == 206
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (await fetch(session, emu.url_for(KEY)))[2] == DATA  # the pool recovers


def test_short_body_closes_cleanly() -> None:
    with S3Emulator() as emu:
        emu.put(KEY, DATA)
        emu.inject(Fault.SHORT_BODY, after_bytes=700)
        raw, error = raw_get(emu.url, KEY, "Range: bytes=0-999\r\n")
        status_line, headers, body = split_response(raw)
        assert error is None  # FIN, not RST
        assert status_line == "HTTP/1.1 206 Partial Content"
        assert headers["Content-Length"] == "1000"
        assert body == DATA[:700]
        assert emu.log[-1].bytes_sent == 700


async def test_short_body_seen_by_aiohttp(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject(Fault.SHORT_BODY)
    async with session.get(emu.url_for(KEY)) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert emu.log[-1].bytes_sent == len(DATA) // 2


async def test_wrong_content_range(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject(Fault.WRONG_CONTENT_RANGE, count=2)
    status, headers, body = await fetch(session, emu.url_for(KEY), headers={"Range": "bytes=10-19"})
    assert (status, headers["Content-Range"], body) == (206, "bytes 11-20/1024", DATA[11:21])
    # At the end of the object the slice moves back instead.
    status, headers, body = await fetch(session, emu.url_for(KEY), headers={"Range": "bytes=-4"})
    assert (status, headers["Content-Range"], body) == (
        206,
        "bytes 1019-1022/1024",
        DATA[1019:1023],
    )


async def test_full_for_range_waits_for_a_range_request(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    emu.inject(Fault.FULL_FOR_RANGE)
    assert (await fetch(session, emu.url_for(KEY)))[0] == 200  # nothing to spoil: not spent
    assert emu.log[-1].fault is None
    status, headers, body = await fetch(session, emu.url_for(KEY), headers={"Range": "bytes=0-9"})
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers
    assert emu.log[-1].fault is Fault.FULL_FOR_RANGE


async def test_wrong_etag(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject(Fault.WRONG_ETAG)
    status, headers, body = await fetch(session, emu.url_for(KEY))
    assert (status, body) == (200, DATA)
    assert headers["ETag"] != MD5_ETAG and headers["ETag"].startswith('"')
    assert (await fetch(session, emu.url_for(KEY)))[1]["ETag"] == MD5_ETAG


async def test_head_refused_fault_only_hits_head(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    emu.inject(Fault.HEAD_REFUSED)
    assert (await fetch(session, emu.url_for(KEY)))[0] == 200
    assert (await fetch(session, emu.url_for(KEY), "HEAD"))[0] == 403
    assert (await fetch(session, emu.url_for(KEY), "HEAD"))[0] == 200


async def test_stall_then_body_for_a_patient_client(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    emu.inject(Fault.STALL, stall_seconds=0.3)
    t0 = time.monotonic()
    async with session.get(emu.url_for(KEY)) as resp:
        headers_at = time.monotonic() - t0
        body = await resp.read()
    assert body == DATA
    assert time.monotonic() - t0 >= 0.3
    assert headers_at < 0.3  # the headers came before the silence


async def test_stall_trips_a_read_timeout(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject(Fault.STALL, stall_seconds=5.0)
    async with session.get(emu.url_for(KEY), timeout=aiohttp.ClientTimeout(sock_read=0.2)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ServerTimeoutError):
            await resp.read()
    # The emulator notices the hang-up and finishes the exchange well before 5 s.
    await wait_until_async(lambda: len(emu.log) >= 1, 3.0, "the request finished", interval=0.02)
    assert emu.log[0].bytes_sent == 0
    assert emu.log[0].finished - emu.log[0].started < 2.0


# --------------------------------------------------------------------------- matching


async def test_faults_are_consumed_fifo_with_counts(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    emu.inject(Fault.SLOWDOWN, count=2)
    emu.inject(Fault.INTERNAL_ERROR)
    statuses = [(await fetch(session, emu.url_for(KEY)))[0] for _ in range(4)]
    assert statuses == [503, 503, 500, 200]


async def test_fault_filters(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    other = "/dandiarchive/other"
    emu.put(other, b"other")
    emu.inject(Fault.SLOWDOWN, method="head")
    emu.inject(Fault.INTERNAL_ERROR, path=other)
    emu.inject(Fault.THROTTLE_429, with_range=True)
    emu.inject(Fault.NOT_FOUND, with_range=False, path=KEY)
    assert (await fetch(session, emu.url_for(KEY), headers={"Range": "bytes=0-1"}))[0] == 429
    assert (await fetch(session, emu.url_for(KEY), "HEAD"))[0] == 503
    assert (await fetch(session, emu.url_for(other)))[0] == 500
    assert (await fetch(session, emu.url_for(KEY)))[0] == 404
    assert (await fetch(session, emu.url_for(KEY)))[0] == 200


async def test_body_faults_skip_requests_without_a_body(
    emu: S3Emulator, session: aiohttp.ClientSession
) -> None:
    emu.inject(Fault.RESET_MID_BODY, after_bytes=10)
    assert (await fetch(session, emu.url_for(KEY), "HEAD"))[0] == 200
    assert (await fetch(session, emu.url_for(KEY), headers={"If-None-Match": MD5_ETAG}))[0] == 304
    assert (await fetch(session, emu.url_for("/missing")))[0] == 404
    async with session.get(emu.url_for(KEY)) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert [r.fault for r in emu.log] == [None, None, None, Fault.RESET_MID_BODY]


async def test_clear_faults(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject(Fault.SLOWDOWN, count=5)
    emu.clear_faults()
    assert (await fetch(session, emu.url_for(KEY)))[0] == 200


# --------------------------------------------------------------------------- pacing


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_latency_before_every_status_line(
    session: aiohttp.ClientSession, method: str
) -> None:
    async with S3Emulator(latency=0.2) as emu:
        emu.put(KEY, DATA)
        for key in (KEY, "/missing"):
            t0 = time.monotonic()
            async with session.request(method, emu.url_for(key)):
                assert time.monotonic() - t0 >= 0.2


async def test_bandwidth_paces_the_body(session: aiohttp.ClientSession) -> None:
    size, bandwidth = 1_000_000, 4_000_000
    async with S3Emulator(bandwidth=bandwidth) as emu:
        emu.put(KEY, os.urandom(size))
        t0 = time.monotonic()
        body = (await fetch(session, emu.url_for(KEY)))[2]
        elapsed = time.monotonic() - t0
    assert len(body) == size
    assert elapsed >= size / bandwidth


# --------------------------------------------------------------------------- thread mode


def test_thread_mode_with_requests() -> None:
    with S3Emulator() as emu, requests.Session() as http:
        emu.put(KEY, DATA)
        resp = http.get(emu.url_for(KEY), headers={"Range": "bytes=100-199"})
        assert (resp.status_code, resp.content) == (206, DATA[100:200])
        assert http.head(emu.url_for(KEY)).headers["Content-Length"] == "1024"
        assert http.get(emu.url_for(KEY)).content == DATA
        assert len({r.peer for r in emu.log}) == 1  # requests' pool kept the connection
        assert emu.log[0].user_agent is not None
        assert emu.log[0].user_agent.startswith("python-requests/")
    with pytest.raises(RuntimeError):
        _ = emu.url


def test_start_in_thread_explicit() -> None:
    emu = S3Emulator()
    emu.start_in_thread()
    try:
        assert emu.url.startswith("http://127.0.0.1:")
        assert requests.get(emu.url_for("/x"), timeout=5).status_code == 404
    finally:
        emu.stop_thread()
    emu.stop_thread()  # idempotent


# --------------------------------------------------------------------------- log


async def test_log_records_each_exchange(emu: S3Emulator, session: aiohttp.ClientSession) -> None:
    other = "/dandiarchive/other"
    emu.put(other, b"12345")
    headers = {"Range": "bytes=0-99", "User-Agent": "nwbcache-test/1"}
    before = time.monotonic()
    await fetch(session, URL(f"{emu.url_for(KEY)}?a=1&b=%2F", encoded=True), headers=headers)
    await fetch(session, emu.url_for(KEY), "HEAD")
    await fetch(session, emu.url_for(other))
    entry = emu.log[0]
    assert (entry.method, entry.path, entry.query) == ("GET", KEY, "a=1&b=%2F")
    assert (entry.range, entry.user_agent, entry.status) == ("bytes=0-99", "nwbcache-test/1", 206)
    assert entry.headers["Range"] == "bytes=0-99"
    assert entry.headers["User-Agent"] == "nwbcache-test/1"
    assert (entry.bytes_sent, entry.fault) == (100, None)
    assert before <= entry.started <= entry.finished <= time.monotonic()
    assert emu.bytes_sent() == 105
    assert emu.bytes_sent(KEY) == 100
    assert [r.method for r in emu.requests(KEY)] == ["GET", "HEAD"]
    assert [r.path for r in emu.requests(method="get")] == [KEY, other]
    emu.clear_log()
    assert emu.log == [] and emu.bytes_sent() == 0


# --------------------------------------------------------------------------- ranges, broadly


@pytest.fixture(scope="module")
def threaded() -> Iterator[tuple[S3Emulator, requests.Session]]:
    with S3Emulator() as emu, requests.Session() as http:
        yield emu, http


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 40),
    first=st.none() | st.integers(0, 45),
    last=st.none() | st.integers(0, 45),
)
def test_ranges_match_the_s3_model(
    threaded: tuple[S3Emulator, requests.Session],
    size: int,
    first: int | None,
    last: int | None,
) -> None:
    emu, http = threaded
    data = DATA[:size]
    emu.put(KEY, data)
    rng = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    resp = http.get(emu.url_for(KEY), headers={"Range": rng})
    if (first is None and last is None) or (
        first is not None and last is not None and last < first
    ):
        expected: tuple[int, bytes] = (200, data)  # malformed: ignored
    elif size == 0 and (first, last) == (0, None):
        expected = (200, b"")
    elif first is None:  # suffix
        assert last is not None
        expected = (416, b"") if last == 0 or size == 0 else (206, data[-last:])
    elif first >= size:
        expected = (416, b"")
    else:
        expected = (206, data[first : None if last is None else last + 1])
    assert resp.status_code == expected[0]
    if expected[0] == 416:
        assert resp.headers["Content-Range"] == f"bytes */{size}"
    else:
        assert resp.content == expected[1]
    if expected[0] == 206:
        start = size - len(expected[1]) if first is None else first
        end = start + len(expected[1]) - 1
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{size}"


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("text", "value"),
    [("80M", 80e6), ("1.5G", 1.5e9), ("500k", 5e5), ("250000", 2.5e5), ("10MB/s", 1e7)],
)
def test_parse_bandwidth_network_units(text: str, value: float) -> None:
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize("text", ["", "0", "fast", "-5M", "80Mi"])
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bandwidth(text)


@pytest.mark.slow
def test_cli_serves_a_directory(tmp_path: Path) -> None:
    (tmp_path / "blobs" / "abc").mkdir(parents=True)
    (tmp_path / "blobs" / "abc" / "uuid-1").write_bytes(DATA)
    (tmp_path / "top.txt").write_bytes(b"top")
    cmd = [*S3EMU, "--root", str(tmp_path), "--prefix", "/dandiarchive"]
    cmd += ["--latency", "0.01", "--bandwidth", "80M"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("s3emu: serving http://127.0.0.1:"), line
        url = line.split()[-1]
        resp = requests.get(f"{url}/dandiarchive/blobs/abc/uuid-1", headers={"Range": "bytes=0-9"})
        assert (resp.status_code, resp.content) == (206, DATA[:10])
        assert requests.get(f"{url}/dandiarchive/top.txt", timeout=5).content == b"top"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert '"GET /dandiarchive/blobs/abc/uuid-1" 206 10' in stderr


@pytest.mark.slow
def test_cli_help_names_network_units() -> None:
    out = subprocess.run(
        [*S3EMU, "--help"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert "80*10**6" in out
