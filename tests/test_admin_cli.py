"""``nwbcache pin / unpin / evict / ls`` (admincli.py) against a daemon and a fake DANDI
API: Dandiset targets listed with dandi's own client, asset paths in the listing, the
token from the environment or a file, and clear errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nwbcache.admincli import DandiSet, parse_dandi_target, parse_duration
from nwbcache.cli import main
from tests.support.client_support import DANDISET, NWB_FILES, Archive, asset_path
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host
from tests.support.s3emu import S3Emulator

TOKEN = "cli-admin-token-0123456789abcdef"


def nwbcache(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * 86400),
     ("600", 600), (" 1.5h ", 5400)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0d", "-1h", "3y", "d", "1 day"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="positive number"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("000006", DandiSet("000006", "draft", None)),
        ("DANDI:000006", DandiSet("000006", "draft", None)),
        ("000006@0.220126.1852", DandiSet("000006", "0.220126.1852", None)),
        ("000006/sub-anm3*/*.nwb", DandiSet("000006", "draft", "sub-anm3*/*.nwb")),
        ("000006@draft/sub-01/a.nwb", DandiSet("000006", "draft", "sub-01/a.nwb")),
        ("00006", None),
        ("s3://dandiarchive/blobs/abc", None),
        ("https://dandiarchive.s3.amazonaws.com/blobs/abc", None),
    ],
)
def test_parse_dandi_target(text: str, target: DandiSet | None) -> None:
    assert parse_dandi_target(text) == target


def test_pin_ls_evict_a_dandiset_by_its_asset_paths(
    archive: Archive,
    make_daemon: Callable[..., DaemonThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = make_daemon()
    api = ["--proxy", daemon.url, "--dandi-api-url", archive.api_url]
    code, out, err = nwbcache(capsys, "pin", f"{DANDISET}@draft", "--ttl", "7d", *api)
    assert code == 0, err
    for path in NWB_FILES:
        assert f"pinned: {asset_path(path)} (" in out
    pins = requests.get(f"{daemon.url}/admin/pins", timeout=10).json()
    assert sorted(p["key"] for p in pins["pins"]) == sorted(archive.blob_url(p) for p in NWB_FILES)
    assert pins["pinned_bytes"] == sum(p.stat().st_size for p in NWB_FILES)
    # Read one file whole; ls names it by its asset path.
    first = NWB_FILES[0]
    proxied = f"{daemon.url}/http/{archive.blob_url(first).removeprefix('http://')}"
    assert requests.get(proxied, timeout=60).content == first.read_bytes()
    code, out, err = nwbcache(capsys, "ls", DANDISET, *api)
    assert code == 0, err
    [row] = [line for line in out.splitlines() if asset_path(first) in line]
    assert " yes " in row
    code, out, _ = nwbcache(capsys, "ls", DANDISET, "--json", *api)
    listed = {o["label"]: o for o in json.loads(out)["objects"]}
    # Pinning asked upstream for each file's size: its first block came along.
    assert set(listed) == {asset_path(p) for p in NWB_FILES}
    whole = listed[asset_path(first)]
    assert (whole["size"], whole["pinned"]) == (first.stat().st_size, True)
    assert whole["blocks"] == -(-first.stat().st_size // daemon.settings.block_size)
    # Pinned: evict skips it, unless --unpin.
    glob = f"{DANDISET}/{asset_path(first)}"
    code, out, _ = nwbcache(capsys, "evict", glob, *api)
    assert code == 0 and "evicted 0 objects" in out and "skipped (pinned" in out
    code, out, _ = nwbcache(capsys, "evict", glob, "--unpin", *api)
    assert code == 0 and "evicted 1 objects" in out
    offline = {"Cache-Control": "only-if-cached"}
    assert requests.get(proxied, headers=offline, timeout=10).status_code != 200
    left = requests.get(f"{daemon.url}/admin/pins", timeout=10).json()["pins"]
    assert len(left) == len(NWB_FILES) - 1
    code, out, _ = nwbcache(capsys, "unpin", DANDISET, *api)
    assert code == 0 and out.count("unpinned: ") == len(NWB_FILES) - 1
    assert "was not pinned: " in out


def test_urls_and_prefixes_and_the_token(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for n in range(3):
        origin.put(f"/lab/run{n}.nwb", os.urandom(5000 + n))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    daemon = make_daemon(admin_token_file=token_file)
    url0 = f"http://{origin_host(origin)}/lab/run0.nwb"
    code, _, err = nwbcache(capsys, "pin", url0, "--proxy", daemon.url)
    assert code == 1 and "401" in err and "needs a token" in err
    monkeypatch.setenv("NWBCACHE_ADMIN_TOKEN", "wrong-token-0123456789")
    code, _, err = nwbcache(capsys, "ls", "--proxy", daemon.url)
    assert code == 1 and "the admin token is wrong" in err
    monkeypatch.delenv("NWBCACHE_ADMIN_TOKEN")
    monkeypatch.setenv("NWBCACHE_ADMIN_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("NWBCACHE_URL", daemon.url)
    # A proxied URL names the same object as its upstream URL.
    proxied = f"{daemon.url}/http/{origin_host(origin)}/lab/run0.nwb"
    code, out, err = nwbcache(capsys, "pin", proxied)
    assert code == 0 and "(4.9 KiB)" in out, err
    for n in range(3):
        requests.get(f"{daemon.url}/http/{origin_host(origin)}/lab/run{n}.nwb", timeout=10)
    code, out, _ = nwbcache(capsys, "ls", "--prefix", f"http://{origin_host(origin)}/lab/run")
    assert code == 0 and "3 objects" in out
    code, out, _ = nwbcache(capsys, "evict", "--prefix", f"http://{origin_host(origin)}/lab/")
    assert code == 0 and "evicted 2 objects" in out
    code, out, _ = nwbcache(capsys, "ls", "--json")
    assert [o["url"] for o in json.loads(out)["objects"]] == [url0]
    # Usage errors and an unreachable daemon.
    code, _, err = nwbcache(capsys, "evict")
    assert code == 2 and "TARGETs or --prefix" in err
    code, _, err = nwbcache(capsys, "pin", "not-a-target")
    assert code == 2 and "neither a URL nor DANDISET" in err
    code, _, err = nwbcache(capsys, "ls", "--proxy", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the daemon" in err
