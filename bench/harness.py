"""The servers a benchmark run drives, each a real process on 127.0.0.1.

- ``Emulator``: tests/support/s3emu.py serving the benchmark files with WAN-like
  first-byte latency and a per-connection bandwidth cap; its request log
  (count, bytes) is read over HTTP, so it runs in its own process and does
  not share a GIL with the clients it measures.
- ``Nwbcache``: ``nwbcache serve`` with a given cache dir, block size, workers.
- ``Nginx``: Debian's nginx-light as the generic range cache users would
  otherwise deploy: ``proxy_cache`` + ``slice 1m`` + ``proxy_cache_lock``.

All of them log requests to a file, as a deployed server would, so none gets
the advantage of not writing an access log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.support.daemons import DaemonProcess
from tests.support.helpers import REPO, find_tool, free_port, wait_until
from tests.support.s3emu import STATS_PATH

T = TypeVar("T")

OBJECT_PREFIX = "/bench"  # emulator path prefix: <emulator>/bench/<file name>


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    if not wait_until(listening, timeout):
        raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (pre-forked workers, nginx workers)."""
    found = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                for child in children:
                    found.extend(process_tree(int(child)))
    return found


def allocated_bytes(root: Path, *, dirs: bool = False) -> int:
    """Bytes allocated on disk under ``root`` (st_blocks) to its files, and with
    ``dirs`` to its directories too (what ``du`` counts). A file removed
    while it is walked (an eviction) counts nothing."""
    total = 0
    for dirpath, subdirs, files in os.walk(root):
        for name in files + subdirs if dirs else files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def rss_bytes(pids: list[int]) -> int:
    """Resident set size summed over processes (VmRSS, kB in /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def peak_rss_during(pids: Callable[[], list[int]], work: Callable[[], T]) -> tuple[int, T]:
    """``work()`` run while the RSS of the processes ``pids()`` names is sampled
    every 50 ms: the peak (summed over them), and what ``work`` returned."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pids()))
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sampler = pool.submit(sample)
        try:
            result = work()
        finally:
            done.set()
            sampler.result()
    return peak, result


class Emulator:
    def __init__(self, root: Path, *, latency: float, bandwidth: float, log_path: Path) -> None:
        self.root = root
        self.latency = latency
        self.bandwidth = bandwidth
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> Emulator:
        cmd = [
            sys.executable,
            "-m",
            "tests.support.s3emu",
            "--root",
            str(self.root),
            "--prefix",
            OBJECT_PREFIX,
            "--latency",
            str(self.latency),
            "--bandwidth",
            str(int(self.bandwidth)),
        ]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True, cwd=REPO
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("s3emu: serving "):
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def url_for(self, name: str) -> str:
        return f"{self.url}{OBJECT_PREFIX}/{name}"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + STATS_PATH, timeout=10) as r:
            value: dict[str, int] = json.load(r)
            return value

    def wait_idle(self, quiet: float = 0.2, timeout: float = 120) -> dict[str, int]:
        """Stats once nothing has been served for ``quiet`` s (read-ahead and
        background fetches of a cache finish after its client is done)."""
        deadline = time.monotonic() + timeout
        last = self.stats()
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.stats()
            if now["active"] or now["requests"] != last["requests"]:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
        raise TimeoutError("emulator still busy")

    def stop(self) -> None:
        stop_process(self.proc)


class Nwbcache:
    """The daemon from this checkout (tests/support/daemons.py starts it), logging to a
    file; another checkout's with ``env={"PYTHONPATH": ...}`` naming its sources."""

    def __init__(
        self,
        cache_dir: Path,
        upstream_host: str,
        *,
        log_path: Path,
        block_size: str | None = None,
        readahead: str | None = None,
        workers: int | str = 1,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        args = ["--cache-dir", str(cache_dir), "--allow-upstream", upstream_host]
        args += ["--workers", str(workers), *extra]
        if block_size:
            args += ["--block-size", block_size]
        if readahead:
            args += ["--readahead", readahead]
        self.daemon = DaemonProcess(args, stderr_path=log_path, env=env)
        self.url = ""

    def start(self, timeout: float = 60) -> Nwbcache:
        self.url = self.daemon.start(timeout).url
        return self

    def url_for(self, upstream_url: str) -> str:
        scheme, _, rest = upstream_url.partition("://")
        return f"{self.url}/{scheme}/{rest}"

    def pids(self) -> list[int]:
        assert self.daemon.proc is not None
        return process_tree(self.daemon.proc.pid)

    def stop(self) -> None:
        if self.daemon.proc is not None:
            self.daemon.terminate()


NGINX_CONF = """\
{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log {prefix}/access.log;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    proxy_cache_path {cache} levels=1:2 keys_zone=nwb:64m max_size=100g
                     inactive=7d use_temp_path=off;
    upstream origin {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            # The recipe users copy for caching range requests: fetch and
            # cache 1 MiB slices, one upstream fetch per slice at a time.
            slice {slice};
            proxy_cache nwb;
            proxy_cache_key $uri$is_args$args$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://origin;
        }}
    }}
}}
"""


class Nginx:
    def __init__(
        self,
        prefix: Path,
        cache_dir: Path,
        upstream_host: str,
        *,
        workers: int | str = 1,  # a count, or "auto"
        slice_size: str = "1m",
    ) -> None:
        self.prefix = prefix
        self.cache_dir = cache_dir
        self.upstream_host = upstream_host
        self.workers = workers
        self.slice_size = slice_size  # nginx's unit of caching (the suite's: 1m)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @staticmethod
    def binary() -> str:
        found = find_tool("nginx")
        if found is None:
            raise RuntimeError("nginx not found: run scripts/install-bench-deps.sh")
        return found

    def start(self) -> Nginx:
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                # Started as root, nginx's workers would run as "nobody" and
                # could not write the cache in our private temp dir.
                user="user root;\n" if os.geteuid() == 0 else "",
                workers=self.workers,
                prefix=self.prefix,
                cache=self.cache_dir,
                upstream=self.upstream_host,
                port=port,
                slice=self.slice_size,
            )
        )
        self.proc = subprocess.Popen(
            [self.binary(), "-p", str(self.prefix), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(port, self.proc)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def url_for(self, upstream_url: str) -> str:
        return self.url + "/" + upstream_url.split("/", 3)[3]

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        # SIGQUIT is nginx's graceful stop; SIGTERM its fast one. Either is fine.
        stop_process(self.proc)


def machine() -> dict[str, Any]:
    """What a result ran on: platform, CPU model, cores, memory."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
    }


def git_commit() -> str | None:
    """HEAD of the checkout the daemons run from (``+`` if proxy/ has changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy", "client"],
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+" if dirty else "")) or None
