"""The S3 API as the endpoint reads and words it (s3api.py): pure, table-tested."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from nwbcache.urls import AllowList, upstream_from_proxy_path
from nwbcache_proxy.errors import (
    BadRequest,
    LoopDetected,
    NotAllowed,
    NotCached,
    PreconditionFailed,
    ProxyError,
    RangeNotSatisfiable,
    UpstreamDown,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    VersionChanged,
)
from nwbcache_proxy.s3api import (
    LIST_V1_PARAMS,
    LIST_V2_PARAMS,
    Bucket,
    Operation,
    S3Error,
    buckets_xml,
    check_listing,
    classify,
    error_code,
    error_xml,
    location_xml,
)

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.mark.parametrize(
    ("method", "path", "query", "operation", "bucket", "key"),
    [
        ("GET", "/bk1/a/b.nwb", "", Operation.GET_OBJECT, "bk1", "a/b.nwb"),
        ("HEAD", "/bk1/a/b.nwb", "", Operation.HEAD_OBJECT, "bk1", "a/b.nwb"),
        # botocore's operation marker and presigned-URL parameters are not subresources
        ("GET", "/bk1/k", "x-id=GetObject", Operation.GET_OBJECT, "bk1", "k"),
        (
            "GET",
            "/bk1/k",
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=ab&X-Amz-Expires=60",
            Operation.GET_OBJECT,
            "bk1",
            "k",
        ),
        ("GET", "/bk1/k", "response-content-type=text%2Fplain", Operation.GET_OBJECT, "bk1", "k"),
        ("GET", "/bk1/k", "versionId=3", Operation.GET_OBJECT, "bk1", "k"),
        ("GET", "/bk1/a%20b/%E2%9C%93", "", Operation.GET_OBJECT, "bk1", "a b/✓"),
        ("GET", "/bk1/k", "acl", Operation.UNSUPPORTED, "bk1", "k"),
        ("GET", "/bk1/k", "tagging", Operation.UNSUPPORTED, "bk1", "k"),
        ("GET", "/bk1/k", "partNumber=2", Operation.UNSUPPORTED, "bk1", "k"),
        ("GET", "/bk1/k", "attributes", Operation.UNSUPPORTED, "bk1", "k"),
        ("PUT", "/bk1/k", "", Operation.WRITE, "bk1", "k"),
        ("POST", "/bk1/k", "uploads", Operation.WRITE, "bk1", "k"),
        ("DELETE", "/bk1/k", "", Operation.WRITE, "bk1", "k"),
        ("PUT", "/bk1", "", Operation.WRITE, "bk1", ""),
        ("POST", "/bk1", "delete", Operation.WRITE, "bk1", ""),
        ("OPTIONS", "/bk1/k", "", Operation.UNSUPPORTED, "bk1", "k"),
        ("GET", "/bk1", "list-type=2", Operation.LIST_OBJECTS_V2, "bk1", ""),
        (
            "GET",
            "/bk1/",
            "list-type=2&prefix=a%2F&delimiter=%2F",
            Operation.LIST_OBJECTS_V2,
            "bk1",
            "",
        ),
        (
            "GET",
            "/bk1",
            "list-type=2&continuation-token=x&encoding-type=url",
            Operation.LIST_OBJECTS_V2,
            "bk1",
            "",
        ),
        ("GET", "/bk1", "", Operation.LIST_OBJECTS, "bk1", ""),
        ("GET", "/bk1", "prefix=a&marker=b&max-keys=10", Operation.LIST_OBJECTS, "bk1", ""),
        ("GET", "/bk1", "location", Operation.GET_BUCKET_LOCATION, "bk1", ""),
        ("HEAD", "/bk1", "", Operation.HEAD_BUCKET, "bk1", ""),
        ("GET", "/bk1", "versions", Operation.UNSUPPORTED, "bk1", ""),
        ("GET", "/bk1", "uploads", Operation.UNSUPPORTED, "bk1", ""),
        ("GET", "/bk1", "policy", Operation.UNSUPPORTED, "bk1", ""),
        ("GET", "/bk1", "list-type=2&marker=x", Operation.UNSUPPORTED, "bk1", ""),
        ("GET", "/", "", Operation.LIST_BUCKETS, "", ""),
        ("PUT", "/", "", Operation.WRITE, "", ""),
        ("GET", "/", "acl", Operation.UNSUPPORTED, "", ""),
    ],
)
def test_classify(
    method: str, path: str, query: str, operation: Operation, bucket: str, key: str
) -> None:
    req = classify(method, path, query)
    assert (req.operation, req.bucket, req.key) == (operation, bucket, key)


def test_classify_drops_signatures_and_markers_from_the_query() -> None:
    req = classify("GET", "/bk1/k", "versionId=7&X-Amz-Signature=s&x-id=GetObject")
    assert req.query == (("versionId", "7"),)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/UPPER/k", "InvalidBucketName"),
        ("/a/k", "InvalidBucketName"),
        ("/b_1/k", "InvalidBucketName"),
        ("/bk1/%FF%FE", "InvalidURI"),
        ("/bk1/" + "k" * 1025, "KeyTooLongError"),
    ],
)
def test_classify_refuses_what_cannot_be_an_s3_request(path: str, code: str) -> None:
    with pytest.raises(S3Error) as info:
        classify("GET", path, "")
    assert info.value.code == code and info.value.status == 400


def test_a_key_of_1024_bytes_is_an_object() -> None:
    assert classify("GET", "/bk1/" + "k" * 1024, "").operation is Operation.GET_OBJECT


@pytest.mark.parametrize(
    ("entry", "base", "region"),
    [
        (
            "dandiarchive=https://dandiarchive.s3.amazonaws.com",
            "https://dandiarchive.s3.amazonaws.com",
            "us-east-2",
        ),
        (
            "mine=https://mine.s3.eu-west-1.amazonaws.com/",
            "https://mine.s3.eu-west-1.amazonaws.com",
            "eu-west-1",
        ),
        (
            "bk1=https://s3.us-west-2.amazonaws.com/bk1",
            "https://s3.us-west-2.amazonaws.com/bk1",
            "us-west-2",
        ),
        ("bk1=http://127.0.0.1:9000/bucket", "http://127.0.0.1:9000/bucket", "us-east-1"),
        (" bk1 = http://minio.lab:9000/bk1/sub/ ", "http://minio.lab:9000/bk1/sub", "us-east-1"),
    ],
)
def test_bucket_parse(entry: str, base: str, region: str) -> None:
    bucket = Bucket.parse(entry)
    assert (bucket.base, bucket.region) == (base, region)


@pytest.mark.parametrize(
    "entry",
    [
        "bk1",
        "=http://h/b",
        "bk1=",
        "B1=http://h/b",
        "bk1=ftp://h/b",
        "bk1=http://h/b?x=1",
        "bk1=http://h b/b",
    ],
)
def test_bucket_parse_refuses(entry: str) -> None:
    with pytest.raises(ValueError, match="--s3-bucket"):
        Bucket.parse(entry)


@pytest.mark.parametrize(
    ("base", "key", "expected"),
    [
        (
            "https://dandiarchive.s3.amazonaws.com",
            "blobs/abc/def/0f1e",
            "/https/dandiarchive.s3.amazonaws.com/blobs/abc/def/0f1e",
        ),
        ("http://127.0.0.1:9000/bucket", "a b/c+d", "/http/127.0.0.1:9000/bucket/a%20b/c%2Bd"),
        ("http://127.0.0.1:9000/bucket", "x/✓~_.-", "/http/127.0.0.1:9000/bucket/x/%E2%9C%93~_.-"),
    ],
)
def test_object_url_is_the_proxied_urls_upstream(base: str, key: str, expected: str) -> None:
    """The S3 form and the proxied form of one object name one upstream URL:
    one cache entry, one fetch."""
    url = Bucket.parse(f"bk1={base}").object_url(key)
    assert url == upstream_from_proxy_path(expected)


def test_object_url_keeps_only_the_version_of_the_query() -> None:
    url = Bucket.parse("bk1=http://h:1/b").object_url("k", [("versionId", "a/b"), ("acl", "")])
    assert url.url == "http://h:1/b/k?versionId=a%2Fb"


def test_a_bucket_may_be_given_as_its_s3_url() -> None:
    bucket = Bucket.parse("mine=s3://dandiarchive")
    assert (bucket.base, bucket.region) == ("https://dandiarchive.s3.amazonaws.com", "us-east-2")


def test_a_key_cannot_climb_out_of_its_bucket() -> None:
    """Dot segments would be resolved by someone on the way (and not by the
    allow-list): such keys are refused; an escaped dot is a plain character."""
    bucket = Bucket.parse("bk1=http://h:1/b")
    for key in ("../other/k", "a/../../other", "./k", "a/.."):
        with pytest.raises(BadRequest):
            bucket.object_url(key)
    assert bucket.object_url("a/%2e%2e/x").path == "/b/a/%252e%252e/x"


def test_list_url_keeps_the_listing_parameters_sorted() -> None:
    bucket = Bucket.parse("bk1=https://bk1.s3.amazonaws.com")
    query = [("prefix", "a/"), ("list-type", "2"), ("max-keys", "5"), ("marker", "m")]
    url = bucket.list_url(query, LIST_V2_PARAMS)
    assert url.url == "https://bk1.s3.amazonaws.com/?list-type=2&max-keys=5&prefix=a%2F"
    path_style = Bucket.parse("bk1=http://h:1/bucket").list_url([("marker", "m")], LIST_V1_PARAMS)
    assert path_style.url == "http://h:1/bucket/?marker=m"
    assert AllowList.parse(["h:1/bucket"]).permits(path_style)


@pytest.mark.parametrize(
    ("query", "ok"),
    [
        ([("list-type", "2")], True),
        ([("list-type", "1")], False),
        ([("max-keys", "1000")], True),
        ([("max-keys", "-1")], False),
        ([("max-keys", "ten")], False),
        ([("encoding-type", "url")], True),
        ([("encoding-type", "base64")], False),
    ],
)
def test_check_listing(query: list[tuple[str, str]], ok: bool) -> None:
    if ok:
        check_listing(query)
    else:
        with pytest.raises(S3Error) as info:
            check_listing(query)
        assert info.value.code == "InvalidArgument"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (S3Error(404, "NoSuchBucket", "m"), "NoSuchBucket"),
        (UpstreamStatus("m", status=404), "NoSuchKey"),
        (UpstreamStatus("m", status=410), "NoSuchKey"),
        (UpstreamStatus("m", status=403), "AccessDenied"),
        (UpstreamStatus("m", status=401), "AccessDenied"),
        (NotAllowed("m"), "AccessDenied"),
        (BadRequest("m"), "InvalidArgument"),
        (PreconditionFailed("m"), "PreconditionFailed"),
        (RangeNotSatisfiable("m", size=3, requested="bytes=9-", headers={}), "InvalidRange"),
        (UpstreamDown("m", retry_after=3), "SlowDown"),
        (VersionChanged("m"), "SlowDown"),
        (UpstreamUnavailable("m"), "ServiceUnavailable"),
        (UpstreamTimeout("m"), "ServiceUnavailable"),
        (NotCached("m"), "ServiceUnavailable"),
        (LoopDetected("m"), "LoopDetected"),
        (ProxyError("m"), "InternalError"),
    ],
)
def test_error_codes(exc: ProxyError, code: str) -> None:
    assert error_code(exc) == code


def test_error_xml_is_s3s_error_document() -> None:
    exc = RangeNotSatisfiable("range not satisfiable", size=10, requested="bytes=20-", headers={})
    root = ET.fromstring(error_xml(exc, "/bk1/a&b", "req1", "bk1", "a&b"))
    fields = {child.tag: child.text for child in root}
    assert root.tag == "Error"
    assert fields == {
        "Code": "InvalidRange",
        "Message": "range not satisfiable",
        "BucketName": "bk1",
        "Key": "a&b",
        "RangeRequested": "bytes=20-",
        "ActualObjectSize": "10",
        "Resource": "/bk1/a&b",
        "RequestId": "req1",
    }


@pytest.mark.parametrize(("region", "text"), [("us-east-1", None), ("us-east-2", "us-east-2")])
def test_location_xml(region: str, text: str | None) -> None:
    root = ET.fromstring(location_xml(region))
    assert root.tag == NS + "LocationConstraint" and root.text == text


def test_buckets_xml_lists_the_names() -> None:
    root = ET.fromstring(buckets_xml(["a1b", "c<d"]))
    names = [e.text for e in root.iter(NS + "Name")]
    assert root.tag == NS + "ListAllMyBucketsResult" and names == ["a1b", "c<d"]
