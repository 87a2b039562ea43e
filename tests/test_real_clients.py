"""Real readers through the daemon: h5py over remfile and fsspec, PyNWB, curl.

Files are the real NWB files of ../shared/data/nwb (written by PyNWB and by
MATLAB's HDF5 library); every dataset and attribute read through the daemon
must equal the direct read of the local file.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import h5py
import numpy as np
import pytest
import remfile
import requests

from tests.support.daemons import DaemonThread
from tests.support.helpers import SHARED_NWB, proxied
from tests.support.s3emu import S3Emulator

NWB_FILES = sorted(SHARED_NWB.glob("*.nwb"))
pytestmark = [
    pytest.mark.slow,  # every real NWB file through h5py, remfile, fsspec, PyNWB and curl
    pytest.mark.usefixtures("gc_in_main_thread_only"),
]


def test_shared_nwb_files_are_present() -> None:
    """The files are part of the test set-up; their absence is a failure, not a skip."""
    assert len(NWB_FILES) >= 8, f"expected the real NWB files in {SHARED_NWB}"


def _walk(f: h5py.File) -> Iterator[tuple[str, Any]]:
    """Every dataset's values and every object's attributes, by name, with
    object references replaced by the path they point to (a reference's
    identity differs between two opened files; its target must not)."""
    items: list[tuple[str, Any]] = []

    def visit(name: str, obj: Any) -> None:
        for attr, value in sorted(obj.attrs.items()):
            items.append((f"{name}@{attr}", _resolve(f, value)))
        if isinstance(obj, h5py.Dataset):
            items.append((name, _resolve(f, obj[()])))

    for attr, value in sorted(f.attrs.items()):
        items.append((f"/@{attr}", _resolve(f, value)))
    f.visititems(visit)
    return iter(items)


def _resolve(f: h5py.File, value: Any) -> Any:
    if isinstance(value, h5py.RegionReference):
        return ("region-ref", f[value].name if value else None)
    if isinstance(value, h5py.Reference):
        return ("ref", f[value].name if value else None)
    if isinstance(value, np.void) and value.dtype.names:
        return tuple(_resolve(f, value[name]) for name in value.dtype.names)
    if isinstance(value, np.ndarray) and (value.dtype.kind == "O" or value.dtype.names):
        return [_resolve(f, v) for v in value.flat]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, float | np.floating) and np.isnan(a):
        return isinstance(b, float | np.floating) and bool(np.isnan(b))
    return bool(a == b)


def _assert_same_contents(local: Path, remote_file: Any) -> int:
    with h5py.File(local, "r") as direct, h5py.File(remote_file, "r") as proxied_file:
        expected = list(_walk(direct))
        got = list(_walk(proxied_file))
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, want), (_, have) in zip(expected, got, strict=True):
        assert _same(want, have), name
    return len(expected)


@pytest.fixture
def nwb_served(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> tuple[S3Emulator, DaemonThread]:
    for path in NWB_FILES:
        origin.put_file(f"/dandiarchive/blobs/{path.name}", path)
    return origin, make_daemon(block_size=16 * 1024)


@pytest.mark.parametrize("path", NWB_FILES, ids=lambda p: p.name)
def test_h5py_over_remfile_equals_direct_read(
    nwb_served: tuple[S3Emulator, DaemonThread], path: Path
) -> None:
    origin, daemon = nwb_served
    url = proxied(daemon.url, origin, f"/dandiarchive/blobs/{path.name}")
    for _pass in ("cold", "warm"):
        assert _assert_same_contents(path, remfile.File(url)) > 0


@pytest.mark.parametrize("path", NWB_FILES, ids=lambda p: p.name)
def test_h5py_over_fsspec_equals_direct_read(
    nwb_served: tuple[S3Emulator, DaemonThread], path: Path
) -> None:
    origin, daemon = nwb_served
    url = proxied(daemon.url, origin, f"/dandiarchive/blobs/{path.name}")
    fs = fsspec.filesystem("http")
    with fs.open(url, "rb") as fh:
        assert _assert_same_contents(path, fh) > 0


@pytest.mark.parametrize(
    "path", [p for p in NWB_FILES if p.name.startswith("pynwb-")], ids=lambda p: p.name
)
def test_pynwb_reads_through_daemon_like_local(
    nwb_served: tuple[S3Emulator, DaemonThread], path: Path
) -> None:
    from pynwb import NWBHDF5IO

    origin, daemon = nwb_served
    url = proxied(daemon.url, origin, f"/dandiarchive/blobs/{path.name}")
    with NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
        local = io.read()
        want = (local.identifier, local.session_description, sorted(local.acquisition))
    with h5py.File(remfile.File(url), "r") as f, NWBHDF5IO(file=f, load_namespaces=True) as io:
        remote = io.read()
        assert (remote.identifier, remote.session_description, sorted(remote.acquisition)) == want


def test_every_byte_of_real_files_matches(nwb_served: tuple[S3Emulator, DaemonThread]) -> None:
    origin, daemon = nwb_served
    for path in NWB_FILES:
        url = proxied(daemon.url, origin, f"/dandiarchive/blobs/{path.name}")
        assert requests.get(url, timeout=30).content == path.read_bytes()


def test_curl_range_and_head(nwb_served: tuple[S3Emulator, DaemonThread], tmp_path: Path) -> None:
    origin, daemon = nwb_served
    path = NWB_FILES[0]
    url = proxied(daemon.url, origin, f"/dandiarchive/blobs/{path.name}")
    out = tmp_path / "part"
    subprocess.run(["curl", "-sf", "-r", "100-5099", "-o", str(out), url], check=True)
    assert out.read_bytes() == path.read_bytes()[100:5100]
    head = subprocess.run(["curl", "-sfI", url], check=True, capture_output=True, text=True).stdout
    assert f"content-length: {path.stat().st_size}" in head.lower()
    assert "accept-ranges: bytes" in head.lower()


def test_plain_get_that_hangs_up_costs_little_upstream(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """remfile learns the size with a plain GET and closes: the daemon must not
    pull the whole object upstream for it."""
    size = 64 * 1024 * 1024
    origin.put("/b/big", bytes(size))
    block, readahead = 256 * 1024, 1024 * 1024
    daemon = make_daemon(block_size=block, readahead=readahead)
    url = proxied(daemon.url, origin, "/b/big")
    with requests.get(url, stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(size)
    f = remfile.File(url)
    assert f.read(10) == bytes(10)
    time.sleep(1.0)  # let anything in flight finish and be logged
    # The fetch window of a plain GET starts at one block and doubles as the
    # client consumes; noticing a hang-up can take a block or two (the first
    # writes land in socket buffers). Two hang-ups cost a few blocks (measured
    # 3 to 6), never the 64 MiB object nor its read-ahead windows.
    assert origin.bytes_sent("/b/big") <= 8 * block
