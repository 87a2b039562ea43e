"""``nwbcache.open``: a file object for h5py/PyNWB that reads through the daemon."""

from __future__ import annotations

import urllib.error
import urllib.request
import warnings
from typing import Any, Literal, Protocol, cast

from . import env
from .routing import DaemonUnavailable, route
from .urls import parse_upstream_url, proxied_url, redact_url

__all__ = ["BACKENDS", "NotCached", "RemoteFile", "open"]

BACKENDS = ("remfile", "fsspec")
# RFC 9111 §5.2.1.7: the daemon answers from its cache or with 504, never
# asking upstream.
OFFLINE_HEADERS = {"Cache-Control": "only-if-cached"}


class NotCached(FileNotFoundError):
    """Offline (``offline=True`` or NWBCACHE_OFFLINE=1) and the daemon has not
    cached the file."""


class RemoteFile(Protocol):
    """What h5py needs of a Python file object (both backends' files have more)."""

    def read(self, size: int = ..., /) -> bytes: ...
    def seek(self, offset: int, whence: int = ..., /) -> int | None: ...
    def tell(self) -> int: ...


def open(  # shadows the builtin on purpose: the public name, as gzip.open
    url: str,
    backend: Literal["remfile", "fsspec"] = "remfile",
    proxy: str | None = None,
    *,
    offline: bool | None = None,
    **kwargs: Any,
) -> RemoteFile:
    """Open ``url`` (``https://``, ``http://`` or ``s3://``) for reading through the daemon.

    ``proxy`` defaults to ``$NWBCACHE_URL``; with neither, or with the daemon
    unreachable, the file is read straight from upstream with a warning
    (NWBCACHE_FALLBACK=0 makes an unreachable daemon an error instead).
    ``kwargs`` go to ``remfile.File`` or to ``fsspec``'s ``HTTPFileSystem.open``
    (e.g. ``block_size``, ``cache_type``). Pass the result to
    ``h5py.File(f, "r")``; close it when done.

    ``offline`` (default ``$NWBCACHE_OFFLINE``): read only what the daemon has
    cached, never waiting on the WAN (a compute node without internet): every
    request says ``Cache-Control: only-if-cached``; NotCached when the daemon
    has not cached the file, and a read of bytes it lacks fails.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if env.offline() if offline is None else offline:
        return _open_offline(url, backend, proxy, kwargs)
    if proxy is None and env.proxy() is None:
        warnings.warn(
            f"nwbcache.open: no proxy given and {env.ENV_URL} is unset; reading "
            f"{redact_url(url)} straight from upstream, uncached",
            RuntimeWarning,
            stacklevel=2,
        )
        target = parse_upstream_url(url).url
    else:
        target = route(url, proxy)
    if backend == "remfile":
        import remfile  # imported here: the package stays light

        return cast(RemoteFile, remfile.File(target, **kwargs))
    import fsspec

    return cast(RemoteFile, fsspec.filesystem("http").open(target, "rb", **kwargs))


def _open_offline(url: str, backend: str, proxy: str | None, kwargs: dict[str, Any]) -> RemoteFile:
    daemon = proxy if proxy is not None else env.proxy()
    if daemon is None:
        raise DaemonUnavailable(
            f"offline reading needs the daemon: pass proxy= or set {env.ENV_URL}"
        )
    target = proxied_url(url, daemon)
    size = cached_size(target)
    if backend == "remfile":
        import remfile

        # remfile learns the size with a plain GET of its own; given the size,
        # every request it makes goes through its session, which carries the header.
        f = remfile.File(target, _size=size, **kwargs)
        f.session.headers.update(OFFLINE_HEADERS)
        return cast(RemoteFile, f)
    import fsspec

    fs = fsspec.filesystem("http", headers=OFFLINE_HEADERS, skip_instance_cache=True)
    return cast(RemoteFile, fs.open(target, "rb", size=size, **kwargs))


def cached_size(target: str) -> int:
    """The size of the object behind a daemon URL, if the daemon has it cached
    (a HEAD with only-if-cached); NotCached if it has not."""
    request = urllib.request.Request(target, method="HEAD", headers=OFFLINE_HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.headers["Content-Length"])
    except urllib.error.HTTPError as exc:
        if exc.code == 504:
            raise NotCached(f"{redact_url(target)} is not in the daemon's cache") from None
        raise
    except urllib.error.URLError as exc:  # nothing listening: offline means no fallback
        raise DaemonUnavailable(
            f"offline, and the daemon cannot be reached ({exc.reason})"
        ) from None
