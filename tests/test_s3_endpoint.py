"""The S3 endpoint (--s3-listen) as boto3 and s3fs see it: objects, listings, errors, trust.

A daemon in a thread in front of the S3 emulator; its bucket ``dandiarchive``
is the emulator's path-style ``/dandiarchive``. Bytes are compared with what
was put at the origin, and the origin's log says what left the machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
import requests
import s3fs
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from nwbcache_proxy import s3listing
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied, scrape, value, wait_until
from tests.support.s3emu import Fault, S3Emulator

BS = 64 * 1024
DATA = os.urandom(5 * BS + 123)
KEY = "blobs/abc/def/0001"
ORIGIN_KEY = f"/dandiarchive/{KEY}"


@pytest.fixture
def daemon(origin: S3Emulator, make_daemon: Callable[..., DaemonThread]) -> DaemonThread:
    origin.put(ORIGIN_KEY, DATA)
    host = origin_host(origin)
    return make_daemon(
        block_size=BS,
        s3_listen="127.0.0.1:0",
        s3_bucket=(f"dandiarchive=http://{host}/dandiarchive",),
        retry_attempts=2,
    )


def client(daemon: DaemonThread, **config: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=daemon.s3_url,
        region_name="us-east-2",
        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}, **config),
    )


def signed_client(daemon: DaemonThread) -> Any:
    """A client that signs (SigV4) with made-up keys, as a user's configured SDK does."""
    return boto3.client(
        "s3",
        endpoint_url=daemon.s3_url,
        region_name="us-east-2",
        aws_access_key_id="AKIAEXAMPLEEXAMPLE00",
        aws_secret_access_key="not-a-real-secret-key-0123456789abcdefgh",
        config=Config(retries={"max_attempts": 1}),
    )


def error_of(call: Callable[[], object]) -> tuple[str, int]:
    with pytest.raises(ClientError) as info:
        call()
    response = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


@pytest.mark.parametrize(
    ("rng", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=100-70000", 100, 70001),
        (f"bytes={BS - 1}-{2 * BS}", BS - 1, 2 * BS + 1),
        ("bytes=-500", len(DATA) - 500, len(DATA)),
        (f"bytes={len(DATA) - 10}-", len(DATA) - 10, len(DATA)),
    ],
)
def test_get_object_ranges_are_the_origins_bytes(
    daemon: DaemonThread, rng: str, start: int, end: int
) -> None:
    r = client(daemon).get_object(Bucket="dandiarchive", Key=KEY, Range=rng)
    assert r["Body"].read() == DATA[start:end]
    assert r["ContentRange"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206


def test_get_and_head_object_carry_s3s_headers(daemon: DaemonThread, origin: S3Emulator) -> None:
    s3 = client(daemon)
    whole = s3.get_object(Bucket="dandiarchive", Key=KEY)
    head = s3.head_object(Bucket="dandiarchive", Key=KEY)
    [upstream] = [r for r in origin.log if r.method == "GET"][:1]
    assert whole["Body"].read() == DATA
    assert head["ContentLength"] == len(DATA) and head["AcceptRanges"] == "bytes"
    origin_head = requests.head(origin.url_for(ORIGIN_KEY), timeout=10).headers
    assert head["ETag"] == whole["ETag"] == origin_head["ETag"]
    assert head["LastModified"] == whole["LastModified"]
    assert head["ResponseMetadata"]["HTTPHeaders"]["last-modified"] == origin_head["Last-Modified"]
    request_id = head["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]
    assert request_id == head["ResponseMetadata"]["RequestId"] and request_id
    assert upstream.path == ORIGIN_KEY


def test_conditionals(daemon: DaemonThread) -> None:
    s3 = client(daemon)
    etag = s3.head_object(Bucket="dandiarchive", Key=KEY)["ETag"]
    assert s3.get_object(Bucket="dandiarchive", Key=KEY, IfMatch=etag)["Body"].read() == DATA
    assert error_of(lambda: s3.get_object(Bucket="dandiarchive", Key=KEY, IfMatch='"x"')) == (
        "PreconditionFailed",
        412,
    )
    assert error_of(lambda: s3.get_object(Bucket="dandiarchive", Key=KEY, IfNoneMatch=etag)) == (
        "304",
        304,
    )
    later = s3.head_object(Bucket="dandiarchive", Key=KEY)["LastModified"]
    assert error_of(
        lambda: s3.get_object(Bucket="dandiarchive", Key=KEY, IfModifiedSince=later)
    ) == ("304", 304)


def test_a_range_past_the_end_is_invalid_range(daemon: DaemonThread) -> None:
    s3 = client(daemon)
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="dandiarchive", Key=KEY, Range=f"bytes={len(DATA)}-")
    error = info.value.response["Error"]
    assert (error["Code"], error["ActualObjectSize"]) == ("InvalidRange", str(len(DATA)))
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416


def test_a_missing_key_is_no_such_key(daemon: DaemonThread, origin: S3Emulator) -> None:
    s3 = client(daemon)
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket="dandiarchive", Key="blobs/none")
    assert error_of(lambda: s3.head_object(Bucket="dandiarchive", Key="blobs/none")) == (
        "404",
        404,
    )


def test_an_unknown_bucket_is_no_such_bucket_and_nothing_leaves(
    daemon: DaemonThread, origin: S3Emulator
) -> None:
    s3 = client(daemon)
    origin.put("/other/k", b"secret")
    origin.clear_log()
    with pytest.raises(s3.exceptions.NoSuchBucket):
        s3.get_object(Bucket="other", Key="k")
    with pytest.raises(s3.exceptions.NoSuchBucket):
        s3.list_objects_v2(Bucket="other")
    assert error_of(lambda: s3.head_bucket(Bucket="other")) == ("404", 404)
    assert origin.log == []


@pytest.mark.parametrize(
    "write",
    [
        lambda s3: s3.put_object(Bucket="dandiarchive", Key="new", Body=b"x"),
        lambda s3: s3.delete_object(Bucket="dandiarchive", Key=KEY),
        lambda s3: s3.delete_objects(Bucket="dandiarchive", Delete={"Objects": [{"Key": KEY}]}),
        lambda s3: s3.copy_object(
            Bucket="dandiarchive", Key="copy", CopySource={"Bucket": "dandiarchive", "Key": KEY}
        ),
        lambda s3: s3.create_multipart_upload(Bucket="dandiarchive", Key="big"),
        lambda s3: s3.create_bucket(Bucket="newbucket"),
    ],
)
def test_writes_are_access_denied_and_nothing_leaves(
    daemon: DaemonThread, origin: S3Emulator, write: Callable[[Any], object]
) -> None:
    origin.clear_log()
    code, status = error_of(lambda: write(signed_client(daemon)))
    assert (code, status) in {("AccessDenied", 403), ("NoSuchBucket", 404)}
    assert origin.log == []


def test_other_operations_are_not_implemented(daemon: DaemonThread, origin: S3Emulator) -> None:
    s3 = client(daemon)
    origin.clear_log()
    assert error_of(lambda: s3.get_object_acl(Bucket="dandiarchive", Key=KEY)) == (
        "NotImplemented",
        501,
    )
    assert error_of(lambda: s3.list_object_versions(Bucket="dandiarchive")) == (
        "NotImplemented",
        501,
    )
    assert origin.log == []


def test_bucket_operations(daemon: DaemonThread) -> None:
    s3 = client(daemon)
    head = s3.head_bucket(Bucket="dandiarchive")
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"] == "us-east-1"
    assert s3.get_bucket_location(Bucket="dandiarchive")["LocationConstraint"] is None
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["dandiarchive"]


@pytest.fixture
def listed(origin: S3Emulator) -> list[str]:
    keys = [f"dandisets/000{i % 3}/file-{i:02d}.nwb" for i in range(25)]
    keys += ["top.txt", "weird key+ü.nwb"]
    for key in keys:
        origin.put(f"/dandiarchive/{key}", key.encode())
    return sorted([*keys, KEY])


def test_list_objects_v2_pages_as_the_origin_lists(daemon: DaemonThread, listed: list[str]) -> None:
    pages = client(daemon).get_paginator("list_objects_v2")
    seen = [
        [c["Key"] for c in page.get("Contents", [])]
        for page in pages.paginate(Bucket="dandiarchive", PaginationConfig={"PageSize": 7})
    ]
    assert [k for page in seen for k in page] == listed
    assert [len(page) for page in seen] == [7, 7, 7, 7]


def test_list_objects_prefix_delimiter_and_v1_markers(
    daemon: DaemonThread, listed: list[str]
) -> None:
    s3 = client(daemon)
    top = s3.list_objects_v2(Bucket="dandiarchive", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["blobs/", "dandisets/"]
    assert [c["Key"] for c in top["Contents"]] == ["top.txt", "weird key+ü.nwb"]
    under = s3.list_objects_v2(Bucket="dandiarchive", Prefix="dandisets/0001/")
    assert [c["Key"] for c in under["Contents"]] == [k for k in listed if "0001/" in k]
    assert under["Contents"][0]["Size"] == len(under["Contents"][0]["Key"])
    pages = s3.get_paginator("list_objects").paginate(
        Bucket="dandiarchive", PaginationConfig={"PageSize": 10}
    )
    assert [c["Key"] for page in pages for c in page.get("Contents", [])] == listed


def test_a_listing_is_asked_once_for_a_few_seconds_then_again(
    daemon: DaemonThread,
    origin: S3Emulator,
    listed: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(s3listing, "LISTING_TTL", 1.5)
    s3 = client(daemon)
    origin.clear_log()
    first = s3.list_objects_v2(Bucket="dandiarchive", Prefix="dandisets/")["KeyCount"]
    again = s3.list_objects_v2(Bucket="dandiarchive", Prefix="dandisets/")["KeyCount"]
    assert first == again == 25
    origin.wait_idle()  # a request is logged once its response is sent
    assert len(origin.requests("/dandiarchive/")) == 1
    origin.put("/dandiarchive/dandisets/0009/new.nwb", b"n")
    time.sleep(1.6)
    assert s3.list_objects_v2(Bucket="dandiarchive", Prefix="dandisets/")["KeyCount"] == 26
    origin.wait_idle()
    assert len(origin.requests("/dandiarchive/")) == 2


def test_a_listing_upstream_refuses_is_passed_on(daemon: DaemonThread, origin: S3Emulator) -> None:
    s3 = client(daemon)
    code, status = error_of(
        lambda: s3.list_objects_v2(Bucket="dandiarchive", ContinuationToken="%%%not-a-token")
    )
    assert (code, status) == ("InvalidArgument", 400)
    assert error_of(lambda: s3.list_objects_v2(Bucket="dandiarchive", MaxKeys=-1))[1] == 400


def test_a_failing_upstream_is_retried_then_an_s3_error(
    daemon: DaemonThread, origin: S3Emulator
) -> None:
    origin.put("/dandiarchive/blobs/flaky", DATA[:1000])
    origin.inject(Fault.SLOWDOWN, path="/dandiarchive/blobs/flaky", count=1)
    s3 = client(daemon)
    assert s3.get_object(Bucket="dandiarchive", Key="blobs/flaky")["Body"].read() == DATA[:1000]
    origin.put("/dandiarchive/blobs/down", DATA[:1000])
    origin.inject(Fault.INTERNAL_ERROR, path="/dandiarchive/blobs/down", count=10)
    assert error_of(lambda: s3.get_object(Bucket="dandiarchive", Key="blobs/down")) == (
        "ServiceUnavailable",
        502,
    )


def test_one_object_read_both_ways_is_fetched_once(
    daemon: DaemonThread, origin: S3Emulator
) -> None:
    s3 = client(daemon)
    assert s3.get_object(Bucket="dandiarchive", Key=KEY)["Body"].read() == DATA
    origin.wait_idle()
    fetched = origin.bytes_sent(ORIGIN_KEY)
    through_proxy = requests.get(proxied(daemon.url, origin, ORIGIN_KEY), timeout=30)
    assert through_proxy.content == DATA
    assert through_proxy.headers["X-Cache"] == "HIT"
    assert origin.bytes_sent(ORIGIN_KEY) == fetched == len(DATA)


def test_keys_with_spaces_plus_and_unicode(daemon: DaemonThread, origin: S3Emulator) -> None:
    key = "dir with space/a+b/ü~é.nwb"
    origin.put(f"/dandiarchive/{key}", DATA[:777])
    s3 = client(daemon)
    assert s3.get_object(Bucket="dandiarchive", Key=key)["Body"].read() == DATA[:777]
    fs = s3fs.S3FileSystem(anon=True, endpoint_url=daemon.s3_url, skip_instance_cache=True)
    assert fs.cat_file(f"dandiarchive/{key}", start=7, end=70) == DATA[7:70]
    assert {r.path for r in origin.log} == {f"/dandiarchive/{key}"}


@pytest.fixture
def private(origin: S3Emulator) -> Iterator[S3Emulator]:
    origin.require_signature("/dandiarchive/private/")
    origin.put("/dandiarchive/private/k", DATA)
    yield origin


def test_a_private_object_is_never_served_through_the_s3_endpoint(
    daemon: DaemonThread, private: S3Emulator
) -> None:
    key = "/dandiarchive/private/k"
    owner = proxied(daemon.url, private, key, private.presign(key))
    assert requests.get(owner, timeout=30).content == DATA  # cached now, privately
    private.wait_idle()
    private.clear_log()
    for s3 in (client(daemon), signed_client(daemon)):
        with pytest.raises(ClientError) as got:
            s3.get_object(Bucket="dandiarchive", Key="private/k")
        assert got.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError) as head:
            s3.head_object(Bucket="dandiarchive", Key="private/k")
        assert head.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    presigned = client(daemon).generate_presigned_url(
        "get_object", Params={"Bucket": "dandiarchive", "Key": "private/k"}
    )
    assert requests.get(presigned, timeout=30).status_code == 403
    # Upstream was asked, without anything the clients signed.
    assert private.log
    assert all("Authorization" not in r.headers and not r.query for r in private.log)


def test_signatures_for_the_endpoint_are_neither_forwarded_nor_logged(
    daemon: DaemonThread, origin: S3Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s3 = signed_client(daemon)
    assert s3.get_object(Bucket="dandiarchive", Key=KEY)["Body"].read() == DATA
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "dandiarchive", "Key": KEY})
    assert requests.get(url, timeout=30).content == DATA
    signature = url.rsplit("Signature=", 1)[1]
    assert all("Authorization" not in r.headers and not r.query for r in origin.log)
    wait_until(lambda: len([r for r in caplog.records if r.name == "nwbcache.access"]) >= 2, 5)
    text = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert signature not in text and "AKIAEXAMPLE" not in text


def test_s3_requests_are_counted_by_operation(daemon: DaemonThread) -> None:
    s3 = client(daemon)
    s3.head_object(Bucket="dandiarchive", Key=KEY)
    s3.get_object(Bucket="dandiarchive", Key=KEY, Range="bytes=0-9")["Body"].read()
    s3.get_object(Bucket="dandiarchive", Key=KEY, Range="bytes=10-19")["Body"].read()
    with pytest.raises(ClientError):
        s3.put_object(Bucket="dandiarchive", Key="x", Body=b"")
    samples = scrape(daemon.url)
    counts = {
        op: value(samples, "nwbcache_s3_requests_total", operation=op)
        for op in ("GetObject", "HeadObject", "Write", "ListObjectsV2")
    }
    assert counts == {"GetObject": 2, "HeadObject": 1, "Write": 1, "ListObjectsV2": 0}
    health = requests.get(f"{daemon.url}/healthz", timeout=10).json()
    assert health["s3"] == daemon.s3_url


def test_s3fs_reads_and_lists(daemon: DaemonThread, listed: list[str]) -> None:
    fs = s3fs.S3FileSystem(anon=True, endpoint_url=daemon.s3_url, skip_instance_cache=True)
    with fs.open(f"dandiarchive/{KEY}", block_size=BS) as f:
        f.seek(BS + 5)
        assert f.read(1000) == DATA[BS + 5 : BS + 1005]
    assert fs.size(f"dandiarchive/{KEY}") == len(DATA)
    names = fs.find("dandiarchive/dandisets/")
    assert names == [f"dandiarchive/{k}" for k in listed if k.startswith("dandisets/")]
