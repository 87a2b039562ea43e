"""Shared fixtures and helpers of the client tests (test_client_*.py); no tests here.

The real NWB files of ../shared/data/nwb are served by the S3 emulator under
DANDI-like blob keys and listed by the fake DANDI API as assets of one
Dandiset, so scripts can find them the way the DANDI tutorials do.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import site
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwbcache import routing
from tests.support.dandi_fake import DANDI_OFFLINE_ENV, FakeDandiAPI
from tests.support.helpers import SHARED_NWB
from tests.support.s3emu import S3Emulator

NWB_FILES = sorted(SHARED_NWB.glob("*.nwb"))
# Current PyNWB reads the PyNWB-written files; the MatNWB ones (NWB 2.0b) only h5py.
PYNWB_FILES = [p for p in NWB_FILES if p.name.startswith("pynwb-")]
DANDISET = "000123"
PUBLISHED = "0.230101.1200"
PTH_NAME = "nwbcache-transparent.pth"

# Digest of everything h5py can read from a file: every attribute and every
# dataset's values, object references replaced by the path they point to (a
# reference's identity differs between two opened files; its target must not).
# Shared as source: the test scripts run it in their own interpreter.
DIGEST_SRC = """
import hashlib

import h5py
import numpy as np


def _plain(f, value):
    if isinstance(value, h5py.RegionReference):
        return ("region-ref", f[value].name if value else None)
    if isinstance(value, h5py.Reference):
        return ("ref", f[value].name if value else None)
    if isinstance(value, np.void) and value.dtype.names:
        return tuple(_plain(f, value[name]) for name in value.dtype.names)
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O" or value.dtype.names:
            return (value.shape, [_plain(f, v) for v in value.flat])
        data = np.ascontiguousarray(value).tobytes()
        return (value.shape, value.dtype.str, hashlib.sha256(data).hexdigest())
    return repr(value)


def h5_digest(f):
    h = hashlib.sha256()
    count = 0

    def visit(name, obj):
        nonlocal count
        for attr, value in sorted(obj.attrs.items()):
            h.update(repr((name, attr, _plain(f, value))).encode())
        if isinstance(obj, h5py.Dataset):
            h.update(repr((name, _plain(f, obj[()]))).encode())
            count += 1

    for attr, value in sorted(f.attrs.items()):
        h.update(repr(("/", attr, _plain(f, value))).encode())
    f.visititems(visit)
    return f"{count}:{h.hexdigest()}"
"""

_digest_namespace: dict[str, Any] = {}
exec(DIGEST_SRC, _digest_namespace)


def h5_digest(f: Any) -> str:
    """The digest of an open h5py.File (see DIGEST_SRC)."""
    return str(_digest_namespace["h5_digest"](f))


@functools.cache
def local_digest(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return h5_digest(f)


@functools.cache
def local_summary(path: Path) -> list[Any]:
    """What the test scripts print of a PyNWB read: identifier, description, acquisition."""
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
        nwbfile = io.read()
        return [nwbfile.identifier, nwbfile.session_description, sorted(nwbfile.acquisition)]


def asset_path(path: Path) -> str:
    return f"sub-01/{path.name}"


def blob_key(path: Path) -> str:
    """A DANDI-shaped blob key, /dandiarchive/blobs/abc/def/<uuid>."""
    blob = str(uuid.uuid5(uuid.NAMESPACE_URL, path.name))
    return f"/dandiarchive/blobs/{blob[:3]}/{blob[3:6]}/{blob}"


@dataclasses.dataclass
class Archive:
    origin: S3Emulator
    api: FakeDandiAPI

    @property
    def api_url(self) -> str:
        return self.api.api_url

    def blob_url(self, path: Path) -> str:
        return self.origin.url_for(blob_key(path))


@pytest.fixture
def dandi_api() -> Iterator[FakeDandiAPI]:
    api = FakeDandiAPI()
    api.start_in_thread()
    try:
        yield api
    finally:
        api.stop_thread()


@pytest.fixture
def archive(origin: S3Emulator, dandi_api: FakeDandiAPI) -> Archive:
    """Every real NWB file on the emulator, listed in Dandiset 000123 (draft and published)."""
    dandi_api.add_dandiset(DANDISET, versions=("draft", PUBLISHED))
    for path in NWB_FILES:
        origin.put_file(blob_key(path), path)
        for version in ("draft", PUBLISHED):
            dandi_api.add_asset(
                DANDISET,
                asset_path(path),
                origin.url_for(blob_key(path)),
                path.stat().st_size,
                version=version,
            )
    return Archive(origin, dandi_api)


@pytest.fixture(autouse=True)
def _fresh_routing() -> Iterator[None]:
    """Each test learns afresh whether its daemon is up (answers are kept per process)."""
    routing.forget()
    yield
    routing.forget()


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own NWBCACHE_* settings must not leak into the tests."""
    for name in list(os.environ):
        if name.startswith("NWBCACHE_"):
            monkeypatch.delenv(name)
    for name, value in DANDI_OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def dead_daemon_url() -> Iterator[str]:
    """A daemon URL where nothing listens: a bound port never listened on refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def script_env(**settings: str) -> dict[str, str]:
    """A user's script's environment: ours less NWBCACHE_*, offline dandi, and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NWBCACHE_")}
    return {**env, **DANDI_OFFLINE_ENV, **settings}


def require_hook() -> None:
    """Fail clearly when this environment's nwbcache was installed before the hook existed."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    if not any((Path(d) / PTH_NAME).is_file() for d in dirs):
        pytest.fail(
            f"{PTH_NAME} is not installed in {sys.prefix}: reinstall the project "
            "(pip install -e '.[dev]', as `make test` does)"
        )
