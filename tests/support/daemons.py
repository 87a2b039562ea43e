"""Run the real daemon for tests: in a thread of this process, or as a process.

A thread keeps the daemon's internals in reach (stats, the cache object) and
lets synchronous clients (requests, remfile, h5py, curl) talk to it; a
process is for what a thread cannot show: kill -9, several workers, two
daemons on one cache directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from nwbcache.urls import upstream_from_proxy_path
from nwbcache_proxy.admin import Admin
from nwbcache_proxy.adminserver import ADMIN_KEY, LOOPBACK_KEY, WARMING_KEY
from nwbcache_proxy.app import READY_PREFIX, S3_READY_PREFIX, build_app, start_s3
from nwbcache_proxy.appkeys import CACHE_KEY, S3_ENDPOINT_KEY
from nwbcache_proxy.cache import BlockCache
from nwbcache_proxy.config import Settings
from nwbcache_proxy.runner import new_loop
from nwbcache_proxy.version import Version
from nwbcache_proxy.warming import Warming
from tests.support.helpers import REPO


class DaemonThread:
    """The daemon's aiohttp app served from a background thread's own loop."""

    def __init__(self, settings: Settings, bind: str | None = None) -> None:
        """``bind``: the address to serve on, when not ``settings.host`` (a test
        of a daemon that believes it listens beyond loopback stays on it)."""
        self.settings = settings
        self.bind = bind or settings.host
        self.url = ""
        self.s3_url = ""  # the S3 endpoint's, when settings.s3_listen is on
        self._loop = new_loop(settings.event_loop)  # the loop the daemon runs on
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._app: web.Application | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="nwbcache-daemon")

    def start(self) -> DaemonThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("daemon thread did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def cache(self) -> BlockCache:
        assert self._app is not None
        return self._app[CACHE_KEY]

    @property
    def warming(self) -> Warming:
        assert self._app is not None
        return self._app[WARMING_KEY]

    @property
    def admin(self) -> Admin:
        assert self._app is not None
        return self._app[ADMIN_KEY]

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the daemon's loop and wait for its result."""
        return self.submit(coro).result(60)

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        """Start a coroutine on the daemon's loop; its future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def version_of(self, url: str) -> Version:
        """The version the daemon resolves a proxied URL (``proxied``) to."""
        upstream = upstream_from_proxy_path("/" + url.split("/", 3)[3], "")
        v: Version = self.call(self.cache.resolve(upstream)).version
        return v

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._app = build_app(self.settings)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        s3_runner = await start_s3(self._app, self.settings)
        try:
            site = web.TCPSite(runner, self.bind, self.settings.port)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://{self.bind}:{port}"
            self._app[LOOPBACK_KEY].set(self.bind, port)
            if s3_runner is not None:
                self.s3_url = self._app[S3_ENDPOINT_KEY].url
            self._ready.set()
            await self._stop.wait()
        finally:
            if WARMING_KEY in self._app:  # as the daemon does (app.serve_forever)
                await self._app[WARMING_KEY].close()
            if s3_runner is not None:
                await s3_runner.cleanup()
            await runner.cleanup()

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()


class DaemonProcess:
    """``python -m nwbcache_proxy serve ...`` as a child process."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        file_size_limit: int | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        self.args = list(args)
        # RLIMIT_FSIZE for the daemon: writes past it fail with EFBIG, a real
        # "disk full" for every file the daemon writes, without a small mount.
        self.file_size_limit = file_size_limit
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.s3_url = ""  # with --s3-listen given: its address
        self.stderr_path = stderr_path  # the daemon's log; None: discarded

    def start(self, timeout: float = 30) -> DaemonProcess:
        cmd = [sys.executable, "-m", "nwbcache_proxy", "serve", "--port", "0", *self.args]
        if "--s3-listen" not in self.args:
            cmd += ["--s3-listen", "off"]  # its default port is one per machine
        log = self.stderr_path.open("a") if self.stderr_path else None
        with log or contextlib.nullcontext():  # the child keeps its own copy
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=log or subprocess.DEVNULL,
                text=True,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
                preexec_fn=self._limit_files if self.file_size_limit is not None else None,
            )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"daemon exited early with {self.proc.wait()}")
            if line.startswith(S3_READY_PREFIX):
                self.s3_url = line[len(S3_READY_PREFIX) :].split()[0]
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX) :].split()[0]
                return self
        raise RuntimeError("daemon did not report ready")

    def _limit_files(self) -> None:
        import resource

        assert self.file_size_limit is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, self.file_size_limit))

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(30)


# The ``spawn`` fixture (conftest.py): spawn(cache_dir, *flags) starts a daemon process.
Spawn = Callable[..., DaemonProcess]
