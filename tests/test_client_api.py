"""The client library and CLI: nwbcache.open, nwbcache.dandi_url, `nwbcache url`, `nwbcache run`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import h5py
import pytest
import requests

import nwbcache
from nwbcache import cli, routing
from nwbcache.env import ENV_FALLBACK, ENV_HOSTS, ENV_URL
from nwbcache.urls import InvalidURL
from tests.support.client_support import (
    DANDISET,
    NWB_FILES,
    PUBLISHED,
    PYNWB_FILES,
    Archive,
    asset_path,
    blob_key,
    h5_digest,
    local_digest,
    local_summary,
    require_hook,
    script_env,
)
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied
from tests.support.s3emu import S3Emulator

# h5py in this process next to in-process servers: see conftest.gc_in_main_thread_only.
pytestmark = pytest.mark.usefixtures("gc_in_main_thread_only")

Backend = Literal["remfile", "fsspec"]  # nwbcache.open's backends


def _agents(origin: S3Emulator) -> set[str]:
    return {(entry.user_agent or "").split("/")[0] for entry in origin.log}


# -- nwbcache.open ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["remfile", "fsspec"])
def test_open_reads_through_daemon(
    backend: Backend, archive: Archive, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon()
    for path in NWB_FILES:
        f = nwbcache.open(archive.blob_url(path), backend=backend, proxy=daemon.url)
        with h5py.File(f, "r") as h5:
            assert h5_digest(h5) == local_digest(path), path.name
    assert _agents(archive.origin) == {"nwbcache"}


@pytest.mark.parametrize("backend", ["remfile", "fsspec"])
def test_open_offline_reads_only_what_the_daemon_holds(
    backend: Backend,
    archive: Archive,
    make_daemon: Callable[..., DaemonThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = make_daemon()
    path = NWB_FILES[0]
    url = archive.blob_url(path)
    with pytest.raises(nwbcache.NotCached):
        nwbcache.open(url, backend=backend, proxy=daemon.url, offline=True)
    archive.origin.wait_idle()
    assert archive.origin.log == []  # cold, offline: upstream was not asked at all
    warm = requests.get(nwbcache.proxied_url(url, daemon.url), timeout=60)
    assert warm.content == path.read_bytes()
    archive.origin.wait_idle()
    archive.origin.clear_log()
    monkeypatch.setenv("NWBCACHE_OFFLINE", "1")
    f = nwbcache.open(url, backend=backend, proxy=daemon.url)
    with h5py.File(f, "r") as h5:
        assert h5_digest(h5) == local_digest(path)
    archive.origin.wait_idle()
    assert archive.origin.log == []


def test_open_feeds_pynwb_with_proxy_from_env(
    archive: Archive, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynwb import NWBHDF5IO

    daemon = make_daemon()
    monkeypatch.setenv(ENV_URL, daemon.url)
    path = PYNWB_FILES[-1]
    with (
        h5py.File(nwbcache.open(archive.blob_url(path), backend="fsspec"), "r") as f,
        NWBHDF5IO(file=f, load_namespaces=True) as io,
    ):
        nwbfile = io.read()
        got = [nwbfile.identifier, nwbfile.session_description, sorted(nwbfile.acquisition)]
    assert got == local_summary(path)
    assert _agents(archive.origin) == {"nwbcache"}


def test_open_without_proxy_reads_upstream_with_a_warning(archive: Archive) -> None:
    path = NWB_FILES[0]
    with pytest.warns(RuntimeWarning, match="NWBCACHE_URL is unset"):
        f = nwbcache.open(archive.blob_url(path))
    with h5py.File(f, "r") as h5:
        assert h5_digest(h5) == local_digest(path)
    assert _agents(archive.origin) == {"remfile"}


def test_open_with_daemon_down_falls_back_once(archive: Archive, dead_daemon_url: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs: list[tuple[Path, Backend]] = [(NWB_FILES[0], "remfile"), (NWB_FILES[1], "fsspec")]
        for path, backend in pairs:
            f = nwbcache.open(archive.blob_url(path), backend=backend, proxy=dead_daemon_url)
            with h5py.File(f, "r") as h5:
                assert h5_digest(h5) == local_digest(path)
    fallbacks = [w for w in caught if issubclass(w.category, nwbcache.FallbackWarning)]
    assert len(fallbacks) == 1
    assert dead_daemon_url in str(fallbacks[0].message)
    assert _agents(archive.origin) == {"remfile", "Python"}


def test_open_with_daemon_down_and_fallback_off_raises(
    archive: Archive, dead_daemon_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_FALLBACK, "0")
    for backend in ("remfile", "fsspec"):
        with pytest.raises(nwbcache.DaemonUnavailable, match="NWBCACHE_FALLBACK=0"):
            nwbcache.open(archive.blob_url(NWB_FILES[0]), backend=backend, proxy=dead_daemon_url)
    assert not archive.origin.log


def test_offline_never_falls_back_to_upstream(
    archive: Archive, dead_daemon_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = archive.blob_url(NWB_FILES[0])
    for backend in ("remfile", "fsspec"):
        with pytest.raises(nwbcache.DaemonUnavailable, match="offline"):
            nwbcache.open(url, backend=backend, proxy=dead_daemon_url, offline=True)
    monkeypatch.setenv("NWBCACHE_OFFLINE", "1")  # transparent mode routes with this
    with pytest.raises(nwbcache.DaemonUnavailable, match="NWBCACHE_OFFLINE=1"):
        routing.route(url, dead_daemon_url)
    assert not archive.origin.log


def test_open_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="backend must be one of remfile, fsspec"):
        nwbcache.open("https://dandiarchive.s3.amazonaws.com/k", backend="ros3")  # type: ignore[arg-type]
    with pytest.raises(InvalidURL):
        nwbcache.open("ftp://host/k", proxy="http://127.0.0.1:9")


# -- nwbcache.dandi_url ------------------------------------------------------------------


def test_dandi_url_finds_the_asset_and_proxies_it(
    archive: Archive, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon()
    path = PYNWB_FILES[0]
    want = proxied(daemon.url, archive.origin, blob_key(path))
    for version in ("draft", PUBLISHED):
        got = nwbcache.dandi_url(
            DANDISET, asset_path(path), version, api_url=archive.api_url, proxy=daemon.url
        )
        assert got == want
    # The URL serves the asset's bytes through the daemon.
    with h5py.File(nwbcache.open(want, proxy=daemon.url), "r") as h5:
        assert h5_digest(h5) == local_digest(path)


def test_dandi_url_needs_a_proxy_before_asking_the_api(archive: Archive) -> None:
    with pytest.raises(InvalidURL, match="no proxy given"):
        nwbcache.dandi_url(DANDISET, asset_path(NWB_FILES[0]), api_url=archive.api_url)
    assert not archive.api.log


# -- the CLI -------------------------------------------------------------------------------


def test_cli_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["url", "s3://dandiarchive/blobs/a/b/c", "--proxy", "http://h:1"]) == 0
    assert capsys.readouterr().out == "http://h:1/https/dandiarchive.s3.amazonaws.com/blobs/a/b/c\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["url", "s3://dandiarchive/blobs/a/b/c"])  # no proxy anywhere
    assert exit_info.value.code == 2
    assert "no proxy given" in capsys.readouterr().err


def test_cli_url_dandi(
    archive: Archive, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:8080")
    path = NWB_FILES[0]
    argv = ["url", "--dandi", DANDISET, asset_path(path), "--api-url", archive.api_url]
    assert cli.main([*argv, "--version", PUBLISHED]) == 0
    assert capsys.readouterr().out.strip() == proxied(
        "http://127.0.0.1:8080", archive.origin, blob_key(path)
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["url", "--dandi", DANDISET, "sub-01/missing.nwb", "--api-url", archive.api_url])
    assert exit_info.value.code == 1
    assert "NotFoundError" in capsys.readouterr().err


def _nwbcache(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nwbcache.cli", *args],
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_cli_run_sets_the_proxy_or_refuses() -> None:
    show = [sys.executable, "-c", "import os; print(os.environ['NWBCACHE_URL'])"]
    done = _nwbcache("run", "--proxy", "127.0.0.1:8080/", "--", *show)
    assert (done.returncode, done.stdout) == (0, "http://127.0.0.1:8080\n")
    done = _nwbcache("run", "--", *show, **{ENV_URL: "http://h:2"})
    assert (done.returncode, done.stdout) == (0, "http://h:2\n")
    done = _nwbcache("run", "--", sys.executable, "-c", "raise SystemExit(7)", **{ENV_URL: "h:2"})
    assert done.returncode == 7
    done = _nwbcache("run", "--", *show)
    assert done.returncode == 2 and "pass --proxy URL or set NWBCACHE_URL" in done.stderr
    done = _nwbcache("run", "--proxy", "http://h:1")
    assert done.returncode == 2 and "no command" in done.stderr


@pytest.mark.slow
def test_cli_run_puts_unmodified_code_through_the_cache(
    archive: Archive, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    require_hook()
    daemon = make_daemon()
    path = NWB_FILES[0]
    script = tmp_path / "analysis.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, h5py, remfile
            with h5py.File(remfile.File({archive.blob_url(path)!r}), "r") as f:
                print(json.dumps(sorted(f)))
            """
        )
    )
    done = _nwbcache(
        "run",
        "--proxy",
        daemon.url,
        "--",
        sys.executable,
        str(script),
        **{ENV_HOSTS: origin_host(archive.origin)},
    )
    assert done.returncode == 0, done.stderr
    with h5py.File(path, "r") as f:
        assert json.loads(done.stdout) == sorted(f)
    assert _agents(archive.origin) == {"nwbcache"}


# -- light imports ---------------------------------------------------------------------------

HEAVY = ("aiohttp", "yarl", "requests", "fsspec", "remfile", "h5py", "dandi", "pynwb", "numpy")


@pytest.mark.parametrize(
    "module",
    [
        "nwbcache",
        "nwbcache.cli",
        "nwbcache.dandi_assets",
        "nwbcache.env",
        "nwbcache.importhook",
        "nwbcache.patches",
        "nwbcache.reading",
        "nwbcache.routing",
        "nwbcache.transparent",
        "nwbcache.urls",
    ],
)
@pytest.mark.slow
def test_every_client_module_stays_light(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "import nwbcache\n"
        "api = nwbcache.open, nwbcache.dandi_url, nwbcache.proxied_url, nwbcache.FallbackWarning\n"
        f"print(sorted({{m.partition('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=script_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"
