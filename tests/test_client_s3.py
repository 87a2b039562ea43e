"""S3 clients through the daemon (nwbcache.s3client): transparent botocore routing, the
environment for SDKs, ``nwbcache env --s3`` and ``nwbcache run --s3``.

The daemon's bucket ``dandiarchive`` is the emulator's ``/dandiarchive``, so a
plain ``boto3.client("s3")`` read of ``dandiarchive`` that reaches the
emulator's log went through the daemon: nothing here can reach real S3
(requests that would are only signed into URLs, never sent).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.session
import pytest
import s3fs
import s3fs.core
from botocore import UNSIGNED
from botocore.config import Config

from nwbcache import s3client
from nwbcache.env import ENV_FALLBACK, ENV_S3_ENV, ENV_S3_URL, ENV_URL
from nwbcache.routing import DaemonUnavailable, FallbackWarning
from nwbcache.s3client import S3Endpoint, environment, find_endpoint, patch_botocore
from tests.support.client_support import require_hook, script_env
from tests.support.daemons import DaemonThread
from tests.support.helpers import REPO, origin_host
from tests.support.s3emu import S3Emulator

DATA = os.urandom(300_001)
KEY = "blobs/abc/def/0002"


@pytest.fixture
def daemon(origin: S3Emulator, make_daemon: Callable[..., DaemonThread]) -> DaemonThread:
    origin.put(f"/dandiarchive/{KEY}", DATA)
    return make_daemon(
        s3_listen="127.0.0.1:0",
        s3_bucket=(f"dandiarchive=http://{origin_host(origin)}/dandiarchive",),
    )


@pytest.fixture(autouse=True)
def _fresh_endpoints() -> Iterator[None]:
    s3client.forget()
    yield
    s3client.forget()


@pytest.fixture
def routed(daemon: DaemonThread, monkeypatch: pytest.MonkeyPatch) -> DaemonThread:
    """Transparent mode's botocore patch, with NWBCACHE_URL naming the daemon."""
    patch_botocore(botocore.session)
    monkeypatch.setenv(ENV_URL, daemon.url)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return daemon


def plain_client(**kwargs: Any) -> Any:
    """A client as a user's script makes one: no endpoint_url."""
    return boto3.session.Session().client(
        "s3", region_name="us-east-2", config=Config(signature_version=UNSIGNED), **kwargs
    )


def netloc_of(client: Any, operation: str, **params: str) -> str:
    """Where ``client`` would send ``operation``, without sending it."""
    return str(urlsplit(client.generate_presigned_url(operation, Params=params)).netloc)


def test_the_endpoint_is_found_where_the_client_reaches_the_daemon(
    daemon: DaemonThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_port = urlsplit(daemon.s3_url).port
    main_port = urlsplit(daemon.url).port
    found = find_endpoint(f"http://localhost:{main_port}")
    assert found == S3Endpoint(f"http://localhost:{s3_port}", {"dandiarchive": "us-east-1"})
    monkeypatch.setenv(ENV_S3_URL, "http://cache.lab:9999/")
    assert find_endpoint(daemon.url) == S3Endpoint(
        "http://cache.lab:9999", {"dandiarchive": "us-east-1"}
    )


def test_a_daemon_without_an_endpoint_says_so(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    assert find_endpoint(make_daemon().url) is None


@pytest.mark.parametrize(
    ("environ", "region"),
    [
        ({}, "us-east-2"),
        ({"AWS_REGION": "eu-west-1"}, "eu-west-1"),
        ({"AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),
    ],
)
def test_environment(environ: dict[str, str], region: str) -> None:
    endpoint = S3Endpoint("http://127.0.0.1:8081", {"dandiarchive": "us-east-2"})
    assert environment(endpoint, environ) == {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8081",
        "AWS_REGION": region,
        "HDF5_ROS3_VFD_FORCE_PATH_STYLE": "1",
    }
    assert environment(S3Endpoint("http://h:1", {}), {})["AWS_REGION"] == "us-east-1"


def test_boto3_reads_of_the_daemons_buckets_go_through_it(
    routed: DaemonThread, origin: S3Emulator
) -> None:
    s3 = plain_client()
    assert s3.get_object(Bucket="dandiarchive", Key=KEY)["Body"].read() == DATA
    head = s3.head_object(Bucket="dandiarchive", Key=KEY)
    assert head["ContentLength"] == len(DATA)
    listed = s3.list_objects_v2(Bucket="dandiarchive", Prefix="blobs/")
    assert [c["Key"] for c in listed["Contents"]] == [KEY]
    assert {(entry.user_agent or "").split("/")[0] for entry in origin.log} == {"nwbcache"}


def test_other_buckets_writes_and_own_endpoints_are_left_alone(routed: DaemonThread) -> None:
    s3 = plain_client()
    daemon_s3 = urlsplit(routed.s3_url).netloc
    assert netloc_of(s3, "get_object", Bucket="dandiarchive", Key=KEY) == daemon_s3
    assert netloc_of(s3, "get_object", Bucket="elsewhere", Key=KEY).endswith("amazonaws.com")
    assert netloc_of(s3, "put_object", Bucket="dandiarchive", Key=KEY).endswith("amazonaws.com")
    own = plain_client(endpoint_url="http://127.0.0.1:9")
    assert netloc_of(own, "get_object", Bucket="dandiarchive", Key=KEY) == "127.0.0.1:9"


def test_nothing_is_routed_without_nwbcache_url(
    routed: DaemonThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_URL)
    s3 = plain_client()
    assert netloc_of(s3, "get_object", Bucket="dandiarchive", Key=KEY).endswith("amazonaws.com")


def test_s3fs_reads_through_the_daemon(routed: DaemonThread, origin: S3Emulator) -> None:
    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    with fs.open(f"dandiarchive/{KEY}", block_size=64 * 1024) as f:
        f.seek(1000)
        assert f.read(5000) == DATA[1000:6000]
    assert fs.cat_file(f"dandiarchive/{KEY}") == DATA
    assert {(entry.user_agent or "").split("/")[0] for entry in origin.log} == {"nwbcache"}


def test_a_daemon_that_is_down_is_passed_over_with_a_warning(
    routed: DaemonThread, dead_daemon_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_URL, dead_daemon_url)
    s3 = plain_client()
    with pytest.warns(FallbackWarning, match="cannot be reached"):
        where = netloc_of(s3, "get_object", Bucket="dandiarchive", Key=KEY)
    assert where.endswith("amazonaws.com")
    monkeypatch.setenv(ENV_FALLBACK, "0")
    with pytest.raises(DaemonUnavailable):
        netloc_of(s3, "get_object", Bucket="dandiarchive", Key=KEY)


def test_set_environment_points_every_client_at_the_endpoint(
    daemon: DaemonThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_URL, daemon.url)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # set_environment writes it
    s3client.set_environment()
    assert os.environ["AWS_ENDPOINT_URL_S3"] == daemon.s3_url
    assert os.environ["HDF5_ROS3_VFD_FORCE_PATH_STYLE"] == "1"


def test_set_environment_with_the_daemon_down_warns_and_sets_nothing(
    dead_daemon_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_URL, dead_daemon_url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s3client.set_environment()
    assert "AWS_ENDPOINT_URL_S3" not in os.environ
    assert [w.category for w in caught] == [FallbackWarning]


# -- the command line and a fresh interpreter ---------------------------------


def nwbcache(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nwbcache.cli", *args],
        env=script_env(**environ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.slow
def test_nwbcache_env_prints_the_lines_to_export(daemon: DaemonThread) -> None:
    plain = nwbcache("env", "--proxy", daemon.url)
    assert plain.returncode == 0 and plain.stdout == f"export NWBCACHE_URL={daemon.url}\n"
    s3 = nwbcache("env", "--s3", AWS_REGION="eu-west-1", **{ENV_URL: daemon.url})
    assert s3.returncode == 0, s3.stderr
    assert s3.stdout.splitlines() == [
        f"export NWBCACHE_URL={daemon.url}",
        f"export AWS_ENDPOINT_URL_S3={daemon.s3_url}",
        "export AWS_REGION=eu-west-1",
        "export HDF5_ROS3_VFD_FORCE_PATH_STYLE=1",
    ]


@pytest.mark.slow
def test_nwbcache_env_s3_fails_clearly_without_an_endpoint(
    make_daemon: Callable[..., DaemonThread], dead_daemon_url: str
) -> None:
    none = nwbcache("env", "--s3", "--proxy", make_daemon().url)
    assert none.returncode == 1 and "no S3 endpoint" in none.stderr
    down = nwbcache("env", "--s3", "--proxy", dead_daemon_url)
    assert down.returncode == 1 and "cannot ask" in down.stderr
    assert nwbcache("env").returncode == 2


READER = textwrap.dedent(
    """
    import json, os, sys
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    s3 = boto3.client("s3", region_name="us-east-2", config=Config(signature_version=UNSIGNED))
    body = s3.get_object(Bucket="dandiarchive", Key=sys.argv[1])["Body"].read()
    print(json.dumps({"size": len(body), "sha": __import__("hashlib").sha256(body).hexdigest(),
                      "endpoint": os.environ.get("AWS_ENDPOINT_URL_S3")}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["transparent", "s3-env", "run --s3"])
def test_an_unmodified_boto3_script_reads_through_the_daemon(
    how: str, daemon: DaemonThread, origin: S3Emulator, tmp_path: Path
) -> None:
    require_hook()
    import hashlib

    script = tmp_path / "reader.py"
    script.write_text(READER)
    environ = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    if how == "run --s3":
        proc = nwbcache(
            "run", "--s3", "--proxy", daemon.url, "--", sys.executable, str(script), KEY, **environ
        )
    else:
        if how == "s3-env":
            environ[ENV_S3_ENV] = "1"
        proc = subprocess.run(
            [sys.executable, str(script), KEY],
            env=script_env(**environ, **{ENV_URL: daemon.url}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["size"] == len(DATA) and result["sha"] == hashlib.sha256(DATA).hexdigest()
    assert result["endpoint"] == (None if how == "transparent" else daemon.s3_url)
    assert origin.log and {(e.user_agent or "").split("/")[0] for e in origin.log} == {"nwbcache"}


def test_s3fs_reads_through_the_daemon_in_blocks_for_a_nearby_cache(
    routed: DaemonThread, origin: S3Emulator
) -> None:
    s3client.patch_s3fs(s3fs.core)
    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    with fs.open(f"dandiarchive/{KEY}") as f:
        assert (type(f.cache).__name__, f.blocksize) == ("BlockCache", s3client.S3FS_BLOCK_SIZE)
        f.seek(200_000)
        assert f.read(1000) == DATA[200_000:201_000]
    with fs.open(f"dandiarchive/{KEY}", block_size=1 << 20) as f:  # the user's choice
        assert (type(f.cache).__name__, f.blocksize) == ("ReadAheadCache", 1 << 20)
    with fs.open(f"dandiarchive/{KEY}", cache_type="bytes") as f:
        assert type(f.cache).__name__ == "BytesCache"
    chosen = s3fs.S3FileSystem(anon=True, skip_instance_cache=True, default_block_size=1 << 16)
    with chosen.open(f"dandiarchive/{KEY}") as f:
        assert f.blocksize == 1 << 16
    explicit = s3fs.S3FileSystem(anon=True, skip_instance_cache=True, endpoint_url=routed.s3_url)
    with explicit.open(f"dandiarchive/{KEY}") as f:  # the daemon's endpoint, given by hand
        assert f.blocksize == s3client.S3FS_BLOCK_SIZE


@pytest.mark.parametrize(
    ("path", "endpoint", "tuned"),
    [
        ("dandiarchive/k", None, True),
        ("s3://dandiarchive/k", None, True),
        ("elsewhere/k", None, False),
        ("dandiarchive/k", "http://127.0.0.1:9", False),
    ],
)
def test_only_files_read_through_the_daemon_are_tuned(
    routed: DaemonThread, path: str, endpoint: str | None, tuned: bool
) -> None:
    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True, endpoint_url=endpoint)
    options = s3client.tuned_open(fs, path, "rb", {"block_size": None})
    assert (options.get("block_size") == s3client.S3FS_BLOCK_SIZE) is tuned
    assert s3client.tuned_open(fs, path, "wb", {}) == {}
