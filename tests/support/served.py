"""A real aiohttp server for tests: on the running loop, or on its own thread.

The S3 emulator and the fake DANDI API both use it. Thread mode is what
synchronous clients (requests, remfile, h5py, curl) and daemons in other
processes need; ``async with`` serves on the test's own loop.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Self

from aiohttp import web

# In-flight requests get this long to finish when a server stops.
SHUTDOWN_TIMEOUT = 1.0


class ServedApp:
    """Subclasses provide ``app()``; this gives them a URL and a lifecycle."""

    thread_name = "served-app"

    def __init__(self) -> None:
        # Serve HTTPS with this context (set before start): real S3 is HTTPS.
        self.tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on the running loop."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=self.tls).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]  # the port the kernel chose for port 0
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        if ":" in shown:
            shown = f"[{shown}]"
        scheme = "https" if self.tls is not None else "http"
        self._url = f"{scheme}://{shown}:{bound_port}"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self._url = None
        if runner is not None:
            await runner.cleanup()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve from a daemon thread's own loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already running in a thread")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread = loop, thread

    def stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_thread()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
