"""Transparent mode: the DANDI tutorial's code, unmodified, reads through the daemon.

Each script runs in a fresh interpreter of this environment, where the
package's ``nwbcache-transparent.pth`` is installed, with only NWBCACHE_URL,
NWBCACHE_HOSTS (the emulator is not a DANDI host) and dandi's offline
settings added to the environment. The emulator's log then tells who asked
for each byte: the daemon says ``User-Agent: nwbcache/...``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nwbcache import routing
from nwbcache.env import ENV_FALLBACK, ENV_HOSTS, ENV_URL
from tests.support.client_support import (
    DANDISET,
    DIGEST_SRC,
    NWB_FILES,
    PYNWB_FILES,
    Archive,
    asset_path,
    local_digest,
    local_summary,
    require_hook,
    script_env,
)
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, wait_until
from tests.support.s3emu import S3Emulator

# h5py and remfile in this process next to in-process servers (a few tests):
# see conftest.gc_in_main_thread_only.
pytestmark = pytest.mark.usefixtures("gc_in_main_thread_only")

# -- the tutorial ----------------------------------------------------------------
# The streaming tutorial of the DANDI/PyNWB docs, as users copy it. The only
# change: api_url, since the archive is a fake one on this machine.

FIND_ASSET = """
from dandi.dandiapi import DandiAPIClient

with DandiAPIClient(api_url=api_url) as client:
    asset = client.get_dandiset(dandiset_id, "draft").get_asset_by_path(filepath)
    s3_url = asset.get_content_url(follow_redirects=1, strip_query=True)
"""

SNIPPETS = {
    # remfile + h5py + PyNWB
    "remfile": """
import h5py
from pynwb import NWBHDF5IO
import remfile

rem_file = remfile.File(s3_url)

with h5py.File(rem_file, "r") as h5py_file:
    with NWBHDF5IO(file=h5py_file, load_namespaces=True) as io:
        nwbfile = io.read()
""",
    # fsspec + h5py (+ PyNWB)
    "fsspec": """
import fsspec
import pynwb
import h5py

fs = fsspec.filesystem("http")

with fs.open(s3_url, "rb") as f:
    with h5py.File(f) as file:
        with pynwb.NWBHDF5IO(file=file) as io:
            nwbfile = io.read()
""",
    # fsspec with a local cache on disk
    "cached": """
import fsspec
import pynwb
import h5py
from fsspec.implementations.cached import CachingFileSystem

fs = CachingFileSystem(
    fs=fsspec.filesystem("http"),
    cache_storage="nwb-cache",  # Local folder for the cache
)

with fs.open(s3_url, "rb") as f:
    with h5py.File(f) as file:
        with pynwb.NWBHDF5IO(file=file) as io:
            nwbfile = io.read()
""",
}

# How each snippet's data is read again for the byte-exact check: with the
# objects the snippet made (its `fs`), or the library it used.
REOPEN = {
    "remfile": "h5py.File(remfile.File(s3_url), 'r')",
    "fsspec": "h5py.File(ns['fs'].open(s3_url, 'rb'), 'r')",
    "cached": "h5py.File(ns['fs'].open(s3_url, 'rb'), 'r')",
    # Other ways into fsspec's HTTP filesystem (no PyNWB step).
    "fsspec.open": "h5py.File(fsspec.open(s3_url, 'rb').open(), 'r')",
    "filecache": (
        "h5py.File(fsspec.filesystem('filecache', target_protocol='http',"
        " cache_storage='fc').open(s3_url, 'rb'), 'r')"
    ),
    "blockcache": (
        "h5py.File(fsspec.filesystem('blockcache', target_protocol='http',"
        " cache_storage='bc').open(s3_url, 'rb'), 'r')"
    ),
}

# The harness: per file, find the asset and run the snippet verbatim (exec),
# then print what PyNWB read and a digest of every byte h5py can read.
HARNESS = """
import json
import sys
import traceback

import fsspec
import remfile

api_url, dandiset_id = sys.argv[1], sys.argv[2]
for job in sys.argv[3:]:
    name, filepath = job.split("=", 1)
    ns = {"api_url": api_url, "dandiset_id": dandiset_id, "filepath": filepath}
    out = {"snippet": name, "file": filepath}
    try:
        exec(FIND_ASSET, ns)
        s3_url = ns["s3_url"]
        if name in SNIPPETS:
            exec(SNIPPETS[name], ns)
            nwbfile = ns["nwbfile"]
            out["pynwb"] = [
                nwbfile.identifier, nwbfile.session_description, sorted(nwbfile.acquisition)
            ]
        with eval(REOPEN[name]) as f:
            out["digest"] = h5_digest(f)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    print("RESULT " + json.dumps(out), flush=True)
"""


def _harness() -> str:
    constants = f"FIND_ASSET = {FIND_ASSET!r}\nSNIPPETS = {SNIPPETS!r}\nREOPEN = {REOPEN!r}\n"
    return DIGEST_SRC + constants + HARNESS


def run_tutorial(
    tmp_path: Path, archive: Archive, jobs: list[tuple[str, Path]], **env: str
) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    require_hook()
    script = tmp_path / "tutorial.py"
    script.write_text(_harness())
    args = [f"{name}={asset_path(path)}" for name, path in jobs]
    proc = subprocess.run(
        [sys.executable, str(script), archive.api_url, DANDISET, *args],
        env=script_env(**env),
        cwd=tmp_path,  # the tutorial's relative cache_storage lands here
        capture_output=True,
        text=True,
        timeout=90,
    )
    results = [
        json.loads(line.removeprefix("RESULT "))
        for line in proc.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    return results, proc


def assert_equal_to_local(results: list[dict[str, Any]], jobs: list[tuple[str, Path]]) -> None:
    assert len(results) == len(jobs)
    for result, (name, path) in zip(results, jobs, strict=True):
        assert "error" not in result, result
        assert result["digest"] == local_digest(path), (name, path.name)
        if name in SNIPPETS:
            assert result["pynwb"] == local_summary(path), (name, path.name)


def user_agents(origin: S3Emulator) -> set[str]:
    return {entry.user_agent or "" for entry in origin.log}


def _jobs(name: str) -> list[tuple[str, Path]]:
    # PyNWB steps need PyNWB-readable files; the others read every file.
    files = PYNWB_FILES if name in SNIPPETS else NWB_FILES
    return [(name, path) for path in files]


@pytest.mark.parametrize("snippet", sorted(SNIPPETS))
@pytest.mark.slow
def test_tutorial_reads_through_daemon(
    snippet: str,
    archive: Archive,
    make_daemon: Callable[..., DaemonThread],
    tmp_path: Path,
) -> None:
    daemon = make_daemon()
    jobs = _jobs(snippet)
    if snippet == "fsspec":  # and h5py alone on the MATLAB-written files
        jobs += [("fsspec.open", p) for p in NWB_FILES if p not in PYNWB_FILES]
    results, proc = run_tutorial(
        tmp_path,
        archive,
        jobs,
        **{ENV_URL: daemon.url, ENV_HOSTS: origin_host(archive.origin)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_to_local(results, jobs)
    # Every byte came through the daemon; the script never asked the origin.
    assert archive.origin.log
    assert {ua.split("/")[0] for ua in user_agents(archive.origin)} == {"nwbcache"}
    assert "cannot be reached" not in proc.stderr


@pytest.mark.slow
def test_other_fsspec_entry_points(
    archive: Archive, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """fsspec.open() and the filecache/blockcache filesystems over http."""
    daemon = make_daemon()
    path = PYNWB_FILES[0]
    jobs = [(name, path) for name in ("fsspec.open", "filecache", "blockcache")]
    results, proc = run_tutorial(
        tmp_path,
        archive,
        jobs,
        **{ENV_URL: daemon.url, ENV_HOSTS: origin_host(archive.origin)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_to_local(results, jobs)
    assert {ua.split("/")[0] for ua in user_agents(archive.origin)} == {"nwbcache"}


@pytest.mark.slow
def test_daemon_down_reads_upstream_and_warns_once(
    archive: Archive, dead_daemon_url: str, tmp_path: Path
) -> None:
    jobs = [("remfile", PYNWB_FILES[0]), ("fsspec", PYNWB_FILES[1]), ("fsspec.open", NWB_FILES[0])]
    results, proc = run_tutorial(
        tmp_path,
        archive,
        jobs,
        **{ENV_URL: dead_daemon_url, ENV_HOSTS: origin_host(archive.origin)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_to_local(results, jobs)
    assert proc.stderr.count("cannot be reached") == 1, proc.stderr
    assert "FallbackWarning" in proc.stderr
    # Straight from the origin: remfile's and aiohttp's own User-Agents.
    agents = {ua.split("/")[0] for ua in user_agents(archive.origin)}
    assert "nwbcache" not in agents
    assert {"remfile", "Python"} <= agents


@pytest.mark.slow
def test_daemon_down_with_fallback_off_fails_clearly(
    archive: Archive, dead_daemon_url: str, tmp_path: Path
) -> None:
    jobs = [("remfile", PYNWB_FILES[0]), ("fsspec", PYNWB_FILES[0]), ("filecache", NWB_FILES[0])]
    results, _ = run_tutorial(
        tmp_path,
        archive,
        jobs,
        **{
            ENV_URL: dead_daemon_url,
            ENV_HOSTS: origin_host(archive.origin),
            ENV_FALLBACK: "0",
        },
    )
    assert [r.get("error", "").split(":")[0] for r in results] == ["DaemonUnavailable"] * 3
    for result in results:
        assert dead_daemon_url in result["error"]
        assert "NWBCACHE_FALLBACK=0" in result["error"]
    assert not archive.origin.log  # nothing was read behind the cache's back


@pytest.mark.slow
def test_hosts_off_the_allow_list_are_read_directly(
    archive: Archive, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """Default NWBCACHE_HOSTS is the DANDI bucket: the emulator's URLs stay as they are."""
    daemon = make_daemon()
    jobs = [("remfile", PYNWB_FILES[0])]
    results, proc = run_tutorial(tmp_path, archive, jobs, **{ENV_URL: daemon.url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_to_local(results, jobs)
    assert {ua.split("/")[0] for ua in user_agents(archive.origin)} == {"remfile"}


# -- start-up: inert without NWBCACHE_URL, and lazy with it -----------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    before = sorted(sys.modules)
    import remfile
    patched_remfile = hasattr(remfile.File.__init__, "__nwbcache_patched__")
    import fsspec
    http_loaded_by_fsspec_import = "fsspec.implementations.http" in sys.modules
    fsspec.filesystem("http")
    from fsspec.implementations.http import HTTPFileSystem
    patched_fsspec = hasattr(HTTPFileSystem.encode_url, "__nwbcache_patched__")
    print(json.dumps([before, patched_remfile, http_loaded_by_fsspec_import, patched_fsspec]))
    """
)


def _probe(**env: str) -> tuple[list[str], bool, bool, bool]:
    require_hook()
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=script_env(**env),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    before, remfile_patched, http_early, fsspec_patched = json.loads(out)
    return before, remfile_patched, http_early, fsspec_patched


@pytest.mark.slow
def test_hook_is_inert_without_nwbcache_url() -> None:
    before, remfile_patched, _, fsspec_patched = _probe()
    assert not [m for m in before if m.startswith("nwbcache")]
    assert not remfile_patched and not fsspec_patched


@pytest.mark.slow
def test_hook_imports_only_stdlib_and_patches_on_import() -> None:
    before, remfile_patched, http_early, fsspec_patched = _probe(**{ENV_URL: "http://127.0.0.1:9"})
    ours = {m for m in before if m.startswith("nwbcache")}
    assert ours == {"nwbcache", "nwbcache.importhook", "nwbcache.transparent"}
    # Nothing but the standard library (and other .pth files' modules) besides.
    baseline, *_ = _probe()
    extra = {m.partition(".")[0] for m in set(before) - set(baseline) - ours}
    assert extra <= set(sys.stdlib_module_names), extra
    assert not {"remfile", "fsspec", "requests", "aiohttp"} & {m.partition(".")[0] for m in before}
    assert remfile_patched and fsspec_patched
    assert not http_early  # fsspec's HTTP filesystem was not imported ahead of the user


# -- the pieces, in this process ----------------------------------------------------


@pytest.fixture
def hook_settings(
    monkeypatch: pytest.MonkeyPatch, make_daemon: Callable[..., DaemonThread], origin: S3Emulator
) -> DaemonThread:
    daemon = make_daemon()
    monkeypatch.setenv(ENV_URL, daemon.url)
    monkeypatch.setenv(ENV_HOSTS, f"example.org, {origin_host(origin)}")
    return daemon


def test_rewrite_table(hook_settings: DaemonThread, origin: S3Emulator) -> None:
    from nwbcache.patches import rewrite

    host = origin_host(origin)
    daemon = hook_settings.url
    assert rewrite(f"http://{host}/b/k?x=1") == f"{daemon}/http/{host}/b/k?x=1"
    assert rewrite("https://example.org/k") == f"{daemon}/https/example.org/k"
    unchanged = [
        f"{daemon}/http/{host}/b/k",  # already proxied
        "https://dandiarchive.s3.amazonaws.com/blobs/a",  # not on NWBCACHE_HOSTS now
        f"http://{host.split(':')[0]}:1/b/k",  # same host, other port
        "s3://dandiarchive/blobs/a",  # not an HTTP URL: not remfile's or fsspec-http's
        f"http://{host}/",  # no object path: a listing, not an object
        "file:///etc/hosts",
    ]
    for url in unchanged:
        assert rewrite(url) == url, url


def test_rewrite_is_off_without_url_and_with_bad_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nwbcache.patches import rewrite

    url = "https://dandiarchive.s3.amazonaws.com/blobs/a/b/c"
    assert rewrite(url) == url  # NWBCACHE_URL unset
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:9")
    monkeypatch.setenv(ENV_HOSTS, "not a://host")
    with pytest.warns(RuntimeWarning, match="NWBCACHE_HOSTS is invalid"):
        assert rewrite(url) == url
    monkeypatch.delenv(ENV_HOSTS)
    monkeypatch.setenv(ENV_URL, "ftp://nope")
    with pytest.warns(RuntimeWarning, match="NWBCACHE_URL is invalid"):
        assert rewrite(url) == url


@pytest.fixture
def patched(hook_settings: DaemonThread) -> Iterator[DaemonThread]:
    """remfile and fsspec patched in this process, as the hook would; undone afterwards."""
    import remfile.RemFile
    from fsspec.implementations import http

    from nwbcache.patches import patch_fsspec_http, patch_remfile

    saved = [(remfile.RemFile.RemFile, "__init__")] + [
        (http.HTTPFileSystem, name)
        for name in ("encode_url", "_info", "_exists", "_put_file", "_pipe_file")
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name in saved]
    patch_remfile(remfile.RemFile)
    patch_fsspec_http(http)
    try:
        yield hook_settings
    finally:
        for cls, name, value in originals:
            setattr(cls, name, value)


def test_remfile_url_provider_is_routed_per_request(
    patched: DaemonThread, origin: S3Emulator
) -> None:
    """remfile accepts an object with get_url() (renewable presigned URLs): ask it each time."""
    import remfile

    data = bytes(range(256)) * 1000
    origin.put("/b/provided", data)

    class Provider:
        calls = 0

        def get_url(self) -> str:
            Provider.calls += 1
            return origin.url_for("/b/provided")

    f = remfile.File(Provider())
    f.seek(1000)
    assert f.read(5000) == data[1000:6000]
    assert Provider.calls >= 2  # size probe and range read
    assert {ua.split("/")[0] for ua in user_agents(origin)} == {"nwbcache"}


def test_fsspec_writes_go_upstream(patched: DaemonThread, origin: S3Emulator) -> None:
    """A PUT must reach the upstream itself, never the read-only daemon."""
    import fsspec

    fs = fsspec.filesystem("http", skip_instance_cache=True)
    url = origin.url_for("/b/written")
    assert str(fs.encode_url(url)).startswith(patched.url)  # reads are routed
    with contextlib.suppress(Exception):  # the emulator refuses writes; who asked is the point
        fs.pipe_file(url, b"data")
    # The emulator logs a request once its handler is done.
    wait_until(lambda: origin.requests(method="PUT"), 5, interval=0.01)
    puts = origin.requests(method="PUT")
    assert puts and all((p.user_agent or "").startswith("Python/") for p in puts)


# -- the import hook ------------------------------------------------------------------


def test_import_hook_runs_after_module_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from nwbcache import importhook

    (tmp_path / "nwbcache_hook_target.py").write_text("VALUE = 1\n")
    (tmp_path / "nwbcache_hook_broken.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []

    def hook(module: Any) -> None:
        seen.append(module.VALUE)
        module.PATCHED = True

    def broken(module: Any) -> None:
        raise RuntimeError("boom")

    try:
        importhook.watch({"nwbcache_hook_target": hook, "nwbcache_hook_broken": broken})
        module = importlib.import_module("nwbcache_hook_target")
        assert seen == [1] and module.PATCHED
        importlib.reload(module)  # hooks run again: they must be idempotent
        assert seen == [1, 1]
        importhook.watch({"nwbcache_hook_target": hook})  # already imported: at once
        assert seen == [1, 1, 1]
        with pytest.warns(RuntimeWarning, match="could not hook nwbcache_hook_broken"):
            assert importlib.import_module("nwbcache_hook_broken").VALUE == 2
    finally:
        for name in ("nwbcache_hook_target", "nwbcache_hook_broken"):
            sys.modules.pop(name, None)
            importhook._finder.hooks.pop(name, None)  # type: ignore[union-attr]


def test_reachability_is_checked_once(dead_daemon_url: str) -> None:
    calls: list[str] = []
    real = routing._probe

    def counting(base: str) -> str:
        calls.append(base)
        return real(base)

    routing._probe = counting
    try:
        for _ in range(3):
            assert not routing.daemon_reachable(dead_daemon_url)
    finally:
        routing._probe = real
    assert calls == [dead_daemon_url]
