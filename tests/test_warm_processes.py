"""Warm-up with real processes (issue 13): `nwbcache warm` against a daemon process whose
files are read by worker processes, then PyNWB in fresh processes asks upstream for
nothing; and a daemon killed during a job resumes it after a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nwbcache_proxy.warmworkers import WarmError, WorkerPool
from tests.support.daemons import DaemonProcess, DaemonThread, Spawn
from tests.support.helpers import REPO, origin_host, proxied, wait_until
from tests.support.s3emu import S3Emulator
from tests.test_warm import make_nwb

pytestmark = pytest.mark.slow  # starts daemons, workers and clients as processes

READ = """
import sys, h5py, remfile
from pynwb import NWBHDF5IO
handle = remfile.File(sys.argv[1])
with h5py.File(handle, "r") as f, NWBHDF5IO(file=f, mode="r") as io:
    nwb = io.read()
    print(nwb.subject.subject_id, len(nwb.trials))
"""


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NWBCACHE_")}


def test_warm_in_worker_processes_then_fresh_pynwb_readers_ask_upstream_for_nothing(
    origin: S3Emulator, tmp_path: Path
) -> None:
    keys = [f"/ds/sub-{n}/sub-{n}_ses-1.nwb" for n in range(3)]
    for n, key in enumerate(keys):
        origin.put(key, make_nwb(tmp_path / f"{n}.nwb", samples=200_000 + 50_000 * n))
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(
        ["--cache-dir", str(tmp_path / "cache"), "--allow-upstream", origin_host(origin),
         "--block-size", "16K", "--readahead", "16K", "--log-level", "info"],
        stderr_path=log,
        # A proxy of the environment (a cluster's): the workers' reads of the
        # daemon's own port must not go through it.
        env={"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},
    ).start()  # fmt: skip
    try:
        urls = [f"http://{origin_host(origin)}{k}" for k in keys]
        done = subprocess.run(
            [sys.executable, "-m", "nwbcache.cli", "warm", *urls, "--jobs", "2",
             "--proxy", daemon.url, "--json"],
            capture_output=True, text=True, timeout=300, env=client_env(), cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert job["state"] == "done" and job["summary"]["done"] == 3
        assert all(f["detail"]["datasets"] >= 10 for f in job["files"])
        assert "read in-process" not in log.read_text()  # worker processes did it
        origin.wait_idle()
        origin.clear_log()
        for key in keys:
            out = subprocess.run(
                [sys.executable, "-c", READ, proxied(daemon.url, origin, key)],
                capture_output=True, text=True, timeout=120, env=client_env(),
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.split() == ["m1", "20"]
        origin.wait_idle()
        assert origin.log == [], "a PyNWB read after the warm-up went upstream"
        listed = subprocess.run(
            [sys.executable, "-m", "nwbcache.cli", "jobs", "--proxy", daemon.url],
            capture_output=True, text=True, timeout=60, env=client_env(), cwd=REPO,
        )  # fmt: skip
        assert f"{job['id']}       done  metadata  3/3 done" in listed.stdout
    finally:
        assert daemon.terminate() == 0


def test_a_daemon_killed_during_a_job_resumes_it_after_a_restart(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    files = {f"/ds/f{n:02d}.bin": os.urandom(64 * 1024 + n) for n in range(16)}
    for key, data in files.items():
        origin.put(key, data)
    origin.latency = 0.15
    cache = tmp_path / "cache"
    daemon = spawn(cache, "--block-size", "16K")
    urls = [f"http://{origin_host(origin)}{k}" for k in files]
    r = requests.post(
        f"{daemon.url}/admin/warm", json={"mode": "full", "jobs": 1, "urls": urls}, timeout=30
    )
    job_id = r.json()["id"]

    def done_files() -> list[str]:
        job = requests.get(f"{daemon.url}/admin/jobs/{job_id}", timeout=10).json()
        return [f["url"] for f in job["files"] if f["state"] == "done"]

    wait_until(lambda: len(done_files()) >= 3, 60, "three files warmed")
    before = set(done_files())
    daemon.kill9()
    origin.wait_idle()
    origin.clear_log()
    daemon = spawn(cache, "--block-size", "16K")

    def finished() -> bool:
        state = requests.get(f"{daemon.url}/admin/jobs/{job_id}", timeout=10).json()["state"]
        return bool(state == "done")

    wait_until(finished, 120, "the resumed job to finish")
    job = requests.get(f"{daemon.url}/admin/jobs/{job_id}", timeout=10).json()
    assert job["resumed"] == 1
    assert [f["state"] for f in job["files"]] == ["done"] * len(files)
    origin.wait_idle()
    asked_again = {e.path for e in origin.log}
    assert not asked_again & {u.removeprefix(f"http://{origin_host(origin)}") for u in before}
    time.sleep(0)
    origin.clear_log()
    for key, data in files.items():
        got = requests.get(
            proxied(daemon.url, origin, key),
            headers={"Cache-Control": "only-if-cached"},
            timeout=30,
        )
        assert (got.status_code, got.content) == (200, data)
    assert origin.log == []
    assert daemon.terminate() == 0


async def test_a_worker_that_died_fails_its_file_and_is_replaced(
    origin: S3Emulator, tmp_path: Path, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/ds/a.nwb", make_nwb(tmp_path / "a.nwb"))
    daemon = make_daemon(block_size=16 * 1024)
    url = proxied(daemon.url, origin, "/ds/a.nwb")
    pool = WorkerPool(1, timeout=60)
    try:
        first = await pool.warm(url)
        assert first["datasets"] >= 10
        [worker] = pool._idle
        worker.kill()  # the OOM killer, while it waits for a file
        await worker.wait()
        with pytest.raises(WarmError, match="worker died"):
            await pool.warm(url)
        again = await pool.warm(url)  # a new worker
        assert again["datasets"] == first["datasets"]
        assert pool._idle and pool._idle[0].pid != worker.pid
    finally:
        await pool.close()
