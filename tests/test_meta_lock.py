"""meta.json updates take turns across processes, and never undo a private mark."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from nwbcache_proxy import store
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
DATA = os.urandom(3 * BS + 1)


def test_object_lock_makes_meta_updates_take_turns(tmp_path: Path) -> None:
    """Two writers (processes, or threads with their own fds): the second waits."""
    meta = tmp_path / "objects" / "ab" / "abcd" / "meta.json"
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with store.object_lock(meta):
            holding.set()
            time.sleep(0.2)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    with store.object_lock(meta):
        order.append("second in")
    thread.join(5)
    assert order == ["first done", "second in"]


def test_a_writer_waiting_while_a_prune_removes_the_dir_makes_it_again(tmp_path: Path) -> None:
    """store.prune_object removes an emptied object's dir under its lock; a
    writer that waited for the lock gets one on the dir made again, and its
    files land in it (they once failed, ENOENT: the lock was on the removed dir)."""
    obj = tmp_path / "objects" / "ab" / "abcd"
    obj.mkdir(parents=True)
    (obj / "meta.json").write_text("{}")
    holding = threading.Event()

    def prune() -> None:
        with store.object_lock(obj / "meta.json"):
            holding.set()
            time.sleep(0.2)  # the writer is waiting for the lock by now
            os.unlink(obj / "meta.json")
            os.rmdir(obj)

    thread = threading.Thread(target=prune)
    thread.start()
    assert holding.wait(5)
    with store.object_lock(obj / "v.map"):
        (obj / "v.map").write_bytes(b"entries")
    thread.join(5)
    assert (obj / "v.map").read_bytes() == b"entries"


def test_prune_object_takes_only_an_emptied_object(tmp_path: Path) -> None:
    obj = tmp_path / "objects" / "ab" / "abcd"
    obj.mkdir(parents=True)
    (obj / "meta.json").write_text("{}")
    (obj / "v.map").write_bytes(b"")
    assert store.prune_object(obj) is False and (obj / "meta.json").exists()
    (obj / "v.map").unlink()
    assert store.prune_object(obj) is True and not obj.exists()


def test_a_refreshed_validation_time_keeps_another_processes_private_mark(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """Daemon A revalidates a public object (304) after daemon B, on the same
    cache dir, found it embargoed: A's update must keep B's mark."""
    origin.put("/lock/blob", DATA)
    a = make_daemon(block_size=BS, revalidate_after=0.3)
    b = make_daemon(block_size=BS, revalidate_after=0.3, stale_if_error=0.0)
    url_a = proxied(a.url, origin, "/lock/blob")
    assert requests.get(url_a, timeout=30).content == DATA
    origin.require_signature("/lock/")
    time.sleep(0.4)
    # B rediscovers (no stale serving): refused without credentials: private.
    assert requests.get(proxied(b.url, origin, "/lock/blob"), timeout=30).status_code == 403
    assert _meta(tmp_path)["private"] is True
    origin.allow_anonymous("/lock/")  # A's background revalidation now gets its 304
    assert requests.get(url_a, headers={"Range": "bytes=0-9"}, timeout=30).status_code == 206
    wait_until(lambda: any(e.status == 304 for e in origin.requests("/lock/blob")), 5)
    time.sleep(0.2)
    meta = _meta(tmp_path)
    assert meta["private"] is True  # not undone by A's refreshed validated_at
    validated_at = meta["validated_at"]
    assert isinstance(validated_at, float) and validated_at > time.time() - 5  # A's 304, kept


def _meta(tmp_path: Path) -> dict[str, object]:
    [path] = list((tmp_path / "cache").rglob("meta.json"))
    value = json.loads(path.read_text())
    assert isinstance(value, dict)
    return value
