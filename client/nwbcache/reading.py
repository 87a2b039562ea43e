"""``nwbcache.open``: a file object for h5py/PyNWB that reads through the daemon."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Protocol, cast

from . import env
from .routing import route
from .urls import parse_upstream_url, redact_url

__all__ = ["BACKENDS", "RemoteFile", "open"]

BACKENDS = ("remfile", "fsspec")


class RemoteFile(Protocol):
    """What h5py needs of a Python file object (both backends' files have more)."""

    def read(self, size: int = ..., /) -> bytes: ...
    def seek(self, offset: int, whence: int = ..., /) -> int | None: ...
    def tell(self) -> int: ...


def open(  # shadows the builtin on purpose: the public name, as gzip.open
    url: str,
    backend: Literal["remfile", "fsspec"] = "remfile",
    proxy: str | None = None,
    **kwargs: Any,
) -> RemoteFile:
    """Open ``url`` (``https://``, ``http://`` or ``s3://``) for reading through the daemon.

    ``proxy`` defaults to ``$NWBCACHE_URL``; with neither, or with the daemon
    unreachable, the file is read straight from upstream with a warning
    (NWBCACHE_FALLBACK=0 makes an unreachable daemon an error instead).
    ``kwargs`` go to ``remfile.File`` or to ``fsspec``'s ``HTTPFileSystem.open``
    (e.g. ``block_size``, ``cache_type``). Pass the result to
    ``h5py.File(f, "r")``; close it when done.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
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
