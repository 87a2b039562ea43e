"""Warm-up jobs in the daemon (issue 13), in-process (the file reader on a thread; the
worker processes are tests/test_warm_processes.py's): after a metadata warm PyNWB's
io.read() through the cache asks upstream for nothing; errors stay with their file;
--full caches every byte; cancel; a job left by a stopped daemon is resumed; the
admin API's checks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import remfile
import requests

from nwbcache_proxy import warming
from nwbcache_proxy.jobs import FileState, Job, JobStore, Mode, State, WarmFile
from nwbcache_proxy.layout import Layout
from tests.support.client_support import NWB_FILES, PYNWB_FILES
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
OFFLINE = {"Cache-Control": "only-if-cached"}


def make_nwb(path: Path, samples: int = 400_000) -> bytes:
    """A small but real NWB file: metadata, a subject, a 1.6 MB TimeSeries, a table."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.file import Subject

    nwb = NWBFile(
        session_description="warm-up test",
        identifier="warm-1",
        session_start_time=datetime(2024, 1, 2, tzinfo=UTC),
        subject=Subject(subject_id="m1", species="Mus musculus", sex="F", age="P90D"),
    )
    rng = np.random.default_rng(7)
    nwb.add_acquisition(
        TimeSeries(name="signal", data=rng.standard_normal(samples).astype("f4"), unit="V",
                   rate=1000.0, description="noise")
    )  # fmt: skip
    nwb.add_trial_column(name="kind", description="what")
    for i in range(20):
        nwb.add_trial(start_time=float(i), stop_time=i + 0.5, kind=f"k{i % 3}")
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path.read_bytes()


def upstream(origin: S3Emulator, key: str) -> str:
    return f"http://{origin_host(origin)}{key}"


def submit(daemon: DaemonThread, body: dict[str, Any]) -> dict[str, Any]:
    r = requests.post(f"{daemon.url}/admin/warm", json=body, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/admin/jobs/{r.json()['id']}"
    return dict(r.json())


def finished(daemon: DaemonThread, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> bool:
        state = requests.get(f"{daemon.url}/admin/jobs/{job_id}", timeout=10).json()["state"]
        return bool(state in ("done", "cancelled"))

    wait_until(done, timeout, f"job {job_id} to finish")
    return dict(requests.get(f"{daemon.url}/admin/jobs/{job_id}", timeout=10).json())


def pynwb_read(url: str) -> tuple[str, float]:
    """What a user's script does: io.read() through remfile, and a slice."""
    import h5py
    from pynwb import NWBHDF5IO

    handle = remfile.File(url)
    try:
        with h5py.File(handle, "r") as f, NWBHDF5IO(file=f, mode="r") as io:
            nwb = io.read()
            return nwb.subject.subject_id, float(nwb.acquisition["signal"].data[5])
    finally:
        handle.close()


@pytest.fixture
def nwb_file(tmp_path: Path) -> Iterator[bytes]:
    yield make_nwb(tmp_path / "a.nwb")


def test_after_a_metadata_warm_io_read_asks_upstream_for_nothing(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    nwb_file: bytes,
    gc_in_main_thread_only: None,
) -> None:
    origin.put("/ds/sub-1/a.nwb", nwb_file)
    daemon = make_daemon(block_size=BS, readahead=BS)
    daemon.warming.whole_below = 0  # a file this small is otherwise fetched whole
    job = submit(daemon, {"files": [{"url": upstream(origin, "/ds/sub-1/a.nwb"),
                                     "label": "sub-1/a.nwb"}]})  # fmt: skip
    assert job["mode"] == "metadata" and job["state"] in ("queued", "running")
    done = finished(daemon, job["id"])
    [f] = done["files"]
    assert (done["state"], f["state"], f["label"]) == ("done", "done", "sub-1/a.nwb"), f
    assert f["detail"]["datasets"] >= 10 and f["detail"]["attributes"] >= 20
    # Metadata only: a fraction of the file, the big dataset left cold.
    assert 0 < f["fetched_bytes"] < len(nwb_file) / 2
    assert done["summary"]["done"] == 1 and done["summary"]["fetched_bytes"] == f["fetched_bytes"]
    origin.wait_idle()
    origin.clear_log()
    url = proxied(daemon.url, origin, "/ds/sub-1/a.nwb")
    handle = remfile.File(url)
    try:
        import h5py
        from pynwb import NWBHDF5IO

        with h5py.File(handle, "r") as h5, NWBHDF5IO(file=h5, mode="r") as io:
            nwb = io.read()
            assert nwb.subject.subject_id == "m1" and len(nwb.trials) == 20
            origin.wait_idle()
            assert origin.log == [], "io.read() after a metadata warm went upstream"
            local = np.frombuffer(nwb.acquisition["signal"].data[:10].tobytes(), "f4")
    finally:
        handle.close()
    assert local.shape == (10,)  # the slice is data: fetched now, exact
    metrics = requests.get(f"{daemon.url}/metrics", timeout=10).text
    assert 'nwbcache_warm_files_total{result="done"} 1.0' in metrics
    assert 'nwbcache_warm_jobs{state="done"} 1.0' in metrics


def test_every_real_nwb_file_then_io_read_asks_upstream_for_nothing(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    gc_in_main_thread_only: None,
) -> None:
    """The shared NWB files (PyNWB's back-compat files, MatNWB's): each warmed by
    its metadata alone, then PyNWB's io.read() of those PyNWB reads goes to no
    origin; the MatNWB ones (NWB 2.0b) are warmed too, h5py reads them."""
    for path in NWB_FILES:
        origin.put_file(f"/real/{path.name}", path)
    daemon = make_daemon(block_size=4096, readahead=4096)
    daemon.warming.whole_below = 0
    body = {"urls": [upstream(origin, f"/real/{p.name}") for p in NWB_FILES]}
    done = finished(daemon, submit(daemon, body)["id"])
    assert [f["state"] for f in done["files"]] == ["done"] * len(NWB_FILES), done["files"]
    fetched = {f["url"].rpartition("/")[2]: f["fetched_bytes"] for f in done["files"]}
    origin.wait_idle()
    origin.clear_log()
    import h5py
    from pynwb import NWBHDF5IO

    for path in PYNWB_FILES:
        handle = remfile.File(proxied(daemon.url, origin, f"/real/{path.name}"))
        try:
            with h5py.File(handle, "r") as f, NWBHDF5IO(file=f, mode="r") as io:
                assert io.read().identifier
        finally:
            handle.close()
        origin.wait_idle()
        assert origin.log == [], f"io.read() of {path.name} after its warm-up went upstream"
        assert fetched[path.name] < path.stat().st_size * 1.2  # blocks, headers


def test_a_small_file_is_fetched_whole_then_visited(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    nwb_file: bytes,
    gc_in_main_thread_only: None,
) -> None:
    origin.put("/ds/small.nwb", nwb_file)
    daemon = make_daemon(block_size=BS)
    done = finished(daemon, submit(daemon, {"urls": [upstream(origin, "/ds/small.nwb")]})["id"])
    [f] = done["files"]
    assert f["state"] == "done" and f["detail"]["fetched_whole"] == len(nwb_file)
    assert f["detail"]["datasets"] >= 10
    origin.wait_idle()
    origin.clear_log()
    r = requests.get(proxied(daemon.url, origin, "/ds/small.nwb"), headers=OFFLINE, timeout=30)
    assert (r.status_code, r.content) == (200, nwb_file)
    assert origin.log == []


def test_each_file_fails_alone_and_says_why(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    nwb_file: bytes,
    gc_in_main_thread_only: None,
) -> None:
    origin.put("/ds/good.nwb", nwb_file)
    origin.put("/ds/notes.txt", b"not an HDF5 file at all\n" * 100)
    origin.put("/embargoed/e.nwb", nwb_file)
    origin.require_signature("/embargoed/")
    daemon = make_daemon(block_size=BS)
    job = submit(daemon, {"jobs": 2, "files": [
        {"url": upstream(origin, "/ds/missing.nwb")},
        {"url": upstream(origin, "/embargoed/e.nwb")},
        {"url": upstream(origin, "/ds/notes.txt")},
        {"url": upstream(origin, "/ds/good.nwb")},
        {"url": upstream(origin, "/ds/table.zarr"), "label": "table.zarr", "skip": "a Zarr asset"},
    ]})  # fmt: skip
    done = finished(daemon, job["id"])
    states = {f["url"].rpartition("/")[2]: (f["state"], f["error"]) for f in done["files"]}
    assert states["missing.nwb"] == ("failed", "HTTP 404: not found upstream")
    assert states["notes.txt"][0] == "failed" and "not an HDF5 file" in states["notes.txt"][1]
    assert states["good.nwb"] == ("done", None)
    assert states["e.nwb"] == ("failed", "HTTP 403: refused upstream (private?)")
    assert states["table.zarr"] == ("skipped", "a Zarr asset")
    assert done["state"] == "done"
    assert (done["summary"]["done"], done["summary"]["failed"], done["summary"]["skipped"]) == (
        1, 3, 1,
    )  # fmt: skip


def test_a_full_warm_caches_every_byte(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    data = os.urandom(40 * BS + 123)
    origin.put("/ds/raw.bin", data)
    daemon = make_daemon(block_size=BS)
    job = submit(daemon, {"mode": "full", "urls": [upstream(origin, "/ds/raw.bin")]})
    done = finished(daemon, job["id"])
    assert done["files"][0]["state"] == "done"
    assert done["files"][0]["detail"] == {"ranges": 1, "bytes": len(data)}
    origin.wait_idle()
    origin.clear_log()
    r = requests.get(proxied(daemon.url, origin, "/ds/raw.bin"), headers=OFFLINE, timeout=30)
    assert (r.status_code, r.content) == (200, data)
    assert origin.log == []
    # Warm again: nothing is fetched twice.
    body = {"mode": "full", "urls": [upstream(origin, "/ds/raw.bin")]}
    again = finished(daemon, submit(daemon, body)["id"])
    assert again["files"][0]["fetched_bytes"] == 0
    origin.wait_idle()
    assert origin.log == []


def test_cancel_stops_after_the_files_running(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    for n in range(30):
        origin.put(f"/ds/f{n:02d}.bin", os.urandom(4 * BS))
    origin.latency = 0.05  # each file takes a while
    daemon = make_daemon(block_size=BS)
    urls = [upstream(origin, f"/ds/f{n:02d}.bin") for n in range(30)]
    job = submit(daemon, {"mode": "full", "jobs": 1, "urls": urls})
    r = requests.delete(f"{daemon.url}/admin/jobs/{job['id']}", timeout=10)
    assert r.status_code == 200
    done = finished(daemon, job["id"])
    assert done["state"] == "cancelled"
    assert done["summary"]["queued"] >= 25  # most never started
    listed = requests.get(f"{daemon.url}/admin/jobs", timeout=10).json()["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(job["id"], "cancelled")]
    assert "files" not in listed[0] and listed[0]["summary"]["files"] == 30


def test_cancel_stops_a_full_warm_between_ranges(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warming, "FULL_RANGE", BS)  # 200 ranges
    origin.put("/ds/big.bin", os.urandom(200 * BS))
    origin.latency = 0.02
    daemon = make_daemon(block_size=BS)
    job = submit(daemon, {"mode": "full", "urls": [upstream(origin, "/ds/big.bin")]})
    wait_until(lambda: len(origin.requests("/ds/big.bin")) >= 8, 30, "ranges under way")
    assert requests.delete(f"{daemon.url}/admin/jobs/{job['id']}", timeout=10).ok
    done = finished(daemon, job["id"])
    assert done["state"] == "cancelled"
    assert done["files"][0]["state"] == "queued"  # not read: never "done"
    origin.wait_idle()
    assert len(origin.requests("/ds/big.bin")) < 100  # it stopped, far from the end


def test_a_daemon_stopping_mid_job_leaves_it_to_resume_with_no_file_failed(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    for n in range(12):
        origin.put(f"/ds/s{n:02d}.bin", os.urandom(8 * BS))
    origin.latency = 0.05
    daemon = make_daemon(block_size=BS)
    urls = [upstream(origin, f"/ds/s{n:02d}.bin") for n in range(12)]
    job = submit(daemon, {"mode": "full", "jobs": 2, "urls": urls})

    def some_done() -> bool:
        files = requests.get(f"{daemon.url}/admin/jobs/{job['id']}", timeout=10).json()["files"]
        return bool(sum(f["state"] == "done" for f in files) >= 2)

    wait_until(some_done, 30, "two files warmed")
    daemon.stop()  # a clean stop, as on SIGTERM
    left = JobStore(Layout(daemon.settings.cache_dir)).load(job["id"])
    assert left is not None and left.state is State.RUNNING
    assert {f.state for f in left.files} <= {FileState.DONE, FileState.QUEUED}
    again = make_daemon(block_size=BS)
    done = finished(again, job["id"])
    assert (done["state"], done["resumed"]) == ("done", 1)
    assert [f["state"] for f in done["files"]] == ["done"] * 12


def test_a_job_left_by_a_stopped_daemon_is_resumed_without_rereading_what_is_done(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    a, b = os.urandom(3 * BS), os.urandom(5 * BS)
    origin.put("/ds/a.bin", a)
    origin.put("/ds/b.bin", b)
    store = JobStore(Layout(tmp_path / "cache"))
    left = Job("1700000000-abcdef", Mode.FULL, 2, [
        WarmFile(upstream(origin, "/ds/a.bin"), "a", FileState.DONE, fetched_bytes=7),
        WarmFile(upstream(origin, "/ds/b.bin"), "b", FileState.RUNNING),
    ], created=time.time() - 60, state=State.RUNNING, started=time.time() - 50)  # fmt: skip
    store.save(left)
    daemon = make_daemon(block_size=BS)
    done = finished(daemon, left.id)
    assert (done["state"], done["resumed"]) == ("done", 1)
    assert [f["state"] for f in done["files"]] == ["done", "done"]
    assert done["files"][0]["fetched_bytes"] == 7  # not read again
    origin.wait_idle()
    assert origin.requests("/ds/a.bin") == []
    r = requests.get(proxied(daemon.url, origin, "/ds/b.bin"), headers=OFFLINE, timeout=30)
    assert r.content == b


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"mode": "some", "urls": ["http://{host}/x"]}, 400, "mode must be"),
        ({"jobs": 0, "urls": ["http://{host}/x"]}, 400, "jobs must be"),
        ({"jobs": 99, "urls": ["http://{host}/x"]}, 400, "jobs must be"),
        ({"urls": ["https://elsewhere.example.org/x.nwb"]}, 403, "not allowed"),
        ({"files": [{"label": "no url"}]}, 400, 'needs a "url"'),
        ({"files": []}, 400, "non-empty list"),
        ({}, 400, "non-empty list"),
    ],
)
def test_bad_warm_requests_get_a_clear_error(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    body: dict[str, Any],
    status: int,
    words: str,
) -> None:
    daemon = make_daemon(block_size=BS)
    text = json.dumps(body).replace("{host}", origin_host(origin))
    json_type = {"Content-Type": "application/json"}
    r = requests.post(f"{daemon.url}/admin/warm", data=text, headers=json_type, timeout=10)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert requests.get(f"{daemon.url}/admin/jobs", timeout=10).json()["jobs"] == []
    missing = requests.get(f"{daemon.url}/admin/jobs/1-abc", timeout=10)
    assert missing.status_code == 404 and "no job" in missing.json()["error"]
    assert requests.delete(f"{daemon.url}/admin/jobs/1-abc", timeout=10).status_code == 404


def test_finished_jobs_are_pruned(tmp_path: Path) -> None:
    store = JobStore(Layout(tmp_path))
    now = time.time()
    for n in range(105):
        store.save(Job(f"{1700000000 + n}-aaaaaa", Mode.FULL, 1, [], created=now - 1000 + n,
                       state=State.DONE, finished=now - 1000 + n))  # fmt: skip
    store.save(Job("1600000000-bbbbbb", Mode.FULL, 1, [], created=now - 30 * 86400,
                   state=State.RUNNING))  # fmt: skip
    assert store.prune(now) == 5
    ids = [j.id for j in store.all()]
    assert len(ids) == 101 and "1600000000-bbbbbb" in ids  # an unfinished job stays
    assert "1700000000-aaaaaa" not in ids
    with pytest.raises(KeyError):
        store.path("../../etc/passwd")
