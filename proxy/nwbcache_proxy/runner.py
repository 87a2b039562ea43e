"""Run the daemon: one process, or a supervisor with pre-forked workers.

Imports the app (and with it prometheus_client) only after deciding how many
processes there are: with ``--workers N`` every worker must record metrics in
one shared ``PROMETHEUS_MULTIPROC_DIR``, and prometheus_client picks its
storage when it is first imported. Nothing else here touches aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

from .config import MULTIPROC_ENV, Settings
from .logs import configure_logging

log = logging.getLogger("nwbcache")

# glibc's mallopt parameter, and the size from which an allocation is mapped on
# its own (and unmapped when freed): glibc's initial one, kept fixed.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def return_freed_buffers() -> bool:
    """Make a buffer freed go back to the kernel, so that what a process keeps
    is what its pool keeps (buffers.py). glibc maps a large allocation on its
    own, but once one such is freed it raises that size (up to 32 MiB): the
    next 256 KiB buffers come from the heap, which hands nothing back while
    a small allocation after them lives. Measured: 8 workers with
    --buffer-memory 256M (32 MiB each) kept 780 MB after 256 streams of cold
    reads, 49 MB each over their RSS at rest; with the size fixed, 589 MB (25
    each). Pooled buffers are reused, so the cost (a map and page faults per
    buffer made) is paid only beyond the pool. False where there is no
    mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def new_loop(choice: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``--event-loop`` names (config.py checks the
    name): uvloop's for "uvloop", and for "auto" where uvloop is installed;
    else asyncio's own.

    uvloop runs the loop and its sockets' transports in C (libuv): the
    same daemon filled a 512 MiB object cold at 1.07x the MB/s on 0.94x the
    CPU of asyncio's loop (4 paired runs). The kernel's copies, which no loop
    saves, are most of what is left (CHANGELOG, the cold fill)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("--event-loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _run_on_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    """``main`` to its end on a new loop of the kind the settings name."""
    with asyncio.Runner(loop_factory=functools.partial(new_loop, settings.event_loop)) as runner:
        runner.run(main)


def run(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    if not return_freed_buffers():  # before the workers fork: they inherit it
        log.debug("no mallopt (not glibc): freed buffers go back as the C library does it")
    if settings.workers == 1:
        from .app import serve_forever

        _run_on_loop(settings, serve_forever(settings))
        return 0
    own_dir = MULTIPROC_ENV not in os.environ
    if own_dir:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="nwbcache-metrics-")
    try:
        return _run_workers(settings)
    finally:
        if own_dir:
            shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)


def _listen_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker, all on one port with SO_REUSEPORT.

    With one shared socket, whichever worker wakes first accepts a burst of
    connections; keep-alive clients (remfile, wrk) then stay on it while the
    other workers idle (measured: 2 workers served no more than 1). Separate
    SO_REUSEPORT sockets let the kernel spread connections across workers.
    The first socket picks the port (port 0: any free one), the rest join it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        sock.listen(1024)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def _run_workers(settings: Settings) -> int:
    """Pre-fork: the parent binds the sockets and supervises; each child
    serves its own socket (a restarted child takes over its slot's) with its
    own loop, session and index connection, and all share the cache
    directory (safe by design: see docs/on-disk-format.md)."""
    from .app import serve_forever
    from .metrics import mark_worker_dead
    from .parents import new_node_id

    sockets = _listen_sockets(settings.host, settings.port, settings.workers)
    s3 = settings.s3_address  # the S3 endpoint's port is shared the same way
    s3_sockets = _listen_sockets(*s3, settings.workers) if s3 is not None else []
    node_id = new_node_id(settings.node_name)  # one for all workers: loops are seen
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                s3_sock = s3_sockets[slot] if s3_sockets else None
                _run_on_loop(settings, serve_forever(settings, sockets[slot], node_id, s3_sock))
            except BaseException:
                log.exception("worker %d failed", slot)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = slot

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(settings.workers):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, -1)
        mark_worker_dead(pid)
        if slot >= 0 and not stopping:
            log.warning("worker %d (pid %d) exited with %d; restarting", slot, pid, status)
            time.sleep(0.5)
            if not stopping:  # a SIGTERM during the pause must not be lost on a new child
                spawn(slot)
    return 0
