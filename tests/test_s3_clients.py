"""Real S3 clients against the daemon's S3 endpoint (--s3-listen, --s3-bucket):
the AWS CLI, HDF5's ros3 driver (HDF5 1.10 and 2.x, in their own venvs),
boto3 and s3fs; and remfile on the proxied URL of the same object.

Every byte is compared with the origin's (the local file it serves), and what
the origin sent is read from its request log: an object read through any mix
of clients and both URL forms is fetched upstream once.

The programs come from ``make test-deps`` (scripts/install-test-deps.sh,
scripts/install-ros3-envs.sh); without them the tests fail, never skip.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import boto3
import h5py
import pytest
import remfile
import requests
import s3fs
from botocore import UNSIGNED
from botocore.config import Config
from pynwb import NWBHDF5IO

from tests.support.daemons import DaemonProcess, DaemonThread, Spawn
from tests.support.helpers import REPO, SHARED_NWB, free_port, origin_host, proxied
from tests.support.ros3 import content_digests, nwb_summary
from tests.support.s3emu import S3Emulator, parse_range

pytestmark = [
    pytest.mark.slow,  # the AWS CLI, the ros3 venvs' interpreters, daemon processes
    pytest.mark.usefixtures("gc_in_main_thread_only", "_no_aws_settings_of_the_machine"),
]

AWS = Path("/usr/bin/aws")  # Debian's AWS CLI v2, not whatever `aws` PATH finds
ROS3_HDF5_110 = REPO / ".venv-hdf5-1.10" / "bin" / "python"  # any http(s) URL
ROS3_HDF5_2 = REPO / ".venv-hdf5-2" / "bin" / "python"  # s3://bucket/key + AWS_ENDPOINT_URL_S3
ROS3_SCRIPT = REPO / "tests" / "support" / "ros3.py"
# PyNWB reads it (an extension's namespace included); h5py reads both.
PYNWB_FILE = SHARED_NWB / "pynwb-backcompat-2.1.0_nwbfile_with_extension.nwb"
# Written by MATLAB's HDF5 library: another layout of metadata and chunks.
MATNWB_FILE = SHARED_NWB / "matnwb-ecephys_tutorial-2018-09.nwb"
BUCKET = "dandiarchive"
BLOCK = 16 * 1024  # the real files span several blocks
MiB = 1024 * 1024
TIMEOUT = 120


@pytest.fixture
def _no_aws_settings_of_the_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS_* of the developer's, no ~/.aws, no instance metadata, no proxy
    for 127.0.0.1: for boto3 and s3fs in this process and every child."""
    for name in list(os.environ):
        if name.upper().startswith("AWS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def _program(path: Path) -> str:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make test-deps`", pytrace=False)
    return str(path)


def _key_of(path: Path) -> str:
    """The object key (bucket-relative) a real file is served under."""
    return f"blobs/{path.name}"


def _put(origin: S3Emulator, *paths: Path) -> None:
    for path in paths:
        origin.put_file(f"/{BUCKET}/{_key_of(path)}", path)


def _bucket_flag(origin: S3Emulator) -> str:
    return f"{BUCKET}=http://{origin_host(origin)}/{BUCKET}"


@pytest.fixture
def s3_daemon(origin: S3Emulator, make_daemon: Callable[..., DaemonThread]) -> DaemonThread:
    return make_daemon(block_size=BLOCK, s3_listen="127.0.0.1:0", s3_bucket=(_bucket_flag(origin),))


def _fetched_once(origin: S3Emulator, key: str) -> int:
    """Body bytes the origin sent for object ``key`` (path, ``/bucket/...``);
    fails if any byte of it was sent twice."""
    origin.wait_idle()
    spans: list[tuple[int, int]] = []
    for r in origin.requests(key, method="GET"):
        if r.bytes_sent == 0:
            continue
        spec = parse_range(r.range)
        first = 0 if spec is None or spec[0] is None else spec[0]
        assert spec is None or spec[0] is not None, f"suffix range {r.range} asked upstream"
        spans.append((first, first + r.bytes_sent))
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"{key}: bytes {start}..{end} fetched twice; fetches {spans}"
    return sum(end - start for start, end in spans)


# -- the AWS CLI -----------------------------------------------------------


class AwsCli:
    """/usr/bin/aws with nothing of the machine: dummy credentials (it signs;
    the endpoint ignores signatures), a fresh HOME, and every proxy pointing
    at a closed local port, so that a request meant for anything but
    127.0.0.1 fails at once instead of reaching the internet."""

    def __init__(self, endpoint: str, home: Path) -> None:
        self.program = _program(AWS)
        self.endpoint = endpoint
        dead = f"http://127.0.0.1:{free_port()}"
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "LC_ALL": "C.UTF-8",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-2",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_PAGER": "",
            "HTTP_PROXY": dead,
            "HTTPS_PROXY": dead,
            "NO_PROXY": "127.0.0.1",
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.program, "--endpoint-url", self.endpoint, "--cli-connect-timeout", "5", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if check:
            assert done.returncode == 0, (args, done.returncode, done.stderr[-2000:])
        return done


@pytest.fixture
def aws(s3_daemon: DaemonThread, tmp_path: Path) -> AwsCli:
    home = tmp_path / "aws-home"
    home.mkdir()
    return AwsCli(s3_daemon.s3_url, home)


def test_aws_cli_copies_objects_and_ranges(origin: S3Emulator, aws: AwsCli, tmp_path: Path) -> None:
    """``aws s3 cp`` of a real NWB file and of an object past the CLI's 8 MiB
    multipart threshold (parallel ranged GETs); ``s3api get-object --range``
    with upstream's ETag. Each object is fetched from the origin once."""
    key = _key_of(PYNWB_FILE)
    etag = origin.put_file(f"/{BUCKET}/{key}", PYNWB_FILE)
    big = os.urandom(9 * MiB + 123)
    origin.put(f"/{BUCKET}/big/object.bin", big)

    copied = tmp_path / "copied.nwb"
    aws.run("s3", "cp", f"s3://{BUCKET}/{key}", str(copied))
    assert copied.read_bytes() == PYNWB_FILE.read_bytes()

    copied_big = tmp_path / "big.bin"
    aws.run("s3", "cp", f"s3://{BUCKET}/big/object.bin", str(copied_big))
    assert copied_big.read_bytes() == big

    part = tmp_path / "part"
    answer = aws.run(
        "s3api",
        "get-object",
        "--bucket",
        BUCKET,
        "--key",
        key,
        "--range",
        "bytes=100-199",
        str(part),
    )
    assert part.read_bytes() == PYNWB_FILE.read_bytes()[100:200]
    meta = json.loads(answer.stdout)
    assert meta["ContentRange"] == f"bytes 100-199/{PYNWB_FILE.stat().st_size}"
    assert meta["ContentLength"] == 100
    assert meta["ETag"] == etag

    assert _fetched_once(origin, f"/{BUCKET}/{key}") == PYNWB_FILE.stat().st_size
    assert _fetched_once(origin, f"/{BUCKET}/big/object.bin") == len(big)


# Characters a key may hold that URLs escape: space, "+", "%", "=", "&", "~", non-ASCII.
ODD_KEY = "odd/a b+c ✓ %41 ~x=y&z.bin"


def test_aws_cli_keys_that_need_escaping(
    origin: S3Emulator, aws: AwsCli, s3_daemon: DaemonThread, tmp_path: Path
) -> None:
    """A key with characters URLs escape: the CLI copies it and lists it, and the
    proxied URL of the same object is served from the same cache entry."""
    data = os.urandom(50_000)
    origin.put(f"/{BUCKET}/{ODD_KEY}", data)
    out = tmp_path / "odd"
    aws.run("s3", "cp", f"s3://{BUCKET}/{ODD_KEY}", str(out))
    assert out.read_bytes() == data
    listed = aws.run("s3", "ls", f"s3://{BUCKET}/odd/").stdout
    assert listed.rstrip("\n").endswith(f" {len(data)} {ODD_KEY.removeprefix('odd/')}"), listed

    origin_key = f"/{BUCKET}/{ODD_KEY}"
    fetches = len(origin.requests(origin_key, method="GET"))
    url = s3_daemon.url + "/http/" + origin.url_for(origin_key).removeprefix("http://")
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.content == data
    assert _fetched_once(origin, origin_key) == len(data)
    assert len(origin.requests(origin_key, method="GET")) == fetches, "another cache entry"


def test_aws_cli_lists_a_prefix_with_a_percent_sign(origin: S3Emulator, aws: AwsCli) -> None:
    """``aws s3 ls s3://bucket/pct/x%41/`` lists that prefix, not ``pct/xA/``:
    the listing's query is decoded once."""
    origin.put(f"/{BUCKET}/pct/x%41/one.bin", b"1")
    origin.put(f"/{BUCKET}/pct/xA/two.bin", b"22")
    listed = aws.run("s3", "ls", f"s3://{BUCKET}/pct/x%41/").stdout
    assert [line.split()[-1] for line in listed.splitlines()] == ["one.bin"], listed


def test_aws_cli_lists_a_prefix_page_by_page(origin: S3Emulator, aws: AwsCli) -> None:
    """``aws s3 ls --page-size 10`` of 25 keys: three ListObjectsV2 pages
    forwarded upstream, continuation tokens and all; ``aws s3 ls`` lists the bucket."""
    sizes = {f"obj-{i:02d}.bin": 100 + i for i in range(25)}
    for name, size in sizes.items():
        origin.put(f"/{BUCKET}/listing/{name}", bytes(size))
    origin.put(f"/{BUCKET}/listing-not/other.bin", b"x")  # same stem, another prefix

    out = aws.run("s3", "ls", f"s3://{BUCKET}/listing/", "--page-size", "10").stdout
    listed = {}
    for line in out.splitlines():
        _date, _time, size_text, name = line.split()
        listed[name] = int(size_text)
    assert listed == sizes

    pages = [r for r in origin.requests() if r.path.rstrip("/") == f"/{BUCKET}"]
    assert len(pages) == 3, [r.query for r in pages]
    assert sum("continuation-token=" in r.query for r in pages) == 2

    buckets = aws.run("s3", "ls").stdout
    assert [line.split()[-1] for line in buckets.splitlines()] == [BUCKET]


def test_endpoint_from_the_environment(
    origin: S3Emulator, s3_daemon: DaemonThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_ENDPOINT_URL_S3 alone, no endpoint argument, signed with dummy keys.

    Through botocore (what the AWS CLI is built on) rather than /usr/bin/aws:
    Debian 12's CLI (2.9.19) predates AWS_ENDPOINT_URL_S3 (CLI 2.13), ignores
    it and would send the request to AWS itself."""
    _put(origin, PYNWB_FILE)
    key = _key_of(PYNWB_FILE)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_daemon.s3_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-2")
    client = boto3.session.Session().client("s3", config=Config(s3={"addressing_style": "path"}))
    answer = client.get_object(Bucket=BUCKET, Key=key, Range="bytes=100-199")
    assert answer["Body"].read() == PYNWB_FILE.read_bytes()[100:200]
    assert answer["ContentRange"] == f"bytes 100-199/{PYNWB_FILE.stat().st_size}"
    server = answer["ResponseMetadata"]["HTTPHeaders"]["server"]
    assert server.startswith("nwbcache/"), server
    assert origin.requests(f"/{BUCKET}/{key}", method="GET"), "not fetched from the origin"


def test_aws_cli_cannot_write(origin: S3Emulator, aws: AwsCli, tmp_path: Path) -> None:
    """Uploads and deletes are AccessDenied by the endpoint; none reaches the origin."""
    _put(origin, PYNWB_FILE)
    local = tmp_path / "upload.bin"
    local.write_bytes(b"not for the cache" * 100)

    upload = aws.run("s3", "cp", str(local), f"s3://{BUCKET}/new", check=False)
    assert upload.returncode != 0
    assert "AccessDenied" in upload.stderr, upload.stderr

    delete = aws.run(
        "s3api", "delete-object", "--bucket", BUCKET, "--key", _key_of(PYNWB_FILE), check=False
    )
    assert delete.returncode != 0
    assert "AccessDenied" in delete.stderr, delete.stderr

    assert [r for r in origin.log if r.method not in ("GET", "HEAD")] == []
    assert origin.requests(f"/{BUCKET}/new") == []


def test_aws_cli_unknown_bucket(origin: S3Emulator, aws: AwsCli, tmp_path: Path) -> None:
    """A bucket not given with --s3-bucket is NoSuchBucket, and nothing is asked upstream."""
    origin.put("/other/k", b"an object of a bucket the endpoint does not serve")

    head = aws.run("s3api", "head-object", "--bucket", "other", "--key", "k", check=False)
    assert head.returncode != 0
    assert "404" in head.stderr, head.stderr

    get = aws.run(
        "s3api", "get-object", "--bucket", "other", "--key", "k", str(tmp_path / "k"), check=False
    )
    assert get.returncode != 0
    assert "NoSuchBucket" in get.stderr, get.stderr
    assert not (tmp_path / "k").exists()

    listing = aws.run("s3", "ls", "s3://other/", check=False)
    assert listing.returncode != 0
    assert "NoSuchBucket" in listing.stderr, listing.stderr

    assert origin.log == []


# -- HDF5's ros3 driver ----------------------------------------------------


def _ros3(
    python: Path, *, h5py_urls: list[str], nwb_urls: list[str], env: Mapping[str, str]
) -> dict[str, Any]:
    """tests/support/ros3.py in a ros3 venv: digests and PyNWB summaries of the URLs."""
    request = json.dumps({"h5py": h5py_urls, "nwb": nwb_urls})
    done = subprocess.run(
        [_program(python), "-W", "ignore", str(ROS3_SCRIPT), request],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
    )
    assert done.returncode == 0, f"{python} failed:\n{done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _local_digests(path: Path) -> dict[str, str]:
    with h5py.File(path, "r") as f:
        return content_digests(f)


def _local_summary(path: Path) -> dict[str, Any]:
    with NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
        return nwb_summary(io.read())


def _assert_same_digests(got: dict[str, str], path: Path, how: str) -> None:
    want = _local_digests(path)
    assert len(want) > 20, f"{path.name}: too little to compare"
    assert sorted(got) == sorted(want), f"{how}: other objects than in {path.name}"
    differing = [name for name in want if got[name] != want[name]]
    assert differing == [], f"{how}: values differ from {path.name}"


def test_ros3_hdf5_110_reads_both_url_forms(origin: S3Emulator, s3_daemon: DaemonThread) -> None:
    """HDF5 1.10's ros3 (any http(s) URL) through the proxied URL and the S3
    endpoint's path-style URL: every dataset and attribute as in the local
    file, PyNWB's reading as the local one's; both forms share one cache
    entry, so no byte is fetched twice."""
    _put(origin, PYNWB_FILE, MATNWB_FILE)
    urls = {
        path: (
            proxied(s3_daemon.url, origin, f"/{BUCKET}/{_key_of(path)}"),
            f"{s3_daemon.s3_url}/{BUCKET}/{_key_of(path)}",
        )
        for path in (PYNWB_FILE, MATNWB_FILE)
    }
    h5py_urls = [url for pair in urls.values() for url in pair]
    nwb_urls = list(urls[PYNWB_FILE])
    result = _ros3(ROS3_HDF5_110, h5py_urls=h5py_urls, nwb_urls=nwb_urls, env={})

    for path, pair in urls.items():
        for url in pair:
            _assert_same_digests(result["h5py"][url], path, f"ros3 (HDF5 1.10) {url}")
    want = _local_summary(PYNWB_FILE)
    assert want["acquisition"], "the file's acquisition data is part of the comparison"
    for url in nwb_urls:
        assert result["nwb"][url] == want, url
    for path in urls:
        assert 0 < _fetched_once(origin, f"/{BUCKET}/{_key_of(path)}") <= path.stat().st_size


def _ros3_s3_env(endpoint: str) -> dict[str, str]:
    """HDF5 2.x's ros3 on the S3 endpoint: anonymous (no credentials anywhere)."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "HDF5_ROS3_VFD_FORCE_PATH_STYLE": "1",
        "AWS_REGION": "us-east-2",
    }


def test_ros3_hdf5_2_reads_s3_urls(origin: S3Emulator, s3_daemon: DaemonThread) -> None:
    """HDF5 2.x's ros3 with s3://bucket/key and AWS_ENDPOINT_URL_S3: h5py and
    PyNWB read as from the local file, and the object, opened three times, is
    fetched from the origin once."""
    _put(origin, PYNWB_FILE, MATNWB_FILE)
    url = {path: f"s3://{BUCKET}/{_key_of(path)}" for path in (PYNWB_FILE, MATNWB_FILE)}
    result = _ros3(
        ROS3_HDF5_2,
        h5py_urls=list(url.values()),
        nwb_urls=[url[PYNWB_FILE]],
        env=_ros3_s3_env(s3_daemon.s3_url),
    )
    for path, path_url in url.items():
        _assert_same_digests(result["h5py"][path_url], path, f"ros3 (HDF5 2) {path_url}")
    assert result["nwb"][url[PYNWB_FILE]] == _local_summary(PYNWB_FILE)
    for path in url:
        assert 0 < _fetched_once(origin, f"/{BUCKET}/{_key_of(path)}") <= path.stat().st_size

    # A second interpreter reads it again: all from the cache.
    before = len(origin.requests(f"/{BUCKET}/{_key_of(PYNWB_FILE)}", method="GET"))
    again = _ros3(
        ROS3_HDF5_2, h5py_urls=[url[PYNWB_FILE]], nwb_urls=[], env=_ros3_s3_env(s3_daemon.s3_url)
    )
    _assert_same_digests(again["h5py"][url[PYNWB_FILE]], PYNWB_FILE, "ros3 (HDF5 2), warm")
    origin.wait_idle()
    assert len(origin.requests(f"/{BUCKET}/{_key_of(PYNWB_FILE)}", method="GET")) == before


# -- every client, one object ----------------------------------------------


@pytest.fixture
def s3_process(origin: S3Emulator, spawn: Spawn, tmp_path: Path) -> DaemonProcess:
    daemon = spawn(
        tmp_path / "cache",
        "--block-size",
        str(BLOCK),
        "--s3-listen",
        "127.0.0.1:0",
        "--s3-bucket",
        _bucket_flag(origin),
    )
    assert daemon.s3_url, "the daemon did not report its S3 endpoint"
    return daemon


def _boto3(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-2",
        config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
    )


def test_one_object_through_every_client_is_fetched_once(
    origin: S3Emulator, s3_process: DaemonProcess
) -> None:
    """The issue's check: one object read through boto3, s3fs, ros3 and
    remfile is fetched upstream once and is equal everywhere."""
    path = MATNWB_FILE
    key = _key_of(path)
    origin_key = f"/{BUCKET}/{key}"
    _put(origin, path)
    data = path.read_bytes()

    # boto3 first: the whole object, every block of it fetched.
    body = _boto3(s3_process.s3_url).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == data
    assert _fetched_once(origin, origin_key) == len(data)
    asked = len(origin.requests(origin_key))

    fs = s3fs.S3FileSystem(anon=True, endpoint_url=s3_process.s3_url, skip_instance_cache=True)
    assert fs.cat_file(f"{BUCKET}/{key}") == data
    assert fs.info(f"{BUCKET}/{key}")["size"] == len(data)
    with fs.open(f"{BUCKET}/{key}", "rb") as fh, h5py.File(fh, "r") as f:
        _assert_same_digests(content_digests(f), path, "h5py over s3fs")

    ros3 = _ros3(
        ROS3_HDF5_2,
        h5py_urls=[f"s3://{BUCKET}/{key}"],
        nwb_urls=[],
        env=_ros3_s3_env(s3_process.s3_url),
    )
    _assert_same_digests(ros3["h5py"][f"s3://{BUCKET}/{key}"], path, "ros3 (HDF5 2)")

    url = proxied(s3_process.url, origin, origin_key)
    assert remfile.File(url).read(len(data)) == data
    with h5py.File(remfile.File(url), "r") as f:
        _assert_same_digests(content_digests(f), path, "h5py over remfile")

    assert _fetched_once(origin, origin_key) == len(data)
    assert len(origin.requests(origin_key)) == asked, "asked upstream again"
    assert s3_process.terminate() == 0


def test_workers_share_the_s3_endpoint(origin: S3Emulator, spawn: Spawn, tmp_path: Path) -> None:
    """--workers 2: boto3 GETs on fresh connections, which the kernel spreads
    over both workers, are byte-exact: one after the other (each worker reads
    what the other cached, and fetches each byte once) and all at once."""
    path = MATNWB_FILE
    key = _key_of(path)
    _put(origin, path, PYNWB_FILE)
    data = path.read_bytes()
    daemon = spawn(
        tmp_path / "cache",
        "--workers",
        "2",
        "--block-size",
        str(BLOCK),
        "--s3-listen",
        "127.0.0.1:0",
        "--s3-bucket",
        _bucket_flag(origin),
    )
    # Each worker prints the ready lines, at once: one write each, never mixed.
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", daemon.s3_url), (
        f"garbled S3 ready line from the workers: {daemon.s3_url!r}"
    )
    pids = set()
    for _ in range(50):  # fresh connections until both workers answered
        with requests.Session() as session:
            pids.add(session.get(daemon.url + "/healthz", timeout=TIMEOUT).json()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, "every connection went to one worker: the test tests one"

    # Pieces first (each fetches only its blocks), then the whole object.
    ranges = [(7, 7), (50_000, 60_000), (1000, 30_000), (120_000, 130_000), (0, len(data) - 1)]
    for n, (first, last) in enumerate(ranges * 2):
        client = _boto3(daemon.s3_url)  # its own connection pool: a new connection
        answer = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={first}-{last}")
        assert answer["Body"].read() == data[first : last + 1], (n, first, last)
        client.close()
    assert _fetched_once(origin, f"/{BUCKET}/{key}") == len(data)

    other = PYNWB_FILE.read_bytes()
    start = threading.Barrier(8)

    def read_all(_n: int) -> bytes:
        client = _boto3(daemon.s3_url)
        start.wait()
        body: bytes = client.get_object(Bucket=BUCKET, Key=_key_of(PYNWB_FILE))["Body"].read()
        client.close()
        return body

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(read_all, range(8)))
    assert all(body == other for body in bodies)
    fetched = _fetched_once(origin, f"/{BUCKET}/{_key_of(PYNWB_FILE)}")
    assert fetched == len(other)
    assert daemon.terminate() == 0


# -- s3fs + h5py + PyNWB on every real file ---------------------------------


def test_s3fs_h5py_and_pynwb_read_every_real_file_through_the_cache(
    origin: S3Emulator, s3_daemon: DaemonThread
) -> None:
    """Every file of ../shared/data/nwb through s3fs on the S3 endpoint: h5py
    sees the local file's content, PyNWB (for the files it reads) the same
    NWB file, and every byte the origin sent went to the daemon."""
    files = sorted(SHARED_NWB.glob("*.nwb"))
    assert len(files) >= 5
    _put(origin, *files)
    fs = s3fs.S3FileSystem(anon=True, endpoint_url=s3_daemon.s3_url, skip_instance_cache=True)
    for path in files:
        with h5py.File(path, "r") as local:
            want = content_digests(local)
        with fs.open(f"{BUCKET}/{_key_of(path)}", "rb") as fobj, h5py.File(fobj, "r") as f:
            assert content_digests(f) == want, path.name
        if path.name.startswith("pynwb-"):
            with NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
                local_nwb = nwb_summary(io.read())
            with (
                fs.open(f"{BUCKET}/{_key_of(path)}", "rb") as fobj,
                h5py.File(fobj, "r") as f,
                NWBHDF5IO(file=f, load_namespaces=True) as io,
            ):
                assert nwb_summary(io.read()) == local_nwb, path.name
    origin.wait_idle()
    assert origin.log
    assert {(e.user_agent or "").split("/")[0] for e in origin.log} == {"nwbcache"}
    for path in files:
        assert _fetched_once(origin, f"/{BUCKET}/{_key_of(path)}") == path.stat().st_size
